"""The reverse-chain MCMC estimator (issues 20, 30): the tied chain's states are draws of q(x_τ|x);
hand-computed values on a denoiser whose answer is known, for both chains and every aggregate;
the noise-coordinate LME's weights even where the pixel-space one is a hard max; exactly which
states burn-in and thinning keep; batched == per-class loop; W = 2 == W = 1."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from genrep.diffusion import make_scheduler
from genrep.reverse_chain import (AGGREGATES, CHAINS, aggregate_errors, batch_means_stderr,
                                  chain_errors, chain_timesteps, ddim_step, draw_chain_noise,
                                  kept_indices, lme_weights, log_mean_exp, mean_over_states,
                                  noise_of_states, reverse_chain_posterior, state_log_densities,
                                  tied_chain, tied_step)

T = 100
AC = make_scheduler(num_train_timesteps=T).alphas_cumprod
AC64 = AC.double()
C, SHAPE = 3, (1, 3, 3)
D = 9
TEMPLATES = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.0, 0.2, -0.3, 0.8, 0.1],
                          [-0.5, 1.0, 0.3, -1.0, 0.4, 0.0, 0.6, -0.2, 0.9],
                          [0.2, -0.8, 0.7, 0.1, -0.6, 1.0, 0.0, 0.3, -0.9]]).view(C, *SHAPE)
# the null label ∅ = C predicts the mean template
TEMPLATES_NULL = torch.cat([TEMPLATES, TEMPLATES.mean(0, keepdim=True)]).double()


def template_eps_fn(x_t, t, c):
    """ε̂ consistent with x̂0 = template[c] (∅: the mean template): ε̂ = (x_t − √ᾱ_t·tmpl)/√(1−ᾱ_t).
    In float64, so x̂0 comes back as the template to ~1e-15."""
    a = AC64[t].view(-1, 1, 1, 1)
    return (x_t.double() - a.sqrt() * TEMPLATES_NULL[c]) / (1 - a).sqrt()


def random_eps_fn(x_t, t, c):
    """A nonlinear stand-in network depending on x_t, t and c: the template denoiser plus a
    tanh perturbation (a sane ε scale keeps the chain bounded, so the classes' errors differ)."""
    scale = (1.0 + 0.1 * c.float() + t.float() / T).view(-1, 1, 1, 1)
    wobble = 0.3 * torch.tanh(scale * x_t + 0.3 * c.float().view(-1, 1, 1, 1))
    return template_eps_fn(x_t, t, c).float() + wobble


class Spy:
    """Records every (t, label) row the estimator sends through the network."""

    def __init__(self, fn=template_eps_fn):
        self.fn, self.calls, self.max_rows = fn, [], 0

    def __call__(self, x_t, t, c):
        self.calls += list(zip(t.tolist(), c.tolist()))
        self.max_rows = max(self.max_rows, x_t.shape[0])
        return self.fn(x_t, t, c)


def sigma2(t):
    """σ_t² = (1−ᾱ_t)/ᾱ_t, written out."""
    a = AC64[t].item()
    return (1 - a) / a


def log_normal(x0, mu, var):
    """log N(x0; μ, var·I), written out."""
    return (-(x0 - mu).pow(2).sum() / (2 * var) - D / 2 * math.log(2 * math.pi * var)).item()


def reference_errors(eps_fn, x0, noise, steps, burn_in, thin, eta=1.0, chain="free", aggregate="x0_lme"):
    """−log p̂(x|y) by the definition: one loop per image over the chain (written in x-space: the
    tied step is DDIM with x̂0 = x and ε̂ = ε*), then per class and per kept state; the chain in
    float32 like the estimator (the tied one in float64), the densities in float64."""
    ts = [round((T - 1) * (1 - i / (steps - 1))) if steps > 1 else T - 1 for i in range(steps)]
    keep = [i for i in range(steps) if i >= burn_in and (i - burn_in) % thin == 0]
    out = torch.zeros(x0.shape[0], C, dtype=torch.float64)
    null = torch.tensor([C])
    dtype = torch.float64 if chain == "tied" else torch.float32
    for b in range(x0.shape[0]):
        x = x0[b:b + 1].to(dtype)
        a0 = AC64[ts[0]].item()
        x_t = math.sqrt(a0) * x + math.sqrt(1 - a0) * noise[b:b + 1, 0].to(dtype)
        states = {0: x_t}
        for i in range(steps - 1):
            a_t, a_s = AC64[ts[i]].item(), AC64[ts[i + 1]].item()
            if chain == "tied":
                x0_hat, eps = x, (x_t - math.sqrt(a_t) * x) / math.sqrt(1 - a_t)
            else:
                eps = eps_fn(x_t, torch.tensor([ts[i]]), null).float()
                x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x_t = (math.sqrt(a_s) * x0_hat + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
                   + sigma * noise[b:b + 1, i + 1].to(dtype))
            states[i + 1] = x_t
        for c in range(C):
            logs = []
            for i in keep:
                a = AC64[ts[i]].item()
                eps = eps_fn(states[i].float(), torch.tensor([ts[i]]), torch.tensor([c])).double()
                mu = (states[i].double() - math.sqrt(1 - a) * eps) / math.sqrt(a)  # x̂0(y)
                eps_star = (states[i].double() - math.sqrt(a) * x0[b].double()) / math.sqrt(1 - a)
                logs.append(log_normal(x0[b].double(), mu[0], (1 - a) / a) if aggregate == "x0_lme"
                            else -0.5 * (eps_star - eps).pow(2).sum().item())
            logs = torch.tensor(logs, dtype=torch.float64)
            out[b, c] = -(logs.mean() if aggregate == "mean_log" else
                          torch.logsumexp(logs, 0) - math.log(len(keep)))
    return out


def images(labels, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return TEMPLATES[labels] + scale * torch.randn(len(labels), *SHAPE, generator=g)


def run(eps_fn, x0, seed=1, **kw):
    kw = {"steps": 10, "burn_in": 3, "thin": 2, **kw}
    return reverse_chain_posterior(eps_fn, x0, C, AC, generator=torch.Generator().manual_seed(seed), **kw)


def test_timesteps_and_kept_indices():
    assert chain_timesteps(10, T).tolist() == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    assert chain_timesteps(1, T).tolist() == [99]
    for steps, t_max in [(T, T), (200, 1000), (37, 1000)]:
        ts = chain_timesteps(steps, t_max)
        assert ts[0] == t_max - 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    # a chain started lower (method.mc.chain_start): from `start` down to 0, as evenly spaced
    assert chain_timesteps(5, T, start=40).tolist() == [40, 30, 20, 10, 0]
    assert chain_timesteps(41, T, start=40).tolist() == list(range(40, -1, -1))
    assert chain_timesteps(3, T, start=None).tolist() == chain_timesteps(3, T).tolist() == [99, 50, 0]
    for bad in (dict(steps=42, start=40), dict(steps=3, start=T), dict(steps=3, start=-1)):
        with pytest.raises(ValueError, match="must be in"):
            chain_timesteps(bad["steps"], T, start=bad["start"])
    assert kept_indices(10, 3, 2) == [3, 5, 7, 9]
    assert kept_indices(10, 3, 4) == [3, 7]
    assert kept_indices(200, 50, 2) == list(range(50, 200, 2))  # the paper's m = 50, k = 2: 75 states


@pytest.mark.parametrize("chain, chain_t", [("free", (40, 30, 20)), ("tied", ())])
def test_a_chain_started_lower_sends_exactly_its_timesteps(chain, chain_t):
    """start = 40: the free chain's null-label forwards at 40, 30, 20 (it stops at its last kept
    state, 10), none for the tied one; the classes' at the kept states 30 and 10."""
    spy, x0 = Spy(), images([0, 1])
    res = run(spy, x0, steps=5, burn_in=1, thin=2, start=40, chunk_size=64, chain=chain)
    expected = Counter({(t, C): 2 for t in chain_t})
    expected.update({(t, c): 2 for t in (30, 10) for c in range(C)})
    assert Counter(spy.calls) == expected and res.evals == len(spy.calls)
    assert res.pred.tolist() == [0, 1]  # still the template's class


@pytest.mark.parametrize("chain", ["free", "tied"])
@pytest.mark.parametrize("burn_in, thin, kept_t, chain_t", [
    (3, 2, [66, 44, 22, 0], [99, 88, 77, 66, 55, 44, 33, 22, 11]),
    (3, 4, [66, 22], [99, 88, 77, 66, 55, 44, 33]),  # the chain stops at its last kept state
    (0, 1, [99, 88, 77, 66, 55, 44, 33, 22, 11, 0], [99, 88, 77, 66, 55, 44, 33, 22, 11]),
])
def test_burn_in_and_thinning_keep_exactly_those_states_and_evals_count_every_forward(
        burn_in, thin, kept_t, chain_t, chain):
    spy, batch = Spy(), 2
    res = run(spy, images([0, 1]), burn_in=burn_in, thin=thin, chunk_size=5, chain=chain)
    # the free chain: null label only; the tied one steps with x and ε*, no network
    expected = Counter({(t, C): batch for t in chain_t} if chain == "free" else {})
    expected.update({(t, c): batch for t in kept_t for c in range(C)})
    assert Counter(spy.calls) == expected
    chain_evals = len(chain_t) if chain == "free" else 0
    assert res.evals == len(spy.calls) == batch * (chain_evals + len(kept_t) * C)
    assert spy.max_rows <= 5


def test_tied_chain_states_are_draws_of_q_xt_given_x():
    """Many tied chains of one image: each kept state has q(x_τ|x)'s mean √ᾱ_τ·x and variance
    1−ᾱ_τ, and at η = 1 consecutive noises correlate as the forward process' do,
    √(SNR_t/SNR_s) (so a coarser tied chain is a subset of a finer one's states)."""
    n, steps = 20_000, 10
    x = TEMPLATES[1:2].double()
    ts = chain_timesteps(steps, T)
    for eta in (1.0, 0.5):
        noise = draw_chain_noise(steps, n, SHAPE, torch.Generator().manual_seed(7))
        states = tied_chain(x.expand(n, *SHAPE), ts, list(range(steps)), AC, eta, noise)
        eps = noise_of_states(x.expand(n, *SHAPE), states, ts, AC)
        assert states.shape == eps.shape == (n, steps, *SHAPE)
        for i, t in enumerate(ts.tolist()):
            a = AC64[t].item()
            resid = states[:, i].double() - math.sqrt(a) * x  # ~ N(0, (1−ᾱ) I) per pixel
            se_mean = math.sqrt((1 - a) / n)
            assert resid.mean(0).abs().max() < 5 * se_mean
            var = resid.var(0, correction=1)
            assert ((var / (1 - a) - 1).abs() < 5 * math.sqrt(2 / n)).all()
        if eta == 1.0:
            for i in range(steps - 1):
                a_t, a_s = AC64[ts[i]].item(), AC64[ts[i + 1]].item()
                corr = (eps[:, i] * eps[:, i + 1]).mean().item()
                assert abs(corr - math.sqrt(a_t * (1 - a_s) / (a_s * (1 - a_t)))) < 5 / math.sqrt(n * D)


def test_tied_step_is_ddim_with_x_and_its_true_noise():
    """x_s = ddim_step(x_t, ε*, …) with x̂0 = x exactly, and x_s = √ᾱ_s x + √(1−ᾱ_s)·tied_step(ε*)."""
    g = torch.Generator().manual_seed(8)
    x, eps_t, z = (torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_s = AC64[60].item(), AC64[30].item()
    x_t = math.sqrt(a_t) * x + math.sqrt(1 - a_t) * eps_t
    for eta in (1.0, 0.3):
        eps_s = tied_step(eps_t, a_t, a_s, eta, z)
        torch.testing.assert_close(math.sqrt(a_s) * x + math.sqrt(1 - a_s) * eps_s,
                                   ddim_step(x_t, eps_t, a_t, a_s, eta, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tied_step(eps_t, a_t, a_s, 0.0, z), eps_t)  # η = 0: the same ε*


def template_errors(x0, kept_t, aggregate):
    """−log p̂ of the template denoiser by hand: ε* − ε̂(y) = √(ᾱ/(1−ᾱ))·(tmpl_y − x), so
    d_j(y) = SNR_j·‖tmpl_y − x‖² whatever the chain's noise."""
    out = torch.zeros(x0.shape[0], C, dtype=torch.float64)
    for b in range(x0.shape[0]):
        for c in range(C):
            sq = (TEMPLATES[c].double() - x0[b].double()).pow(2).sum().item()
            if aggregate == "x0_lme":
                logs = [log_normal(x0[b].double(), TEMPLATES[c].double(), sigma2(t)) for t in kept_t]
            else:
                logs = [-0.5 * sq / sigma2(t) for t in kept_t]
            logs = torch.tensor(logs, dtype=torch.float64)
            out[b, c] = -(logs.mean() if aggregate == "mean_log"
                          else torch.logsumexp(logs, 0) - math.log(len(kept_t)))
    return out


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("aggregate", list(AGGREGATES))
def test_template_denoiser_ranks_the_true_class_first_and_matches_the_formula(chain, aggregate):
    labels = torch.tensor([2, 0, 1])
    x0 = images(labels)
    res = run(template_eps_fn, x0, tau_mc=50.0, chain=chain, aggregate=aggregate)
    assert torch.equal(res.pred, labels)
    expected = template_errors(x0, (66, 44, 22, 0), aggregate)  # the kept timesteps
    # rtol: the state fed to the network is float32, and mean_log keeps t = 0, where SNR ≈ 6e3
    torch.testing.assert_close(res.errors, expected, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(res.probs, torch.softmax(-expected / 50.0, 1).float())
    assert torch.equal(res.kept, torch.arange(C).expand(3, -1))


def test_x0_lme_is_the_max_state_and_the_chain_end_for_a_good_prediction():
    """x0_lme: within log n of the best kept state; the smallest σ_t (t = 0) is that state when the
    per-pixel residual is below σ_0², an earlier larger-σ one for a poor (wrong-class) prediction."""
    x0 = images(torch.tensor([1]), scale=1e-3)  # residual per pixel ~1e-6 < σ_0² ≈ 6e-4
    res = run(template_eps_fn, x0, aggregate="x0_lme")
    per_state = torch.tensor([[log_normal(x0[0].double(), TEMPLATES[c].double(), sigma2(t))
                               for t in (66, 44, 22, 0)] for c in range(C)], dtype=torch.float64)
    best = per_state.max(1).values
    assert ((-res.errors[0] <= best + 1e-9) & (-res.errors[0] >= best - math.log(4) - 1e-9)).all()
    assert abs(res.errors[0, 1].item() - (-per_state[1, 3].item() + math.log(4))) < 1e-6  # the end
    assert per_state[0].argmax() != 3 and per_state[2].argmax() != 3  # wrong classes: earlier states


def test_noise_lme_weights_are_even_where_x0_lme_is_a_hard_max():
    """A denoiser off by a fixed δ_y at every state (ε̂ = ε* + δ_y): d_j(y) = ‖δ_y‖² at every j, so
    the noise-coordinate LME weighs the kept states evenly (1/n), while the pixel-space density's
    normaliser −(D/2)·log(2πσ_t²) puts all the weight on one state; both rank y by ‖δ_y‖."""
    x0 = images(torch.tensor([0]), seed=9, scale=0.3)
    delta = torch.stack([torch.full(SHAPE, v) for v in (0.3, 0.1, 0.2)]).double()

    def offset_eps_fn(x_t, t, c):
        a = AC64[t].view(-1, 1, 1, 1)
        return (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt() + delta[c]

    run_ = chain_errors(offset_eps_fn, x0, C, AC, steps=10, burn_in=2, thin=1,
                        generator=torch.Generator().manual_seed(9))  # n = 8 kept states
    torch.testing.assert_close(run_.d[0], (D * delta[:, 0, 0, 0] ** 2)[:, None].expand(C, 8),
                               rtol=1e-6, atol=1e-6)
    even = lme_weights(state_log_densities(run_.d, run_.t_kept, AC, run_.dim, "noise_lme"))
    torch.testing.assert_close(even, torch.full_like(even, 1 / 8), rtol=1e-6, atol=1e-6)
    hard = lme_weights(state_log_densities(run_.d, run_.t_kept, AC, run_.dim, "x0_lme"))
    assert (hard.max(-1).values > 0.99).all()
    for aggregate in AGGREGATES:
        res = reverse_chain_posterior(offset_eps_fn, x0, C, AC, steps=10, burn_in=2, thin=1,
                                      aggregate=aggregate, generator=torch.Generator().manual_seed(9))
        assert res.pred.item() == 1


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("aggregate", list(AGGREGATES))
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_batched_equals_per_class_reference_loop(chunk_size, aggregate, chain):
    g = torch.Generator().manual_seed(2)
    x0 = images(torch.tensor([0, 2]), seed=2, scale=0.3)
    noise = draw_chain_noise(10, 2, SHAPE, g)  # kept 2, 4, 6, 8: n = 4, two stderr blocks
    kw = dict(steps=10, burn_in=2, thin=2, noise=noise, chain=chain, aggregate=aggregate)
    res = reverse_chain_posterior(random_eps_fn, x0, C, AC, chunk_size=chunk_size, **kw)
    ref = reference_errors(random_eps_fn, x0, noise, 10, 2, 2, chain=chain, aggregate=aggregate)
    assert (ref.max(1).values - ref.min(1).values > 0.1).all()  # the classes really differ
    torch.testing.assert_close(res.errors, ref, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(res.stderr).all() and (res.stderr > 0).all()
    big = reverse_chain_posterior(random_eps_fn, x0, C, AC, chunk_size=10_000, **kw)
    torch.testing.assert_close(res.errors, big.errors, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.stderr, big.stderr, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_aggregates_of_one_run_are_the_estimator_s():
    """chain_errors once, then every aggregate (what perf P3c does) == the estimator per aggregate."""
    x0 = images(torch.tensor([0, 2, 1]), seed=10, scale=0.3)
    noise = draw_chain_noise(10, 3, SHAPE, torch.Generator().manual_seed(10))
    run_ = chain_errors(random_eps_fn, x0, C, AC, steps=10, burn_in=2, thin=1, noise=noise)
    for aggregate in AGGREGATES:
        log_p, stderr = aggregate_errors(run_.d, run_.t_kept, AC, run_.dim, aggregate)
        res = reverse_chain_posterior(random_eps_fn, x0, C, AC, steps=10, burn_in=2, thin=1,
                                      noise=noise, aggregate=aggregate)
        torch.testing.assert_close(-log_p, res.errors, rtol=0, atol=0)
        torch.testing.assert_close(stderr, res.stderr, rtol=0, atol=0)
        assert run_.evals == res.evals == 3 * 8 * C


def test_free_chain_eta_zero_reference_and_noise_independence():
    g = torch.Generator().manual_seed(3)
    x0 = images(torch.tensor([1, 2]), seed=3, scale=0.3)
    noise = draw_chain_noise(6, 2, SHAPE, g)
    kw = dict(steps=6, burn_in=1, thin=1, eta=0.0, chain="free", aggregate="x0_lme")
    res = reverse_chain_posterior(random_eps_fn, x0, C, AC, noise=noise, **kw)
    torch.testing.assert_close(res.errors, reference_errors(random_eps_fn, x0, noise, 6, 1, 1, eta=0.0),
                               rtol=1e-5, atol=1e-4)
    other = noise.clone()
    other[:, 1:] = torch.randn(other[:, 1:].shape, generator=g)  # η = 0: only the start noise counts
    same = reverse_chain_posterior(random_eps_fn, x0, C, AC, noise=other, **kw)
    torch.testing.assert_close(same.errors, res.errors, rtol=0, atol=0)


def test_ddim_step_matches_diffusers():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sched.set_timesteps(10)  # leading spacing: 90, 80, …; the step at 50 goes to 40
    g = torch.Generator().manual_seed(4)
    x, eps, z = (torch.randn(2, *SHAPE, generator=g) for _ in range(3))
    for eta in (0.0, 1.0, 0.5):
        ours = ddim_step(x, eps, AC64[50].item(), AC64[40].item(), eta, z)
        theirs = sched.step(eps, 50, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chain", CHAINS)
def test_rows_of_a_global_noise_draw_equal_the_whole_batch(chain):
    """W = 2 == W = 1: each rank runs its images with its rows of the global draw."""
    x0 = images(torch.tensor([0, 1, 2, 1]), seed=5, scale=0.3)
    noise = draw_chain_noise(10, 4, SHAPE, torch.Generator().manual_seed(6))
    kw = dict(steps=10, burn_in=3, thin=2, tau_mc=20.0, chain=chain)
    whole = reverse_chain_posterior(random_eps_fn, x0, C, AC, noise=noise, **kw)
    halves = [reverse_chain_posterior(random_eps_fn, x0[s], C, AC, noise=noise[s], **kw)
              for s in (slice(0, 2), slice(2, 4))]
    for field in ("errors", "probs", "pred"):
        torch.testing.assert_close(torch.cat([getattr(h, field) for h in halves]), getattr(whole, field),
                                   rtol=1e-6, atol=1e-6)
    assert sum(h.evals for h in halves) == whole.evals
    gen = torch.Generator().manual_seed(6)
    drawn = reverse_chain_posterior(random_eps_fn, x0, C, AC, generator=gen, **kw)
    torch.testing.assert_close(drawn.errors, whole.errors, rtol=0, atol=0)  # generator = its own draw


def test_prior_shifts_the_posterior_by_log_prior():
    x0 = 0.55 * TEMPLATES[0:1] + 0.45 * TEMPLATES[1:2]  # nearer class 0
    uniform = run(template_eps_fn, x0, tau_mc=100.0)
    delta = (uniform.errors[0, 1] - uniform.errors[0, 0]).item() / 100.0
    assert uniform.pred.item() == 0 and delta > 0
    prior = torch.tensor([1.0, 10 * math.exp(delta), 1.0])  # counts; normalised by the estimator
    shifted = run(template_eps_fn, x0, tau_mc=100.0, prior=prior)
    torch.testing.assert_close(shifted.errors, uniform.errors, rtol=0, atol=0)
    logits = -uniform.errors / 100.0 + (prior / prior.sum()).log().double()
    torch.testing.assert_close(shifted.probs, torch.softmax(logits, 1).float())
    assert shifted.pred.item() == 1


def test_batch_means_stderr_by_hand_and_nan_for_one_block():
    ll = torch.tensor([[[0.0, 1.0, -2.0, 3.0]]], dtype=torch.float64)
    l1, l2 = log_mean_exp(ll[..., :2]), log_mean_exp(ll[..., 2:])  # b = ⌊√4⌋ = 2 blocks
    torch.testing.assert_close(batch_means_stderr(ll), (l1 - l2).abs() / 2)
    # mean_log's blocks are means: (0 + 1)/2 and (−2 + 3)/2, equal, so no spread
    torch.testing.assert_close(batch_means_stderr(ll, mean_over_states),
                               torch.zeros(1, 1, dtype=torch.float64))
    five = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # blocks of 3 and 2
    blocks = torch.stack([log_mean_exp(five[:3]), log_mean_exp(five[3:])])
    torch.testing.assert_close(batch_means_stderr(five), blocks.std() / math.sqrt(2))
    torch.testing.assert_close(batch_means_stderr(five, mean_over_states),
                               torch.tensor([1.0, 3.5], dtype=torch.float64).std() / math.sqrt(2))
    assert torch.isnan(batch_means_stderr(ll[..., :3])).all()
    res = run(template_eps_fn, images(torch.tensor([0])), burn_in=7, thin=1)  # n = 3 kept states
    assert torch.isnan(res.stderr).all()
    assert torch.isfinite(run(template_eps_fn, images(torch.tensor([0]))).stderr).all()  # n = 4


def test_log_mean_exp_is_stable():
    a = torch.tensor([-1e5, -1e5 + math.log(3.0)], dtype=torch.float64)
    assert abs(log_mean_exp(a).item() - (-1e5 + math.log(2.0))) < 1e-9


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"),
    (dict(steps=T + 1, burn_in=0), r"steps must be in \[1, start\+1=100\]"),
    (dict(steps=5, burn_in=0, start=T), r"start must be in \[0, T"),
    (dict(burn_in=10), "burn_in"),
    (dict(burn_in=-1), "burn_in"),
    (dict(thin=0), "thin"),
    (dict(tau_mc=0.0), "tau_mc"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(noise=torch.zeros(1, 9, *SHAPE)), "noise must be"),
    (dict(prior=torch.tensor([1.0, -1.0, 1.0])), "prior"),
    (dict(prior=torch.ones(4)), "prior"),
    (dict(chain="forward"), "unknown chain"),
    (dict(aggregate="lme"), "unknown aggregate"),
    (dict(eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(eta=0.0), "tied chain needs eta > 0"),  # the default chain is tied
])
def test_argument_validation(kw, match):
    x0 = images(torch.tensor([0]))
    kw = {"steps": 10, "burn_in": 3, "thin": 2, **kw}
    spy = Spy()
    with pytest.raises(ValueError, match=match):
        reverse_chain_posterior(spy, x0, C, AC, **kw)
    assert not spy.calls  # refused before any forward


@pytest.mark.parametrize("chain", CHAINS)
def test_tiny_unet_through_reverse_chain_posterior(chain):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=C + 1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    eps_fn = lambda x, t, c: unet(x, t, class_labels=c).sample  # noqa: E731
    x0 = torch.randn(2, 1, 8, 8)
    res = reverse_chain_posterior(eps_fn, x0, C, AC, steps=6, burn_in=2, thin=1, chunk_size=5,
                                  chain=chain, generator=torch.Generator().manual_seed(0))
    assert res.probs.shape == (2, C) and res.evals == 2 * ((5 if chain == "free" else 0) + 4 * C)
    assert torch.allclose(res.probs.sum(-1), torch.ones(2), atol=1e-6)
    assert torch.isfinite(res.errors).all() and torch.isfinite(res.stderr).all() and res.pred.shape == (2,)
