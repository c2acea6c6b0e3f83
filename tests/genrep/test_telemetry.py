"""Step telemetry from the Gram matrix and the weights alone: hand-computed 2-D cases."""
import math

import pytest
import torch

from genrep.strategies import apply_weights, gram_matrix
from genrep.strategies.telemetry import summarize, update_change


def test_update_change_of_pcgrad_on_two_conflicting_vectors():
    """g_p = (1, 0), g_g = (−1, 1): d = −1, PCGrad w = (1 − d/‖g_p‖², 1 − d/‖g_g‖²) = (2, 1.5);
    u = 2·(1,0) + 1.5·(−1,1) = (0.5, 1.5); u_sum = (0, 1); ‖u − u_sum‖/‖u_sum‖ = ‖(0.5, 0.5)‖ = √0.5."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    gram = gram_matrix(grads)
    w = torch.tensor([[2.0, 1.5]], dtype=torch.float64)
    assert torch.allclose(apply_weights(grads, w), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert update_change(gram, w).item() == pytest.approx(math.sqrt(0.5))


def test_update_change_is_zero_for_sum_and_exact_per_segment():
    g = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    gram = gram_matrix(g, seg)
    assert update_change(gram, torch.ones(3, 2, dtype=torch.float64)).item() == 0.0
    w = torch.tensor([[1.0, 0.5], [2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    u, u_sum = apply_weights(g, w, seg), g.sum(0)
    expected = ((u - u_sum).norm() / u_sum.norm()).item()
    assert update_change(gram, w).item() == pytest.approx(expected, rel=1e-12)


def test_summary_per_segment_quantiles_and_whole_vector_cos():
    # three segments: cos = 1, 0 (orthogonal), −1; a fourth that only perception reaches
    grads = torch.tensor([[1.0, 1.0, 0.0, 1.0, 3.0],
                          [2.0, 0.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    seg = torch.tensor([0, 1, 1, 2, 3])
    gram = gram_matrix(grads, seg)
    out = summarize(gram, torch.ones(4, 2, dtype=torch.float64), {})
    assert out["seg_cos_median"] == pytest.approx(0.0)
    assert out["seg_conflict"] == pytest.approx(1 / 3)
    assert out["seg_shared"] == pytest.approx(3 / 4)
    whole = grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm())
    assert out["cos"] == pytest.approx(whole.item())
    assert out["update_change"] == 0.0


def test_update_change_counts_the_task_weighting_as_no_change():
    g = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = gram_matrix(g)
    w = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    assert update_change(gram, w, (0.7, 0.3)).item() == 0.0
    assert update_change(gram, w).item() > 0  # against the unweighted sum it would count
