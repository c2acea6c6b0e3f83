"""sum_balanced: u = ḡ·(ĝ_p + ĝ_g), ḡ = (‖g_p‖ + ‖g_g‖)/2, from the Gram matrix alone."""
import pytest
import torch

from genrep import strategies as S
from genrep.strategies import combine, gram_matrix, weights


def test_hand_computed_two_vectors():
    """g_p = (3, 4), ‖g_p‖ = 5; g_g = (1, 0), ‖g_g‖ = 1; ḡ = 3: w = (3/5, 3),
    u = (9/5, 12/5) + (3, 0) = (4.8, 2.4)."""
    grads = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    w, tel = weights("sum_balanced", gram_matrix(grads))
    assert w[0].tolist() == pytest.approx([0.6, 3.0])
    u, _ = combine("sum_balanced", grads)
    assert u.tolist() == pytest.approx([4.8, 2.4])
    assert tel["damping"].tolist() == [1.0] and tel["w_p"].tolist() == pytest.approx([0.6])


def test_each_task_contributes_the_mean_norm_and_task_weights_scale_after():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(2, 50, generator=g, dtype=torch.float64) * torch.tensor([[100.0], [0.01]], dtype=torch.float64)
    w, _ = weights("sum_balanced", gram_matrix(grads))
    mean = grads.norm(dim=1).mean()
    assert (w[0, 0] * grads[0]).norm().item() == pytest.approx(mean.item(), rel=1e-12)
    assert (w[0, 1] * grads[1]).norm().item() == pytest.approx(mean.item(), rel=1e-12)
    w7, _ = weights("sum_balanced", gram_matrix(grads), task_weights=(0.7, 0.3))
    assert w7[0].tolist() == pytest.approx([0.7 * w[0, 0].item(), 0.3 * w[0, 1].item()], rel=1e-12)
    # equal norms: exactly the plain sum
    eq = torch.stack([grads[0], grads[1] * grads[0].norm() / grads[1].norm()])
    assert weights("sum_balanced", gram_matrix(eq))[0][0].tolist() == pytest.approx([1.0, 1.0], rel=1e-12)


def test_zero_gradient_segments_never_nan():
    """Per tensor: [both, only g_g, only g_p, neither] → [balanced, (0, 1), (1, 0), (0, 0)]."""
    grads = torch.tensor([[2.0, 0.0, 0.0, 5.0, 0.0],
                          [0.0, 1.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 2, 3])
    w, _ = weights("sum_balanced", gram_matrix(grads, seg))
    assert w.reshape(-1).tolist() == pytest.approx([0.75, 1.5, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    u, _ = combine("sum_balanced", grads, seg)
    assert u.tolist() == pytest.approx([1.5, 1.5, 3.0, 5.0, 0.0])


def test_registered_needs_task_grads_and_sharded_equals_whole():
    assert "sum_balanced" in S.available() and S.get("sum_balanced").needs_task_grads
    from harness.modes import known_strategies, mode_of

    assert "sum_balanced" in known_strategies() and mode_of("sum_balanced") == "joint"
    g = torch.Generator().manual_seed(1)
    grads, seg = torch.randn(2, 40, generator=g, dtype=torch.float64), torch.arange(40) // 10
    halves = gram_matrix(grads[:, :25], seg[:25], 4) + gram_matrix(grads[:, 25:], seg[25:], 4)
    assert torch.allclose(weights("sum_balanced", halves)[0], weights("sum_balanced", gram_matrix(grads, seg))[0],
                          rtol=1e-12)
