"""Gradient-combination strategies: hand-computed values, PCGrad against a direct implementation,
and the Gram property the distributed harness relies on."""
import math

import pytest
import torch

import genrep.strategies as S
from genrep.strategies.registry import Registry

F64 = torch.float64
OLD = {"task_weights": (1, 1)}  # the earlier rules at the equal weights they were defined with


def vecs(*rows):
    return torch.tensor(rows, dtype=F64)


def rand_grads(D=64, seed=0, conflict=True):
    """Random [2, D] float64 grads; with conflict=True, g_p·g_g < 0 is guaranteed."""
    g = torch.randn(2, D, dtype=F64, generator=torch.Generator().manual_seed(seed))
    if conflict and g[0] @ g[1] >= 0:
        g[1] = g[1] - 2 * (g[0] @ g[1]) / (g[0] @ g[0]) * g[0] - 0.1 * g[0]
    return g


def pcgrad_reference(g_p, g_g):
    """Yu et al. 2020, Algorithm 1 for two tasks, written out directly."""
    out = []
    for g_i, g_j in ((g_p, g_g), (g_g, g_p)):
        g = g_i.clone()
        if g @ g_j < 0:  # the projection uses the *original* other gradient
            g = g - (g @ g_j) / (g_j @ g_j) * g_j
        out.append(g)
    return out[0] + out[1]


# --- hand-computed 2-D values --------------------------------------------------------------

def test_pcgrad_hand_computed():
    # d = -1, ‖g_p‖² = 1, ‖g_g‖² = 2: g_p' = [1,0] + ½[-1,1] = [½,½]; g_g' = [-1,1] + [1,0] = [0,1]
    g, tel = S.combine("pcgrad", vecs([1, 0], [-1, 1]))
    assert torch.allclose(g, vecs(0.5, 1.5))
    assert tel["w_p"].item() == 2.0 and tel["w_g"].item() == 1.5
    assert math.isclose(tel["cos"].item(), -1 / math.sqrt(2))
    assert tel["conflict"].item() == 1.0 and tel["damping"].item() == 0.0


def test_genrep_constant_hand_computed():
    # λ = ½: w_p = 1 − ½·(−1)/1 = 1.5, w_g = 1 − ½·(−1)/2 = 1.25 → 1.5·[1,0] + 1.25·[−1,1]
    g, tel = S.combine("genrep", vecs([1, 0], [-1, 1]), damping=0.5, rule="constant", task_weights=(1, 1))
    assert torch.allclose(g, vecs(0.25, 1.25))
    assert tel["damping"].item() == 0.5


def test_cos_rule_hand_computed():
    # cos = −1/√2, λ = 0.8·(1 − 1/√2) ≈ 0.2343
    lam = 0.8 * (1 - 1 / math.sqrt(2))
    g, tel = S.combine("genrep", vecs([1, 0], [-1, 1]), damping=0.8, rule="cos", task_weights=(1, 1))
    assert math.isclose(tel["damping"].item(), lam, rel_tol=1e-12)
    w_p, w_g = 1 + (1 - lam), 1 + (1 - lam) / 2
    assert torch.allclose(g, w_p * vecs(1, 0) + w_g * vecs(-1, 1))


def test_cos_rule_is_clipped_and_reaches_pcgrad_at_opposite_gradients():
    grads = vecs([1, 0], [-2, 0])  # cos = −1 → λ = λ₀·0 = 0, i.e. PCGrad
    assert torch.equal(S.combine("genrep", grads, rule="cos", damping=1.0, task_weights=(1, 1))[0],
                       S.combine("pcgrad", grads)[0])
    gram = torch.tensor([[[1.0, -0.1], [-0.1, 1.0]]], dtype=F64)
    _, tel = S.weights("genrep", gram, rule="cos", damping=1.0)
    assert tel["damping"].item() == pytest.approx(0.9)


# --- PCGrad properties -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_matches_direct_implementation(seed):
    g = rand_grads(seed=seed, conflict=seed % 2 == 0)
    assert torch.allclose(S.combine("pcgrad", g)[0], pcgrad_reference(*g), atol=1e-12)


def test_pcgrad_projections_orthogonal_to_other_gradient():
    g_p, g_g = g = rand_grads(seed=3)
    w, _ = S.weights("pcgrad", S.gram_matrix(g))
    # combined = g_p' + g_g' with g_p' = g_p + (w_g − 1)·g_g and g_g' = g_g + (w_p − 1)·g_p
    g_p_proj = g_p + (w[0, 1] - 1) * g_g
    g_g_proj = g_g + (w[0, 0] - 1) * g_p
    assert abs(g_p_proj @ g_g) < 1e-10 and abs(g_g_proj @ g_p) < 1e-10


# --- equivalences ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", [("sum", {}), ("pcgrad", {}), ("genrep", {"rule": "constant", **OLD}),
                                       ("genrep", {"rule": "cos", **OLD}),
                                       ("genrep", {"rule": "gradvac", **OLD}),
                                       ("genrep", {"rule": "constant", "align": "perception", **OLD})])
@pytest.mark.parametrize("grads", [vecs([1, 0], [0, 3]), vecs([1, 2], [2, 4]), vecs([1, 1], [3, 0])])
def test_orthogonal_or_aligned_gradients_untouched(name, opts, grads):
    g, tel = S.combine(name, grads, **opts)
    assert torch.equal(g, grads[0] + grads[1])
    assert tel["conflict"].item() == 0.0 and tel["damping"].item() == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_damping_one_is_sum_and_zero_is_pcgrad(seed):
    g = rand_grads(seed=seed)
    old = dict(rule="constant", **OLD)
    assert torch.equal(S.combine("genrep", g, damping=1.0, **old)[0], S.combine("sum", g)[0])
    assert torch.equal(S.combine("genrep", g, damping=0.0, **old)[0], S.combine("pcgrad", g)[0])
    assert torch.allclose(S.combine("genrep", g, damping=0.0, **old)[0], pcgrad_reference(*g), atol=1e-12)


def test_symmetric_decomposition_matches_formula():
    g_p, g_g = g = rand_grads(seed=7)
    lam, d = 0.3, g_p @ g_g
    par_p, par_g = d / (g_g @ g_g) * g_g, d / (g_p @ g_p) * g_p
    expected = (g_p - par_p + lam * par_p) + (g_g - par_g + lam * par_g)
    out = S.combine("genrep", g, damping=lam, rule="constant", **OLD)[0]
    assert torch.allclose(out, expected, atol=1e-12)


def test_one_sided_keeps_generation_gradient_whole():
    g_p, g_g = g = rand_grads(seed=4)
    lam = 0.25
    g_p_damped = g_p - (1 - lam) * (g_p @ g_g) / (g_g @ g_g) * g_g  # g_p⊥ + λ·g_p∥
    out, tel = S.combine("genrep", g, damping=lam, rule="constant", align="perception", **OLD)
    assert torch.allclose(out - g_g, g_p_damped, atol=1e-12)
    assert tel["w_p"].item() == 1.0
    # λ = 0: g_p' ⟂ g_g
    out0, _ = S.combine("genrep", g, damping=0.0, rule="constant", align="perception", **OLD)
    assert abs((out0 - g_g) @ g_g) < 1e-10


@pytest.mark.parametrize("name,opts", [("sum", {}), ("pcgrad", {}), ("genrep", {"rule": "cos"})])
def test_per_tensor_equals_whole_vector_on_each_slice(name, opts):
    numels = [5, 1, 12, 7]
    g = rand_grads(D=sum(numels), seed=1)
    g[:, 5:6] = 0.0  # one tensor with zero gradient in both tasks
    seg = S.segment_ids([(5,), 1, (3, 4), torch.Size([7])])
    out, tel = S.combine(name, g, seg, **opts)
    assert tel["cos"].shape == (4,)
    for part, sl in zip(torch.split(g, numels, 1), torch.split(torch.arange(g.shape[1]), numels)):
        assert torch.allclose(out[sl], S.combine(name, part, **opts)[0], atol=1e-12)


def test_weights_route_equals_combine_route():
    g = rand_grads(D=30, seed=2)
    seg = S.segment_ids([10, 20])
    out, _ = S.combine("genrep", g, seg, damping=0.4, rule="cos")
    w, _ = S.weights("genrep", S.gram_matrix(g, seg), damping=0.4, rule="cos")
    w_i = w[seg]
    assert torch.allclose(out, w_i[:, 0] * g[0] + w_i[:, 1] * g[1], atol=1e-14)


# --- Gram matrix: the distributed property --------------------------------------------------

def test_gram_matrix_values():
    g = vecs([1, 2, 3], [4, 5, 6])
    assert torch.equal(S.gram_matrix(g), vecs([14, 32], [32, 77])[None])
    assert torch.equal(S.gram_matrix(g, torch.tensor([0, 1, 1])),
                       torch.stack([vecs([1, 4], [4, 16]), vecs([13, 28], [28, 61])]))


def test_partial_grams_over_disjoint_partitions_sum_to_full():
    g = rand_grads(D=40, seed=5)
    seg = S.segment_ids([15, 10, 15])
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shards = perm.tensor_split(3)  # disjoint, not aligned with tensors; a shard may miss a segment
    partial = sum(S.gram_matrix(g[:, i], seg[i], num_segments=3) for i in shards)
    assert torch.allclose(partial, S.gram_matrix(g, seg), atol=1e-12)
    whole = sum(S.gram_matrix(g[:, i]) for i in shards)
    assert torch.allclose(whole, S.gram_matrix(g), atol=1e-12)
    # and the combined shards equal the full combination
    w, _ = S.weights("pcgrad", partial)
    out = torch.empty(40, dtype=F64)
    for i in shards:
        out[i] = S.apply_weights(g[:, i], w, seg[i])
    assert torch.allclose(out, S.combine("pcgrad", g, seg)[0], atol=1e-12)


# --- gradvac state -------------------------------------------------------------------------

def test_gradvac_state_updates_as_documented():
    g = vecs([1, 0], [-1, 1])
    cos, beta, lam0 = -1 / math.sqrt(2), 0.1, 0.6
    assert torch.equal(S.get("genrep").init_state(3, rule="gradvac"), torch.zeros(3, dtype=F64))
    assert S.get("genrep").init_state(3) is None and S.get("pcgrad").init_state(3) is None
    _, tel = S.combine("genrep", g, state=None, rule="gradvac", damping=lam0, ema_beta=beta)
    phi = beta * cos  # φ̂ ← (1−β)·0 + β·cos
    assert tel["state"].item() == pytest.approx(phi)
    assert tel["damping"].item() == pytest.approx(lam0 * (1 + cos))  # φ̂ = 0 → the "cos" rule
    _, tel2 = S.combine("genrep", g, state=tel["state"], rule="gradvac", damping=lam0, ema_beta=beta)
    assert tel2["damping"].item() == pytest.approx(lam0 * (1 + cos) / (1 + phi))
    assert tel2["state"].item() == pytest.approx((1 - beta) * phi + beta * cos)


def test_gradvac_damps_less_when_target_is_lower_than_cos():
    g = vecs([1, 0], [-1, 1])  # cos ≈ −0.707
    lams = [S.combine("genrep", g, state=torch.tensor([phi], dtype=F64), rule="gradvac")[1]["damping"]
            for phi in (0.0, -0.5, -0.9)]
    assert lams[0] < lams[1] < lams[2] <= 1.0


def test_gradvac_state_per_segment():
    g = torch.cat([vecs([1, 0], [-1, 1]), vecs([1, 0], [1, 1])], 1)
    seg = S.segment_ids([2, 2])
    _, tel = S.combine("genrep", g, seg, state=torch.zeros(2, dtype=F64), rule="gradvac", ema_beta=0.5)
    assert torch.allclose(tel["state"], 0.5 * tel["cos"])
    assert tel["conflict"].tolist() == [1.0, 0.0]


# --- registry and options ------------------------------------------------------------------

def test_registry_duplicate_and_unknown():
    reg = Registry("strategy")
    reg.register("sum")(S.get("sum"))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("sum")(S.get("sum"))
    with pytest.raises(KeyError, match=r"known: \['sum'\]"):
        reg.get("nope")
    with pytest.raises(ValueError):
        S.STRATEGIES.register("pcgrad")(S.get("pcgrad"))
    with pytest.raises(KeyError, match="'genrep', .*'pcgrad', 'sum'"):
        S.combine("separate", rand_grads())
    assert {"genrep", "pcgrad", "sum"} <= set(S.available())  # and the torchjd methods


def test_unknown_and_bad_options():
    with pytest.raises(TypeError, match="lamda"):
        S.combine("genrep", rand_grads(), lamda=0.5)
    with pytest.raises(TypeError, match="damping"):
        S.combine("pcgrad", rand_grads(), damping=0.5)
    with pytest.raises(ValueError, match="damping"):
        S.combine("genrep", rand_grads(), damping=1.5)
    with pytest.raises(ValueError, match="rule"):
        S.combine("genrep", rand_grads(), rule="bogus")
    with pytest.raises(ValueError, match="ema_beta"):
        S.combine("genrep", rand_grads(), ema_beta=0.0)


# --- degenerate inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sum", "pcgrad", "genrep"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_gradient_gives_no_nan(name, dtype):
    for grads in (torch.zeros(2, 4, dtype=dtype), torch.tensor([[0, 0, 0, 0], [1, -2, 3, 0]], dtype=dtype)):
        opts = {"rule": "gradvac", **OLD} if name == "genrep" else {}
        out, tel = S.combine(name, grads, **opts)
        assert torch.equal(out, grads[0] + grads[1])
        assert all(torch.isfinite(v).all() for v in tel.values())
        assert tel["cos"].item() == 0.0 and tel["conflict"].item() == 0.0
        assert tel["w_p"].item() == 1.0 and tel["w_g"].item() == 1.0


def test_bad_grads_shape():
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        S.gram_matrix(torch.zeros(3, 4))


# --- the published rule ("paper"): α = ((1 + cos)/2)^k at every step, then task weights ------------

R2 = math.sqrt(2)
ALPHA_POS = (3 + 2 * R2) / 8  # cos = +1/√2: ((1 + 1/√2)/2)² = ((2 + √2)/4)² = (6 + 4√2)/16 ≈ 0.728553
ALPHA_NEG = (3 - 2 * R2) / 8  # cos = −1/√2: ((1 − 1/√2)/2)² = (6 − 4√2)/16 ≈ 0.021447


def test_paper_alpha_hand_values():
    assert ALPHA_POS == pytest.approx(((1 + 1 / R2) / 2) ** 2) == pytest.approx(0.7285533906)
    assert ALPHA_NEG == pytest.approx(((1 - 1 / R2) / 2) ** 2) == pytest.approx(0.0214466094)
    gram = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]], dtype=F64)  # cos = 0.5 → (1.5/2)² = 0.5625
    assert S.weights("genrep", gram)[1]["damping"].item() == pytest.approx(0.5625)


def test_paper_rule_damps_agreeing_gradients_too():
    # g_p = (1,0), g_g = (1,1): d = 1, ‖g_p‖² = 1, ‖g_g‖² = 2, cos = 1/√2 > 0
    # g_p∥ = (d/‖g_g‖²)·g_g = (½,½), g_p⊥ = (½,−½) → g_p' = (½ + ½α, −½ + ½α)
    # g_g∥ = (d/‖g_p‖²)·g_p = (1,0), g_g⊥ = (0,1)  → g_g' = (α, 1)
    # 0.7·g_p' + 0.3·g_g' = (0.35 + 0.65α, −0.05 + 0.35α) ≈ (0.823560, 0.204994)
    a = ALPHA_POS
    g, tel = S.combine("genrep", vecs([1, 0], [1, 1]))
    assert torch.allclose(g, vecs(0.35 + 0.65 * a, -0.05 + 0.35 * a), atol=1e-12)
    assert torch.allclose(g, vecs(0.8235596988, 0.2049936867), atol=1e-9)
    assert tel["damping"].item() == pytest.approx(a) and tel["conflict"].item() == 0.0
    # as coefficients: w_p = 0.7 − 0.3·(1−α)·d/‖g_p‖², w_g = 0.3 − 0.7·(1−α)·d/‖g_g‖²
    assert tel["w_p"].item() == pytest.approx(0.7 - 0.3 * (1 - a))
    assert tel["w_g"].item() == pytest.approx(0.3 - 0.7 * (1 - a) / 2)


def test_paper_rule_on_conflict():
    # g_p = (1,0), g_g = (−1,1): d = −1, cos = −1/√2
    # g_p∥ = −½·(−1,1) = (½,−½), g_p⊥ = (½,½) → g_p' = (½ + ½α, ½ − ½α)
    # g_g∥ = −1·(1,0) = (−1,0),  g_g⊥ = (0,1) → g_g' = (−α, 1)
    # 0.7·g_p' + 0.3·g_g' = (0.35 + 0.05α, 0.65 − 0.35α) ≈ (0.351072, 0.642494)
    a = ALPHA_NEG
    g, tel = S.combine("genrep", vecs([1, 0], [-1, 1]), rule="paper", power=2.0,
                       task_weights=(0.7, 0.3), align="both")
    assert torch.allclose(g, vecs(0.35 + 0.05 * a, 0.65 - 0.35 * a), atol=1e-12)
    assert torch.allclose(g, vecs(0.3510723305, 0.6424936867), atol=1e-9)
    assert tel["damping"].item() == pytest.approx(a) and tel["conflict"].item() == 1.0


def test_paper_rule_extremes_of_cos():
    # cos = −1: α = 0, each gradient loses all of its part along the other: g_p' = g_g' = 0
    g, tel = S.combine("genrep", vecs([1, 0], [-2, 0]))
    assert torch.allclose(g, vecs(0.0, 0.0), atol=1e-15) and tel["damping"].item() == 0.0
    # cos = 1: α = 1, nothing removed: the weighted sum 0.7·(1,2) + 0.3·(2,4) = (1.3, 2.6)
    g, tel = S.combine("genrep", vecs([1, 2], [2, 4]))
    assert torch.allclose(g, vecs(1.3, 2.6), atol=1e-12) and tel["damping"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("grads", [vecs([1, 0], [1, 1]), vecs([1, 0], [-1, 1]), vecs([1, 0], [-2, 0])])
def test_power_zero_is_the_weighted_sum(grads):
    g, tel = S.combine("genrep", grads, power=0.0)
    assert torch.equal(g, S.combine("sum", grads, task_weights=(0.7, 0.3))[0])
    assert torch.allclose(g, 0.7 * grads[0] + 0.3 * grads[1], atol=1e-15)
    assert tel["damping"].item() == 1.0


@pytest.mark.parametrize("align,expected", [
    # g_p = (1,0), g_g = (1,1), α = ALPHA_POS; g_p' = (½ + ½α, −½ + ½α), g_g' = (α, 1)
    ("both", lambda a: (0.35 + 0.65 * a, -0.05 + 0.35 * a)),
    ("generation", lambda a: (0.7 + 0.3 * a, 0.3)),  # 0.7·(1,0) + 0.3·(α,1)
    ("perception", lambda a: (0.65 + 0.35 * a, -0.05 + 0.35 * a)),  # 0.7·g_p' + 0.3·(1,1)
])
def test_align_variants_hand_computed(align, expected):
    g, _ = S.combine("genrep", vecs([1, 0], [1, 1]), align=align)
    assert torch.allclose(g, vecs(*expected(ALPHA_POS)), atol=1e-12)


@pytest.mark.parametrize("rule", ["paper", "constant", "cos"])
def test_align_keeps_the_other_gradient_whole(rule):
    g_p, g_g = g = rand_grads(seed=11)
    par_p, par_g = (g_p @ g_g) / (g_g @ g_g) * g_g, (g_p @ g_g) / (g_p @ g_p) * g_p
    _, tel = S.combine("genrep", g, rule=rule, damping=0.3)
    lam = tel["damping"].item()
    p_aligned, g_aligned = g_p - (1 - lam) * par_p, g_g - (1 - lam) * par_g
    for align, (gp, gg) in {"both": (p_aligned, g_aligned), "generation": (g_p, g_aligned),
                            "perception": (p_aligned, g_g)}.items():
        out, _ = S.combine("genrep", g, rule=rule, damping=0.3, align=align, task_weights=(0.6, 0.9))
        assert torch.allclose(out, 0.6 * gp + 0.9 * gg, atol=1e-12)


def test_paper_rule_matches_decomposition_formula():
    g_p, g_g = g = rand_grads(seed=8, conflict=False)
    d = g_p @ g_g
    a = ((1 + d / (g_p.norm() * g_g.norm())) / 2) ** 3
    par_p, par_g = d / (g_g @ g_g) * g_g, d / (g_p @ g_p) * g_p
    expected = 0.2 * ((g_p - par_p) + a * par_p) + 0.5 * ((g_g - par_g) + a * par_g)
    out, _ = S.combine("genrep", g, power=3, task_weights=[0.2, 0.5])
    assert torch.allclose(out, expected, atol=1e-12)


def test_paper_rule_per_segment_hand_values():
    # segment 0: g_p = (1,0), g_g = (1,1) (cos = +1/√2); segment 1: g_p = (1,0), g_g = (−1,1) (cos = −1/√2)
    g = torch.cat([vecs([1, 0], [1, 1]), vecs([1, 0], [-1, 1])], 1)
    seg = S.segment_ids([2, 2])
    out, tel = S.combine("genrep", g, seg)
    a, b = ALPHA_POS, ALPHA_NEG
    assert torch.allclose(out, vecs(0.35 + 0.65 * a, -0.05 + 0.35 * a, 0.35 + 0.05 * b, 0.65 - 0.35 * b),
                          atol=1e-12)
    assert torch.allclose(tel["cos"], vecs(1 / R2, -1 / R2)) and torch.allclose(tel["damping"], vecs(a, b))
    # the whole vector: d = 1 − 1 = 0, cos = 0, nothing parallel to rescale → 0.7·g_p + 0.3·g_g
    whole, tel = S.combine("genrep", g)
    assert torch.allclose(whole, vecs(1.0, 0.3, 0.4, 0.3), atol=1e-12)
    assert tel["damping"].item() == pytest.approx(0.25)  # ((1 + 0)/2)²


@pytest.mark.parametrize("opts", [{}, {"align": "generation", "power": 1.5},
                                  {"rule": "cos", "align": "perception"}])
def test_paper_rule_sharded_equals_full(opts):
    g = rand_grads(D=40, seed=9, conflict=False)
    seg = S.segment_ids([15, 10, 15])
    shards = torch.randperm(40, generator=torch.Generator().manual_seed(1)).tensor_split(3)
    partial = sum(S.gram_matrix(g[:, i], seg[i], num_segments=3) for i in shards)
    assert torch.allclose(partial, S.gram_matrix(g, seg), atol=1e-12)
    w, _ = S.weights("genrep", partial, **opts)
    out = torch.empty(40, dtype=F64)
    for i in shards:
        out[i] = S.apply_weights(g[:, i], w, seg[i])
    assert torch.allclose(out, S.combine("genrep", g, seg, **opts)[0], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_paper_rule_zero_gradient_gives_no_nan(dtype):
    for grads in (torch.zeros(2, 4, dtype=dtype), torch.tensor([[0, 0, 0, 0], [1, -2, 3, 0]], dtype=dtype),
                  torch.tensor([[1, -2, 3, 0], [0, 0, 0, 0]], dtype=dtype)):
        for align in ("both", "generation", "perception"):
            out, tel = S.combine("genrep", grads, align=align)
            assert torch.equal(out, 0.7 * grads[0] + 0.3 * grads[1])
            assert all(torch.isfinite(v).all() for v in tel.values())
            assert tel["w_p"].item() == pytest.approx(0.7) and tel["w_g"].item() == pytest.approx(0.3)


# --- task weights: an option of every strategy ---------------------------------------------------

def test_task_weights_on_sum():
    g, tel = S.combine("sum", vecs([1, 0], [-1, 1]), task_weights=(0.7, 0.3))
    assert torch.allclose(g, vecs(0.4, 0.3))  # 0.7·(1,0) + 0.3·(−1,1)
    assert tel["w_p"].item() == pytest.approx(0.7) and tel["w_g"].item() == pytest.approx(0.3)
    assert torch.equal(S.combine("sum", vecs([1, 0], [-1, 1]))[0], vecs(0.0, 1.0))  # default (1, 1)


def test_task_weights_on_pcgrad_apply_after_projecting():
    # conflict: g_p' = (½,½), g_g' = (0,1) (test_pcgrad_hand_computed) → 0.7·g_p' + 0.3·g_g' = (0.35, 0.65)
    g, tel = S.combine("pcgrad", vecs([1, 0], [-1, 1]), task_weights=(0.7, 0.3))
    assert torch.allclose(g, vecs(0.35, 0.65))
    assert tel["w_p"].item() == pytest.approx(0.7 + 0.3)  # w_p − w_g·d/‖g_p‖² = 0.7 + 0.3
    assert tel["w_g"].item() == pytest.approx(0.3 + 0.7 / 2)  # w_g − w_p·d/‖g_g‖² = 0.3 + 0.35
    # no conflict: the plain weighted sum 0.7·(1,0) + 0.3·(1,1)
    g, _ = S.combine("pcgrad", vecs([1, 0], [1, 1]), task_weights=(0.7, 0.3))
    assert torch.allclose(g, vecs(1.0, 0.3))


@pytest.mark.parametrize("seed", range(3))
def test_old_rules_with_task_weights_weigh_the_aligned_gradients(seed):
    g_p, g_g = g = rand_grads(seed=seed)
    par_p, par_g = (g_p @ g_g) / (g_g @ g_g) * g_g, (g_p @ g_g) / (g_p @ g_p) * g_p
    expected = 0.7 * (g_p - 0.6 * par_p) + 0.3 * (g_g - 0.6 * par_g)  # λ = 0.4 on conflict
    assert torch.allclose(S.combine("genrep", g, rule="constant", damping=0.4)[0], expected, atol=1e-12)
    expected0 = 0.7 * (g_p - par_p) + 0.3 * (g_g - par_g)
    assert torch.allclose(S.combine("pcgrad", g, task_weights=(0.7, 0.3))[0], expected0, atol=1e-12)


def test_loss_weights_and_defaults():
    assert S.get("sum").loss_weights() == (1.0, 1.0)
    assert S.get("sum").loss_weights(task_weights=[0.7, 0.3]) == (0.7, 0.3)
    assert S.get("pcgrad").loss_weights(task_weights=(2, 0)) == (2.0, 0.0)
    assert S.get("genrep").loss_weights() == (0.7, 0.3)
    assert S.get("sum").defaults == S.get("pcgrad").defaults == {"task_weights": (1.0, 1.0)}
    assert S.get("genrep").defaults == {"rule": "paper", "power": 2.0, "task_weights": (0.7, 0.3),
                                        "align": "both", "damping": 0.5, "ema_beta": 0.01}
    g = rand_grads(seed=6)
    assert torch.equal(S.combine("genrep", g)[0], S.combine("genrep", g, rule="paper", power=2.0,
                                                            task_weights=(0.7, 0.3), align="both")[0])


@pytest.mark.parametrize("name", ["sum", "pcgrad", "genrep"])
@pytest.mark.parametrize("bad", [(1.0,), (1, 2, 3), (-0.1, 1), (0, 0), (float("nan"), 1), (1, float("inf")),
                                 "ab", (True, 1), None, 1.5])  # one number: a share in [0, 1]
def test_bad_task_weights(name, bad):
    with pytest.raises(ValueError, match="task_weights"):
        S.combine(name, rand_grads(), task_weights=bad)
    with pytest.raises(ValueError, match="task_weights"):
        S.get(name).loss_weights(task_weights=bad)


def test_one_sided_is_retired_for_align():
    for value in (True, False):
        with pytest.raises(TypeError, match=r"'one_sided' was replaced by 'align'.*align='perception'"):
            S.combine("genrep", rand_grads(), one_sided=value)
    with pytest.raises(TypeError, match="align"):
        S.get("genrep").check_options({"one_sided": True, "rule": "cos"})


def test_bad_paper_options_and_old_options_still_checked():
    for key, opts in (("power", {"power": -1.0}), ("power", {"power": float("nan")}),
                      ("power", {"power": "2"}),
                      ("align", {"align": "one_sided"}), ("damping", {"rule": "cos", "damping": 1.5}),
                      ("ema_beta", {"rule": "gradvac", "ema_beta": 0.0}),
                      ("damping", {"rule": "paper", "damping": -0.1})):
        with pytest.raises(ValueError, match=key):
            S.combine("genrep", rand_grads(), **opts)


# --- float64 Grams whatever the gradients' dtype (issue 30, part 5) -------------------------------

def opposed_bf16(D=4096, delta=0.045, seed=0):
    """bf16 [2, D] with g_g ≈ −g_p: cos ≈ −1 + 1e-3, where 1 + cos (α's base) cancels."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, D, dtype=F64, generator=g)
    return torch.stack([a, -a + delta * b]).to(torch.bfloat16)


def test_gram_of_bf16_gradients_is_the_float64_gram_and_gives_the_float64_weights():
    from genrep.strategies.telemetry import update_change

    g = opposed_bf16()
    exact = g.double() @ g.double().T  # products of bf16 values are exact in float64
    gram = S.gram_matrix(g)
    assert gram.dtype == F64 and torch.allclose(gram[0], exact, rtol=1e-13, atol=0)
    w, tel = S.weights("genrep", gram)
    w_ref, tel_ref = S.weights("genrep", exact[None])
    assert torch.allclose(w, w_ref, rtol=1e-12, atol=0)
    assert tel["damping"].item() == pytest.approx(tel_ref["damping"].item(), rel=1e-10)
    # the Gram rounded to bf16 (the hazard): α off by a factor ~3.6, and the update it gives
    # w_p·g_p + w_g·g_g (g_g ≈ −g_p: the update is small beside its terms) 1% away from the
    # reference's; a float32 Gram's 7e-6
    w_bf16, tel_bf16 = S.weights("genrep", (g @ g.T).double()[None])
    assert abs(tel_bf16["damping"].item() / tel_ref["damping"].item() - 1) > 1.0
    moved = lambda w: float(update_change(exact[None], w, w_ref[0].tolist()))  # noqa: E731
    assert moved(w_bf16) > 5e-3 and moved(w) < 1e-12


def test_gram_in_float64_chunks_and_per_block_match_the_float64_reference():
    g = torch.randn(2, 3 * S.GRAM_CHUNK + 5, generator=torch.Generator().manual_seed(1))  # float32
    exact = g.double() @ g.double().T
    assert torch.allclose(S.gram_matrix(g)[0], exact, rtol=1e-13, atol=1e-9)
    seg = S.segment_ids([7, 2 * S.GRAM_CHUNK + 1, S.GRAM_CHUNK - 3])
    per = S.gram_matrix(g, seg)
    assert per.dtype == F64 and torch.allclose(per.sum(0), exact, rtol=1e-13, atol=1e-9)
    perm = torch.randperm(seg.numel(), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(S.gram_matrix(g[:, perm], seg[perm], num_segments=3), per, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float64_weights_are_applied_in_the_gradients_dtype(dtype):
    g = torch.randn(2, 50, generator=torch.Generator().manual_seed(3)).to(dtype)
    seg = S.segment_ids([10, 25, 15])
    w = torch.tensor([[0.7, 0.3], [1.25, -0.4], [0.1, 2.0]], dtype=F64)
    ref = (w[seg].T * g.double()).sum(0)
    gathered = S.apply_weights(g, w, seg)
    in_place = S.apply_weights(g.clone(), w, seg, in_place=True)
    whole = S.apply_weights(g.clone(), w[:1], None, in_place=True)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    for out in (gathered, in_place):
        assert out.dtype == dtype and torch.allclose(out.double(), ref, rtol=tol, atol=tol)
    assert whole.dtype == dtype
    assert torch.allclose(whole.double(), 0.7 * g[0].double() + 0.3 * g[1].double(), rtol=tol, atol=tol)


def test_in_place_apply_refuses_ids_beyond_the_weights():
    with pytest.raises(ValueError, match="segment ids"):
        S.apply_weights(torch.ones(2, 4), torch.ones(1, 2), torch.tensor([0, 0, 1, 1]), in_place=True)


# --- scope: the rule on the attention tensors, the weighted sum on the rest (issue 30, part 3) ----

SIZES = [6, 4, 8, 3, 5]  # five tensors; the 2nd and 4th are "attention"
IN_SCOPE = [False, True, False, True, False]


def scoped(name, granularity, **options):
    """The per-coordinate update under `name` with scope attention, through the harness's route:
    per-tensor Grams → Scope → rule → per-tensor weights → apply (in place, per block)."""
    g = rand_grads(sum(SIZES), seed=5)
    seg = S.segment_ids(SIZES)
    scope = S.Scope.of(IN_SCOPE, granularity)
    rule = S.get(name)
    w, tel = S.scope.scoped_weights(rule, S.gram_matrix(g, seg), scope, None, rule.check_options(options))
    return g, seg, S.apply_weights(g.clone(), w, seg, in_place=True), tel


@pytest.mark.parametrize("name,opts", [("genrep", {}), ("pcgrad", {"task_weights": (0.7, 0.3)}),
                                       ("sum_balanced", {"task_weights": (0.7, 0.3)})])
def test_scope_vector_aligns_the_attention_tensors_together_and_sums_the_rest(name, opts):
    g, seg, u, tel = scoped(name, "vector", **opts)
    t_p, t_g = S.get(name).check_options(opts)["task_weights"]
    inside = torch.tensor(IN_SCOPE)[seg]
    # outside the scope: exactly the task-weighted sum
    assert torch.allclose(u[~inside], t_p * g[0, ~inside] + t_g * g[1, ~inside], rtol=1e-14)
    # inside: the rule on the attention coordinates as one vector (one segment: S = 1)
    ref, ref_tel = S.combine(name, g[:, inside], **opts)
    assert torch.allclose(u[inside], ref, rtol=1e-12) and tel["cos"].shape == (1,)
    assert tel["cos"].item() == pytest.approx(ref_tel["cos"].item(), rel=1e-12)
    assert not torch.allclose(u[inside], t_p * g[0, inside] + t_g * g[1, inside])  # it acts


def test_scope_tensor_aligns_each_attention_tensor_alone():
    g, seg, u, tel = scoped("genrep", "tensor")
    assert tel["cos"].shape == (2,)  # one segment per attention tensor
    start = [0, *torch.tensor(SIZES).cumsum(0).tolist()]
    for i, inside in enumerate(IN_SCOPE):
        block = slice(start[i], start[i + 1])
        ref = S.combine("genrep", g[:, block])[0] if inside else 0.7 * g[0, block] + 0.3 * g[1, block]
        assert torch.allclose(u[block], ref, rtol=1e-12), i


def test_scope_all_tensors_is_the_rule_on_every_tensor_and_sum_is_unchanged_by_scope():
    g, seg = rand_grads(sum(SIZES), seed=5), S.segment_ids(SIZES)
    rule = S.get("pcgrad")
    every = S.Scope.of([True] * len(SIZES), "tensor")
    w, _ = S.scope.scoped_weights(rule, S.gram_matrix(g, seg), every, None, rule.check_options({}))
    assert torch.allclose(S.apply_weights(g, w, seg), S.combine("pcgrad", g, seg)[0], rtol=1e-14)
    # sum's M = I: its weights are the task weights inside the scope too (a no-op, docs)
    total = S.get("sum")
    w, _ = S.scope.scoped_weights(total, S.gram_matrix(g, seg), S.Scope.of(IN_SCOPE, "vector"), None,
                                  total.check_options({"task_weights": (0.7, 0.3)}))
    assert torch.equal(w, torch.tensor([[0.7, 0.3]] * len(SIZES), dtype=F64))


def test_scope_groups_and_errors():
    assert S.Scope.of(IN_SCOPE, "vector").group.tolist() == [-1, 0, -1, 0, -1]
    assert S.Scope.of(IN_SCOPE, "tensor").group.tolist() == [-1, 0, -1, 1, -1]
    assert S.Scope.of(IN_SCOPE, "tensor").num == 2
    with pytest.raises(ValueError, match="no tensor is in scope"):
        S.Scope.of([False, False], "vector")
    with pytest.raises(ValueError, match="granularity"):
        S.Scope.of(IN_SCOPE, "block")
    assert S.SCOPES == ("all", "attention")


def test_scope_summary_is_the_scope_alone():
    from genrep.strategies.telemetry import scope_summary, summarize, update_change

    g, seg, u, tel = scoped("genrep", "vector")
    rule = S.get("genrep")
    per = S.gram_matrix(g, seg)
    scope = S.Scope.of(IN_SCOPE, "vector")
    w, _ = S.scope.scoped_weights(rule, per, scope, None, rule.check_options({}))
    out = scope_summary(per, w, scope.mask, (0.7, 0.3))
    inside = torch.tensor(IN_SCOPE)[seg]
    u_ref = 0.7 * g[0] + 0.3 * g[1]
    assert out["scope_update_change"] == pytest.approx(
        float((u[inside] - u_ref[inside]).norm() / u_ref[inside].norm()), rel=1e-10)
    assert out["scope_cos"] == pytest.approx(float(torch.cosine_similarity(g[0, inside], g[1, inside], 0)), rel=1e-10)
    assert out["scope_tensors"] == pytest.approx(0.4)
    # the whole update's change: only the scope moves, so it is the scope's, scaled down
    whole = summarize(per, w, tel, (0.7, 0.3))["update_change"]
    assert whole == pytest.approx(float((u - u_ref).norm() / u_ref.norm()), rel=1e-10)
    assert whole == pytest.approx(out["scope_update_change"] * float(u_ref[inside].norm() / u_ref.norm()), rel=1e-10)
    assert float(update_change(per, w, (0.7, 0.3))) == pytest.approx(whole, rel=1e-12)
