"""Per-tensor telemetry: gram_matrix's two paths (contiguous blocks for sorted ids, index_add for
any order) agree; the norm-ratio median and which tensors count as reached by both tasks."""
import pytest
import torch

from genrep.strategies import gram_matrix, segment_ids
from genrep.strategies.telemetry import REACH, summarize


def test_sorted_blocks_equal_the_index_add_path_with_empty_segments():
    g = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([0] * 5 + [2] * 10 + [3] * 15)  # segment 1 and 4 hold no coordinate
    fast = gram_matrix(g, seg, num_segments=5)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    slow = gram_matrix(g[:, perm], seg[perm], num_segments=5)  # unsorted ids: index_add
    assert fast.shape == (5, 2, 2) and torch.allclose(fast, slow, rtol=1e-12, atol=0)
    assert (fast[1] == 0).all() and (fast[4] == 0).all()
    hand = torch.stack([g[:, :5] @ g[:, :5].T, g[:, 5:15] @ g[:, 5:15].T])
    assert torch.equal(fast[[0, 2]], hand)


def test_a_slice_of_segment_ids_is_a_shard_of_the_full_gram():
    g = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seg = segment_ids([7, 13, 20])
    parts = sum(gram_matrix(g[:, a:b], seg[a:b], num_segments=3) for a, b in ((0, 10), (10, 25), (25, 40)))
    assert torch.allclose(parts, gram_matrix(g, seg), rtol=1e-12, atol=0)


def test_norm_ratio_median_over_the_tensors_both_reach():
    """Ratios ‖g_p‖/‖g_g‖ per tensor 3/1, 1/2, 4/1, 2/4, sorted [0.5, 0.5, 3, 4]: median 1.75; a
    tensor only g_p reaches and one where g_g is round-off (1e-9 of its whole norm) are left out."""
    grads = torch.tensor([[3.0, 1.0, 4.0, 2.0, 5.0, 1.0],
                          [1.0, 2.0, 1.0, 4.0, 0.0, 1e-9]], dtype=torch.float64)
    seg = torch.arange(6)
    out = summarize(gram_matrix(grads, seg), torch.ones(6, 2, dtype=torch.float64), {})
    assert out["seg_norm_ratio_median"] == pytest.approx(1.75)
    assert out["seg_shared"] == pytest.approx(4 / 6)
    assert REACH * grads[1].norm() > 1e-9  # the last tensor is below the reach threshold


def test_whole_vector_weights_broadcast_give_the_whole_vector_update_change():
    """What the harness does for a vector-granularity rule: per-tensor Grams, its one weight pair
    on every tensor; the update change is the whole vector's (Σ_s G_s = G)."""
    from genrep.strategies import weights
    from genrep.strategies.telemetry import update_change

    g = torch.randn(2, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seg = segment_ids([10, 20, 30])
    w, tel = weights("pcgrad", gram_matrix(g))
    per = gram_matrix(g, seg)
    out = summarize(per, w.expand(3, 2), tel)
    assert out["update_change"] == pytest.approx(float(update_change(gram_matrix(g), w)), rel=1e-12)
    assert out["w_p"] == pytest.approx(float(w[0, 0]), rel=1e-7) and {"seg_cos_median", "seg_norm_ratio_median"} <= set(out)
