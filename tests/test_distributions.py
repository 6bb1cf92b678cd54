"""Timestep-sampling baselines behind the curriculum sampler: logit-normal's exact mass,
loss-second-moment's unbiased importance weights, rank agreement under gloo, and its state
surviving a checkpoint."""

import io
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import chisquare, norm

from trainables.diffusion.config import CurriculumConfig
from trainables.diffusion.curriculum import CurriculumSampler


def sampler(T, N, order, *, rank=0, **fields):
    """A sampler over T timesteps in N clusters; `fields` are CurriculumConfig's."""
    return CurriculumSampler(CurriculumConfig(num_clusters=N, order=order, **fields), T, rank=rank)


def toy_loss(t):
    """A per-timestep loss shaped like a denoiser's: large at low noise, small at high."""
    return 0.05 + 2.0 * torch.exp(-t.double() / 80.0)


def warmed(sampler, steps=400, batch=256):
    for _ in range(steps):
        t = sampler.sample(batch)
        sampler.observe(t, toy_loss(t))
        sampler.advance()
    return sampler


def test_logit_normal_is_the_mass_of_floor_sigmoid_times_t_renormalised_over_the_active_set():
    s = sampler(1000, 4, "easy-to-hard", stage_steps=10 ** 6, distribution="logit-normal",
                          logit_mean=0.5, logit_std=0.8)
    t = s.sample(100_000)
    assert bool(((t >= 750) & (t < 1000)).all())  # stage 1: C4 only
    # the mass of [750, 1000) under ⌊sigmoid(m + s z) T⌋, by bins of 50 timesteps, renormalised
    logit = lambda x: math.log(x / (1 - x)) if 0 < x < 1 else (math.inf if x >= 1 else -math.inf)  # noqa: E731
    edges = list(range(750, 1001, 50))
    mass = [norm.cdf((logit(b / 1000) - 0.5) / 0.8) - norm.cdf((logit(a / 1000) - 0.5) / 0.8)
            for a, b in zip(edges, edges[1:])]
    counts = torch.histc(t.double(), bins=5, min=750, max=1000).numpy()
    assert chisquare(counts, [len(t) * m / sum(mass) for m in mass]).pvalue > 1e-3


def test_loss_second_moment_is_uniform_until_warm_then_weights_keep_the_loss_unbiased():
    s = sampler(1000, 1, "none", distribution="loss-second-moment")
    assert s.importance(s.sample(64)) is None  # warm-up: uniform, no weights
    warmed(s)
    assert s.distribution.warmed_up(s._active_t)
    t = s.sample(200_000)
    weights = s.importance(t)
    assert weights is not None and float(t.double().mean()) < 400  # it looks where the loss is large
    uniform_mean = float(toy_loss(torch.arange(1000)).mean())
    estimate = weights.double() * toy_loss(t)
    # exactly unbiased in expectation: Σ_t p(t) · 1/(T p(t)) · L(t) = mean L
    p = s._last_probs
    assert float((p * (1 / (1000 * p)) * toy_loss(torch.arange(1000))).sum()) == pytest.approx(uniform_mean, rel=1e-9)
    # and the draws agree within their standard error
    se = float(estimate.std() / math.sqrt(len(t)))
    assert abs(float(estimate.mean()) - uniform_mean) < 4 * se


def test_loss_second_moment_under_a_curriculum_warms_up_over_the_active_set_only():
    s = sampler(1000, 4, "easy-to-hard", stage_steps=10 ** 6, distribution="loss-second-moment")
    warmed(s, steps=60)  # C4's 250 timesteps fill their histories; the rest stay empty
    assert s.distribution.warmed_up(s._active_t) and s.importance(s.sample(8)) is not None
    assert int(s.distribution.counts[:750].sum()) == 0


def test_loss_second_moment_state_survives_a_checkpoint():
    a = warmed(sampler(1000, 4, "random", stage_steps=200, distribution="loss-second-moment"), steps=120)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = sampler(1000, 4, "random", stage_steps=200, distribution="loss-second-moment")
    b.load_state_dict(torch.load(buf, weights_only=True))
    weighted = 0
    for _ in range(30):
        ta, tb = a.sample(32), b.sample(32)
        wa, wb = a.importance(ta), b.importance(tb)
        assert torch.equal(ta, tb) and (wa is None) == (wb is None)
        if wa is not None:
            weighted += 1
            assert torch.equal(wa, wb)
        a.observe(ta, toy_loss(ta)), b.observe(tb, toy_loss(tb))
        a.advance(), b.advance()
    assert weighted > 0


def test_shuffled_takes_only_the_uniform_distribution():
    with pytest.raises(ValueError, match="takes distribution 'uniform'"):
        sampler(1000, 4, "shuffled", distribution="logit-normal")


def _lsm_rank(rank, world, rendezvous, out_dir):
    # A file, not a free port: a port found free can be taken before the rank binds it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    s = sampler(100, 1, "none", distribution="loss-second-moment", rank=rank)
    for step in range(150):
        t = s.sample(16)
        # each rank sees its own losses: rank 1's are noisier and larger
        s.observe(t, toy_loss(t * 10) * (1 + rank) + 0.01 * torch.rand(16))
        s.advance()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"probs": s.distribution.probs(s._active_t).tolist(), "t": s.sample(8).tolist()}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_loss_second_moment_histories_agree_on_two_gloo_ranks(tmp_path):
    mp.spawn(_lsm_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["probs"] == r1["probs"] and max(r0["probs"]) > 1.5 / 100  # the same, and not uniform
    assert r0["t"] != r1["t"]  # each rank still draws its own timesteps


# ----------------------------------------------------------------- SpeeD, against the repository's formulas

def _speed_reference(alphas_cumprod, k=5.0, tau=700, lam=0.6):
    """NUS-HPC-AI-Lab/SpeeD's Speed_IDDPM (speed/diffusion/speed/__init__.py, commit f5650f96)
    written out with numpy as the repository computes it: the meaningful step, p, the weights."""
    import numpy as np

    grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
    meaningful = np.argmax(grad < 1e-4) + 1
    T = len(alphas_cumprod)
    p = np.array([k] * tau + [1] * (T - tau), dtype=np.float64)
    p = p / p.sum()
    w = np.gradient(1 - alphas_cumprod)
    low = 1 - lam
    w = low + (1 - 2 * low) * (w - w.min()) / (w.max() - w.min())
    w = np.array(w[:tau].tolist() + [1] * (T - tau))
    return meaningful, p, w


def _speed_draws(p, meaningful, n, generator):
    """The repository's `_sample_time` (sampling `ours`): half from p, each with its dual."""
    t = torch.multinomial(torch.from_numpy(p), n // 2 + 1, replacement=True, generator=generator)
    dual_t = torch.where(t < meaningful, meaningful - t, t - meaningful)
    return torch.cat([t, dual_t], dim=0)[:n]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_speed_draws_t_as_the_repository_does_and_weights_the_loss_as_it_does(schedule):
    import numpy as np

    from trainables.diffusion.diffusion import GaussianDiffusion

    d = GaussianDiffusion(1000, schedule)
    alphas_cumprod = d.alphas_cumprod.numpy()
    meaningful, p, w = _speed_reference(alphas_cumprod)
    s = CurriculumSampler(CurriculumConfig(num_clusters=4, order="none", distribution="speed"), 1000,
                          log_snr=d.log_snr())
    assert s.distribution.meaningful_step == meaningful
    if schedule == "linear":
        assert meaningful == 642  # where √(1 − ᾱ) grows by < 1e-4 per step on DDPM's schedule
    probs = s.distribution.probs(torch.arange(1000)).numpy()
    # the marginal of a draw and its dual, pushed forward by hand
    expected = 0.5 * p
    dual = np.where(np.arange(1000) < meaningful, meaningful - np.arange(1000), np.arange(1000) - meaningful)
    np.add.at(expected, dual, 0.5 * p)
    np.testing.assert_allclose(probs, expected, rtol=1e-12, atol=1e-15)
    # The repository's own draws and ours, 1M each, in 20 bins of 50 timesteps, against that
    # marginal: ours are i.i.d. (a χ² test); theirs come in pairs, so a bin's count can vary up to
    # twice a multinomial's (within 5 such σ).
    n, binned = 1_000_000, expected.reshape(20, 50).sum(axis=1)
    bins = lambda t: torch.bincount(t // 50, minlength=20).double().numpy()  # noqa: E731
    assert chisquare(bins(s.sample(n)), n * binned).pvalue > 1e-3
    theirs = bins(_speed_draws(p, meaningful, n, torch.Generator().manual_seed(0))) / n
    assert (np.abs(theirs - binned) <= 5 * np.sqrt(2 * binned * (1 - binned) / n)).all(), (theirs, binned)
    weights = d.loss_weight(torch.arange(1000), "speed").double().numpy()
    np.testing.assert_allclose(weights, w, rtol=1e-6)
    assert weights[700:].tolist() == [1.0] * 300 and 0.4 - 1e-6 <= weights[:700].min() <= weights[:700].max() <= 0.6 + 1e-6


def test_speed_under_a_curriculum_is_restricted_to_the_active_set_and_other_t_work():
    from trainables.diffusion.diffusion import GaussianDiffusion

    d = GaussianDiffusion(1000, "linear")
    s = CurriculumSampler(CurriculumConfig(num_clusters=4, order="easy-to-hard", stage_steps=10 ** 6,
                                           distribution="speed"), 1000, log_snr=d.log_snr())
    active = torch.arange(750, 1000)  # stage 1: C4 only
    whole = s.distribution.probs(torch.arange(1000))
    t = s.sample(50_000)
    assert bool(((t >= 750) & (t < 1000)).all())
    torch.testing.assert_close(s.distribution.probs(active)[active], whole[active] / whole[active].sum())
    # another T: τ scales with it and the meaningful step is the schedule's own
    small = GaussianDiffusion(200, "linear")
    meaningful, _, _ = _speed_reference(small.alphas_cumprod.numpy(), tau=140)
    speed = CurriculumSampler(CurriculumConfig(num_clusters=2, order="none", distribution="speed"), 200,
                              log_snr=small.log_snr()).distribution
    assert speed.meaningful_step == meaningful and speed.tau_step == 140
    assert float(speed.probs(torch.arange(200)).sum()) == pytest.approx(1.0)
