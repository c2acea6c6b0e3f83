"""torchjd's methods as strategies (genrep/strategies/torchjd_rules.py): each equals torchjd's own
aggregator on the same [2, D] matrix, per segment, sharded, with state, on degenerate gradients;
CAGrad's closed form against the exact minimiser of torchjd's objective and against torchjd itself."""
import math

import pytest
import torch
from torchjd import aggregation as tjd
from torchjd.linalg import QuadprogProjector

import genrep.strategies as S
from genrep.strategies.torchjd_rules import METHODS, TorchJD, cagrad_weights, gram_rows

F64 = torch.float64
NAMES = sorted(METHODS)
STATELESS = [n for n in NAMES if not METHODS[n].stateful]


def rand_grads(D=64, seed=0, conflict=True, dtype=F64):
    """Random [2, D] grads, norms unequal; conflict=True guarantees g_p·g_g < 0, False that it is ≥ 0."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, D, dtype=F64, generator=gen) * torch.tensor([[1.0], [2.5]], dtype=F64)
    if (g[0] @ g[1] < 0) != conflict:
        g[1] = g[1] - 2 * (g[0] @ g[1]) / (g[0] @ g[0]) * g[0] + (-0.1 if conflict else 0.1) * g[0]
    return g.to(dtype)


def cagrad_objective_min(gram, c, norm_eps=1e-4, iters=200):
    """torchjd's CAGrad weights with its problem solved by ternary search on t (F is convex)."""
    tr = gram.trace()
    gn = torch.zeros_like(gram) if tr < norm_eps else gram / tr
    one = torch.ones(2, dtype=gram.dtype)
    sqrt_phi = c * (one @ gn @ one).clamp_min(0).sqrt() / 2

    def w(t):
        return torch.stack([t, 1 - t])

    def f(t):
        return w(t) @ gn @ one / 2 + sqrt_phi * (w(t) @ gn @ w(t)).clamp_min(0).sqrt()
    lo, hi = torch.tensor(0.0, dtype=gram.dtype), torch.tensor(1.0, dtype=gram.dtype)
    for _ in range(iters):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if f(a) <= f(b) else (a, hi)
    w_opt = w((lo + hi) / 2)
    norm_w = (w_opt @ gn @ w_opt).clamp_min(0).sqrt()
    return torch.zeros(2, dtype=gram.dtype) if norm_w < norm_eps else 0.5 + sqrt_phi / norm_w * w_opt


class ExactCAGrad:
    """CAGrad as torchjd defines it, solved exactly (torchjd's CLARABEL solve is good to ~1e-4)."""

    def __init__(self, c=0.5, norm_eps=1e-4):
        self.c, self.norm_eps = c, norm_eps

    def __call__(self, matrix):
        return cagrad_objective_min(matrix @ matrix.T, self.c, self.norm_eps) @ matrix


def pref(*p, dtype=F64):
    return torch.tensor(p, dtype=dtype)


REFERENCE = {  # name → torchjd's aggregator at the strategy's defaults (dtype → aggregator)
    "upgrad": lambda dt: tjd.UPGrad(),
    "mgda": lambda dt: tjd.MGDA(),
    "dualproj": lambda dt: tjd.DualProj(),
    "aligned_mtl": lambda dt: tjd.AlignedMTL(),
    "imtl_g": lambda dt: tjd.IMTLG(),
    "cagrad": lambda dt: ExactCAGrad(c=0.5),
    "config": lambda dt: tjd.ConFIG(),
    "gradvac": lambda dt: tjd.GradVac(),
    "fairgrad": lambda dt: tjd.FairGrad(alpha=1.0),
}


def assert_rel(out, ref, rel=1e-6):
    """‖out − ref‖ ≤ rel·max(‖ref‖, tiny): relative, and absolute where the reference is 0."""
    err, scale = (out - ref).norm().item(), max(ref.norm().item(), 1e-12)
    assert torch.isfinite(out).all() and err <= rel * scale, f"relative error {err / scale:.3g}"


def test_registered_names_and_state():
    assert set(NAMES) == {"upgrad", "mgda", "dualproj", "aligned_mtl", "imtl_g", "cagrad", "config",
                          "gradvac", "fairgrad"}
    assert set(NAMES) <= set(S.available()) and set(REFERENCE) == set(NAMES)
    for name in NAMES:
        strategy = S.get(name)
        assert isinstance(strategy, TorchJD) and strategy.name == name and strategy.needs_task_grads
        state = strategy.init_state(3)
        assert (state is not None) == (name == "gradvac")
    assert torch.equal(S.get("gradvac").init_state(3), torch.zeros(3, 2, 2, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_equals_torchjd_aggregator(name, seed):
    g = rand_grads(seed=seed, conflict=seed % 2 == 0)
    out, tel = S.combine(name, g)
    assert_rel(out, REFERENCE[name](F64)(g))
    assert "damping" not in tel and all(torch.isfinite(v).all() for v in tel.values())


@pytest.mark.parametrize("name", NAMES)
def test_per_segment_equals_torchjd_on_each_segment(name):
    numels = [30, 34]
    g = torch.cat([rand_grads(30, seed=5, conflict=True), rand_grads(34, seed=6, conflict=False)], 1)
    out, tel = S.combine(name, g, S.segment_ids(numels))
    assert tel["w_p"].shape == (2,)
    for part, got in zip(g.split(numels, 1), out.split(numels)):
        assert_rel(got, REFERENCE[name](F64)(part))  # a fresh aggregator per segment: its own state


@pytest.mark.parametrize("name", NAMES)
def test_sharded_partial_grams_give_the_full_result(name):
    g = rand_grads(D=40, seed=9)
    seg = S.segment_ids([15, 10, 15])
    shards = torch.randperm(40, generator=torch.Generator().manual_seed(1)).tensor_split(3)
    partial = sum(S.gram_matrix(g[:, i], seg[i], num_segments=3) for i in shards)
    w, tel = S.weights(name, partial)
    out = torch.empty(40, dtype=F64)
    for i in shards:
        out[i] = S.apply_weights(g[:, i], w, seg[i])
    full, full_tel = S.combine(name, g, seg)
    assert_rel(out, full, 1e-9)
    if name == "gradvac":
        assert torch.allclose(tel["state"], full_tel["state"], atol=1e-12)


def degenerate(dtype):
    g = rand_grads(D=6, seed=4, dtype=dtype)
    zero = torch.zeros(6, dtype=dtype)
    return {"both zero": torch.stack([zero, zero]), "g_p zero": torch.stack([zero, g[1]]),
            "g_g zero": torch.stack([g[0], zero]), "parallel": torch.stack([g[0], 2 * g[0]]),
            "opposite": torch.stack([g[0], -0.5 * g[0]])}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_degenerate_gradients_no_nan_and_as_torchjd(name, dtype):
    for case, grads in degenerate(dtype).items():
        out, tel = S.combine(name, grads)
        assert all(torch.isfinite(v).all() for v in tel.values()), case
        ref = REFERENCE[name](dtype)(grads)
        if (name, case) == ("config", "opposite"):
            # no direction has equal cos with g and −g: ConFIG's least-squares direction is 0, and
            # torchjd normalises the rounding noise of its pinv (1e-8 in float32) to a unit vector
            ref = torch.zeros_like(ref)
        err = (out - ref).norm().item()
        assert torch.isfinite(out).all() and err <= 1e-4 * max(grads.norm().item(), 1e-12), (case, err)


def test_fairgrad_zero_gradient_gets_weight_zero_and_the_other_its_own_solution():
    g = rand_grads(D=6, seed=4)
    _, tel = S.combine("fairgrad", torch.stack([torch.zeros(6, dtype=F64), g[1]]))
    # α = 1: ‖g_g‖²·x = 1/x → x = 1/‖g_g‖ (torchjd's solver leaves x ≈ 500 on the zero row)
    assert tel["w_p"].item() == 0.0 and tel["w_g"].item() == pytest.approx(1 / g[1].norm().item(), rel=1e-6)


# --- state ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradvac_state_carried_equals_torchjd_called_twice(dtype):
    numels = [30, 34]
    seg = S.segment_ids(numels)
    refs = [tjd.GradVac(beta=0.3), tjd.GradVac(beta=0.3)]  # one per segment: φ̂ is per segment
    state = S.get("gradvac").init_state(2, beta=0.3)
    for seed in (1, 2, 3):
        g = torch.cat([rand_grads(30, seed=seed), rand_grads(34, seed=seed + 10)], 1).to(dtype)
        out, tel = S.combine("gradvac", g, seg, state=state, beta=0.3)
        fresh, _ = S.combine("gradvac", g, seg, beta=0.3)
        expected = torch.cat([ref(part) for ref, part in zip(refs, g.split(numels, 1))])
        assert_rel(out, expected, 1e-6 if dtype == F64 else 1e-5)
        state = tel["state"]
        assert state.shape == (2, 2, 2) and state.dtype == F64
        for s, ref in enumerate(refs):
            # our Gram sums products per segment, torchjd's is J·Jᵀ: equal up to rounding
            assert torch.allclose(state[s].to(dtype), ref.gramian_weighting._phi_t, rtol=1e-5, atol=0)
        if seed > 1:  # the carried target changes the update
            assert not torch.allclose(out, fresh)


def test_gradvac_state_none_is_init_state_and_bad_state_is_an_error():
    g = rand_grads(seed=2)
    a = S.combine("gradvac", g)
    b = S.combine("gradvac", g, state=S.get("gradvac").init_state(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["state"], b[1]["state"])
    with pytest.raises(ValueError, match=r"gradvac: state must be \[S, 2, 2\] = \(1, 2, 2\)"):
        S.combine("gradvac", g, state=torch.zeros(1, dtype=F64))  # genrep's rule="gradvac" state: [S]


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts,ref", [
    ("upgrad", {"pref_vector": (0.7, 0.3)}, lambda: tjd.UPGrad(pref_vector=pref(0.7, 0.3))),
    ("upgrad", {"norm_eps": 1e-8, "reg_eps": 1e-6},
     lambda: tjd.UPGrad(projector=QuadprogProjector(norm_eps=1e-8, reg_eps=1e-6))),
    ("dualproj", {"pref_vector": [0.2, 0.8]}, lambda: tjd.DualProj(pref_vector=pref(0.2, 0.8))),
    ("mgda", {"epsilon": 1e-6, "max_iters": 7}, lambda: tjd.MGDA(epsilon=1e-6, max_iters=7)),
    ("aligned_mtl", {"scale_mode": "rmse", "pref_vector": (1, 2)},
     lambda: tjd.AlignedMTL(pref_vector=pref(1.0, 2.0), scale_mode="rmse")),
    ("config", {"pref_vector": (0.7, 0.3)}, lambda: tjd.ConFIG(pref_vector=pref(0.7, 0.3))),
    ("gradvac", {"beta": 0.1, "eps": 1e-6}, lambda: tjd.GradVac(beta=0.1, eps=1e-6)),
    ("fairgrad", {"alpha": 2.0, "max_iters": 50}, lambda: tjd.FairGrad(alpha=2.0, max_iters=50)),
    ("cagrad", {"c": 1.5}, lambda: ExactCAGrad(c=1.5)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_options_reach_torchjd(name, opts, ref, seed):
    g = rand_grads(seed=seed, conflict=seed == 0)
    assert_rel(S.combine(name, g, **opts)[0], ref()(g))


@pytest.mark.parametrize("name", NAMES)
def test_task_weights_scale_each_tasks_share(name):
    g = rand_grads(seed=3)
    w, _ = S.weights(name, S.gram_matrix(g))
    out, tel = S.combine(name, g, task_weights=(0.7, 0.3))
    assert_rel(out, 0.7 * w[0, 0] * g[0] + 0.3 * w[0, 1] * g[1], 1e-12)
    assert tel["w_p"].item() == pytest.approx(0.7 * w[0, 0].item())
    assert S.get(name).loss_weights(task_weights=(0.7, 0.3)) == (0.7, 0.3)


def test_defaults():
    assert S.get("cagrad").defaults == {"task_weights": (1.0, 1.0), "c": 0.5, "norm_eps": 1e-4}
    assert S.get("upgrad").defaults == {"task_weights": (1.0, 1.0), "pref_vector": None,
                                        "norm_eps": 1e-4, "reg_eps": 1e-4}
    assert S.get("gradvac").defaults == {"task_weights": (1.0, 1.0), "beta": 0.5, "eps": 1e-8}
    assert S.get("fairgrad").defaults == {"task_weights": (1.0, 1.0), "alpha": 1.0, "max_iters": None}
    assert S.get("imtl_g").defaults == {"task_weights": (1.0, 1.0)}


@pytest.mark.parametrize("name,opts,error,match", [
    ("upgrad", {"lamda": 1}, TypeError, "lamda"),
    ("cagrad", {"damping": 0.5}, TypeError, "damping"),
    ("imtl_g", {"c": 0.5}, TypeError, r"'c'.*known: task_weights"),
    ("cagrad", {"c": -0.1}, ValueError, "cagrad: c must"),
    ("cagrad", {"c": float("nan")}, ValueError, "c must"),
    ("cagrad", {"c": "0.5"}, ValueError, "c must"),
    ("cagrad", {"norm_eps": 0.0}, ValueError, "norm_eps"),
    ("mgda", {"max_iters": 0}, ValueError, "max_iters"),
    ("mgda", {"max_iters": 2.5}, ValueError, "max_iters must be an integer"),
    ("mgda", {"epsilon": 0}, ValueError, "epsilon"),
    ("gradvac", {"beta": 1.5}, ValueError, "gradvac: beta"),
    ("gradvac", {"eps": -1e-8}, ValueError, "eps"),
    ("fairgrad", {"alpha": -1.0}, ValueError, "alpha"),
    ("fairgrad", {"max_iters": 0}, ValueError, "max_iters"),
    ("fairgrad", {"alpha": True}, ValueError, "alpha"),
    ("aligned_mtl", {"scale_mode": "max"}, ValueError, "scale_mode 'max'; known: min, median, rmse"),
    ("upgrad", {"pref_vector": (1, 2, 3)}, ValueError, "pref_vector"),
    ("upgrad", {"pref_vector": (0, 0)}, ValueError, "pref_vector"),
    ("config", {"pref_vector": (-1, 1)}, ValueError, "config: pref_vector"),
    ("upgrad", {"norm_eps": 0.0}, ValueError, "norm_eps"),
    ("dualproj", {"reg_eps": 0.0}, ValueError, "reg_eps"),
    ("upgrad", {"task_weights": (1, -1)}, ValueError, "task_weights"),
])
def test_option_errors(name, opts, error, match):
    with pytest.raises(error, match=match):
        S.combine(name, rand_grads(), **opts)
    with pytest.raises(error, match=match):
        S.get(name).init_state(2, **opts)


# --- torchjd's absolute thresholds (documented in the module) -------------------------------------

def test_small_gram_below_norm_eps_is_treated_as_zero_as_torchjd():
    g = 1e-4 * rand_grads(seed=0)  # ‖g_p‖² + ‖g_g‖² ≈ 5e-6 < norm_eps = 1e-4
    assert_rel(S.combine("upgrad", g)[0], 0.5 * (g[0] + g[1]), 1e-12)  # no projection: the mean
    assert_rel(S.combine("upgrad", g)[0], tjd.UPGrad()(g), 1e-12)
    assert torch.equal(S.combine("cagrad", g)[0], torch.zeros(64, dtype=F64))  # no update at all
    # a smaller norm_eps restores the scale-free result: the weights of g and of 1e4·g agree
    for name in ("upgrad", "cagrad", "dualproj"):
        assert_rel(S.combine(name, g, norm_eps=1e-30)[0], 1e-4 * S.combine(name, 1e4 * g)[0], 1e-6)


# --- CAGrad's closed form -------------------------------------------------------------------------

def cagrad_cases():
    for seed in range(40):
        g = rand_grads(D=5, seed=seed, conflict=seed % 3 != 0)
        g = g * torch.rand(2, 1, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 3
        yield g, [0.0, 0.1, 0.5, 1.0, 2.0][seed % 5]


def test_cagrad_closed_form_is_the_exact_minimiser():
    for g, c in cagrad_cases():
        gram = g @ g.T
        assert_rel(cagrad_weights(gram, c, 1e-4), cagrad_objective_min(gram, c), 1e-6)


def test_cagrad_closed_form_edge_cases():
    g = rand_grads(D=5, seed=1)
    cases = {"equal": torch.stack([g[0], g[0]]), "opposite": torch.stack([g[0], -g[0]]),
             "opposite, unequal": torch.stack([g[0], -3 * g[0]]), "one zero": torch.stack([g[0], 0 * g[0]])}
    for case, m in cases.items():
        w = cagrad_weights((m @ m.T)[None], 0.5, 1e-4)[0]
        assert_rel(w @ m, ExactCAGrad()(m), 1e-6)
    w = cagrad_weights(torch.stack([m @ m.T for m in cases.values()]), 0.5, 1e-4)  # batched
    assert w.shape == (4, 2) and torch.isfinite(w).all()
    assert torch.equal(w[1], torch.zeros(2, dtype=F64)) and torch.equal(w[3], torch.zeros(2, dtype=F64))


def test_cagrad_closed_form_against_torchjd_cvxpy():
    pytest.importorskip("cvxpy", reason="torchjd's CAGrad needs the cagrad extra (the dev extra has it)")
    for g, c in cagrad_cases():
        gram = g @ g.T
        ref_w = tjd.CAGradWeighting(c=c)(gram)
        assert_rel(S.combine("cagrad", g, c=c)[0], tjd.CAGrad(c=c)(g), 1e-3)  # CLARABEL's accuracy
        # and the closed form's objective is never above the one at torchjd's solution
        if c > 0 and ref_w.sum() > 1:
            gn, one = gram / gram.trace(), torch.ones(2, dtype=F64)
            sqrt_phi = c * (one @ gn @ one).sqrt() / 2

            def objective(w):  # at w_opt = (w − ½)/(Σw − 1), put back on the simplex: CLARABEL
                w_opt = ((w - 0.5) / (w.sum() - 1)).clamp_min(0)  # leaves it ~1e-9 outside
                w_opt = w_opt / w_opt.sum()
                return w_opt @ gn @ one / 2 + sqrt_phi * (w_opt @ gn @ w_opt).sqrt()
            assert objective(cagrad_weights(gram, c, 1e-4)) <= objective(ref_w) + 1e-14


def test_config_surrogate_rows_have_the_gram():
    for seed in range(3):
        g = rand_grads(D=7, seed=seed)
        gram = g @ g.T
        rows = gram_rows(gram)
        assert torch.allclose(rows @ rows.T, gram, atol=1e-12) and torch.allclose(rows, rows.T)
    assert torch.equal(gram_rows(torch.zeros(2, 2, dtype=F64)), torch.zeros(2, 2, dtype=F64))
    assert math.isclose(gram_rows(torch.tensor([[4.0, 0], [0, 0]], dtype=F64))[0, 0].item(), 2.0)
