"""task_weights: the pair, or one perception share w meaning (w, 1 − w)."""
import pytest
import torch

from genrep import strategies


def test_a_share_means_the_pair_it_completes():
    assert strategies.get("sum").loss_weights(task_weights=0.7) == pytest.approx((0.7, 0.3))
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    pair, _ = strategies.combine("genrep", g, task_weights=(0.25, 0.75))
    share, _ = strategies.combine("genrep", g, task_weights=0.25)
    assert torch.equal(pair, share)


@pytest.mark.parametrize("bad", [1.5, -0.1, (0.0, 0.0), (1.0,), "0.5", True])
def test_bad_task_weights_are_refused(bad):
    with pytest.raises(ValueError, match="task_weights"):
        strategies.get("sum").loss_weights(task_weights=bad)
