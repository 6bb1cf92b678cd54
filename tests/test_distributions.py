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
