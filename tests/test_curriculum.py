"""Curriculum semantics: clusters, orders, pacing, cumulative/exclusive, sampling, resume, DDP."""

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import chisquare

from trainables.diffusion.config import CurriculumConfig
from trainables.diffusion.curriculum import CurriculumSampler, SamplerInputs, cluster_edges, merge_ranges, sigma_quantile_log_edges, degenerate_warning, stage_order
from trainables.diffusion.diffusion import GaussianDiffusion

INPUTS = {f.name for f in dataclasses.fields(SamplerInputs)}


def sampler(T, N, order="easy-to-hard", *, log_snr=None, rank=0, **fields):
    """A sampler over T timesteps in N clusters: `fields` are CurriculumConfig's, or SamplerInputs'
    (what the config's files would hold, and patience's DDP batching)."""
    inputs = SamplerInputs(**{k: fields.pop(k) for k in INPUTS & fields.keys()})
    return CurriculumSampler(CurriculumConfig(num_clusters=N, order=order, **fields), T, log_snr=log_snr, rank=rank,
                             inputs=inputs)


def linear_log_snr(T=1000):
    return GaussianDiffusion(T, "linear").log_snr()


# ----------------------------------------------------------------- clustering


def test_uniform_clusters_are_equal_half_open_intervals():
    assert cluster_edges(1000, 4, "uniform") == [0, 250, 500, 750, 1000]
    edges = cluster_edges(1000, 20, "uniform")
    assert all(b - a == 50 for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("T,N,schedule", [(10, 10, "cosine"), (7, 3, "cosine"), (1000, 1, "linear"),
                                          (5, 5, "cosine"), (1000, 20, "linear"), (50, 50, "linear")])
def test_clusters_cover_all_timesteps_and_are_non_empty(T, N, schedule):
    for clustering in ("uniform", "log-snr", "quantile"):
        edges = cluster_edges(T, N, clustering, GaussianDiffusion(T, schedule).log_snr())
        assert edges[0] == 0 and edges[-1] == T and len(edges) == N + 1
        assert all(b > a for a, b in zip(edges, edges[1:])), (clustering, edges)


def test_log_snr_clusters_have_equal_log_snr_width():
    lam = linear_log_snr()
    edges = cluster_edges(1000, 5, "log-snr", lam)
    span = float(lam[0] - lam[-1]) / 5
    for k in range(1, 5):  # the boundary timestep is the first whose λ fell below level k
        level = float(lam[0]) - k * span
        assert lam[edges[k]] < level <= lam[edges[k] - 1]
    # Equal λ widths are not equal t widths on the linear schedule: λ changes fastest at small t.
    assert edges[1] - edges[0] < edges[2] - edges[1]


def test_quantile_clusters_hold_equal_mass_of_the_edm_noise_distribution():
    from statistics import NormalDist

    cuts = sigma_quantile_log_edges(4)
    nd = NormalDist(-1.2, 1.2)
    assert [round(nd.cdf(c), 6) for c in cuts[1:-1]] == [0.25, 0.5, 0.75]
    lam = GaussianDiffusion(1000, "cosine").log_snr()
    edges = cluster_edges(1000, 4, "quantile", lam)
    ln_sigma = -lam / 2
    # each cluster's ln σ range sits between consecutive quantiles
    for k in range(1, 4):
        assert ln_sigma[edges[k] - 1] < cuts[k] <= ln_sigma[edges[k]]


def test_clustering_needs_log_snr_and_rejects_unknown():
    with pytest.raises(ValueError, match="ln SNR"):
        cluster_edges(100, 4, "log-snr")
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster_edges(100, 4, "sideways")
    with pytest.raises(ValueError):
        cluster_edges(10, 11)


# ----------------------------------------------------------------- orders and stages


def test_orders():
    assert stage_order("easy-to-hard", 4) == [3, 2, 1, 0]
    assert stage_order("hard-to-easy", 4) == [0, 1, 2, 3]
    assert stage_order("none", 4) == []
    r = stage_order("random", 10, seed=7)
    assert sorted(r) == list(range(10))
    assert r == stage_order("random", 10, seed=7)
    assert r != stage_order("random", 10, seed=8)


def run_fixed(sampler, steps):
    seen = []
    for _ in range(steps):
        seen.append((sampler.stage, tuple(sampler.active_clusters), sampler.t_min, sampler.t_max))
        sampler.advance()
    return seen


def test_easy_to_hard_cumulative_fixed_pacing():
    s = sampler(1000, 4, "easy-to-hard", stage_steps=10)
    seen = run_fixed(s, 60)
    assert seen[0] == (1, (4,), 750, 999)
    assert seen[10] == (2, (3, 4), 500, 999)
    assert seen[20] == (3, (2, 3, 4), 250, 999)
    assert seen[30] == (4, (1, 2, 3, 4), 0, 999)  # stage N already trains on every timestep: the final phase
    assert s.in_final_phase and s.full_from_step == 31
    assert seen[59] == seen[30]
    assert [x[0] for x in seen] == [1] * 10 + [2] * 10 + [3] * 10 + [4] * 30


def test_hard_to_easy_exclusive_fixed_pacing():
    s = sampler(100, 4, "hard-to-easy", stage_steps=5, cumulative=False)
    seen = run_fixed(s, 25)
    assert [x[1] for x in seen[::5]] == [(1,), (2,), (3,), (4,), (1, 2, 3, 4)]
    assert [(x[2], x[3]) for x in seen[::5]] == [(0, 24), (25, 49), (50, 74), (75, 99), (0, 99)]
    assert [x[0] for x in seen[::5]] == [1, 2, 3, 4, 5]  # exclusive: the final phase is N+1
    assert s.full_from_step == 21


def test_random_order_stages_follow_the_seeded_permutation():
    s = sampler(100, 5, "random", stage_steps=1, seed=3, cumulative=False)
    expected = [k + 1 for k in stage_order("random", 5, seed=3)]
    got = [tuple(x[1]) for x in run_fixed(s, 5)]
    assert got == [(k,) for k in expected]


def test_none_is_uniform_from_the_start():
    s = sampler(1000, 4, "none", stage_steps=1)
    assert s.in_final_phase and s.stage == 1 and s.active_ranges == [(0, 1000)]  # one stage, the final phase
    assert s.full_from_step == 1 and len(s.stages()) == 1
    s.advance()
    assert s.active_ranges == [(0, 1000)]


def test_random_exclusive_ranges_are_merged_only_when_adjacent():
    assert merge_ranges([(50, 75), (0, 25), (25, 50)]) == [(0, 75)]
    assert merge_ranges([(0, 25), (50, 75)]) == [(0, 25), (50, 75)]


# ----------------------------------------------------------------- sampling


def test_samples_stay_in_active_set_and_are_uniform_over_it():
    s = sampler(100, 4, "random", seed=1, stage_steps=1000, cumulative=True)
    for _ in range(2):  # two stages: a union of two non-adjacent clusters is possible
        s.stage_index += 1
        s._refresh()
    active = torch.cat([torch.arange(lo, hi) for lo, hi in s.active_ranges])
    t = s.sample(60_000)
    assert torch.isin(t, active).all()
    counts = torch.bincount(t, minlength=100)[active]
    assert chisquare(counts.numpy()).pvalue > 1e-3  # uniform over every active timestep


def test_sample_device_and_dtype():
    s = sampler(1000, 4)
    t = s.sample(16, device="cpu")
    assert t.dtype == torch.long and t.shape == (16,)


def test_cluster_of_maps_timesteps_to_their_cluster():
    s = sampler(1000, 4)
    t = torch.tensor([0, 249, 250, 999])
    assert s.cluster_of(t).tolist() == [0, 0, 1, 3]


# ----------------------------------------------------------------- patience pacing


def test_patience_advances_after_tau_steps_without_improvement():
    s = sampler(100, 3, "easy-to-hard", pacing="patience", patience=30, smoothing=0.5, sync_every=1)
    for _ in range(50):  # improving loss: no advance
        s.advance(1.0 / (1 + s.step))
    assert s.stage == 1
    steps_flat = 0
    while s.stage == 1:
        s.advance(1.0)  # flat: patience runs out
        steps_flat += 1
    assert 30 <= steps_flat <= 32
    assert s.stage == 2 and s.pacer.since_best == 0 and s.pacer.best is None  # fresh patience per stage


def _reference_patience_changes(losses, tau, smoothing, min_delta=0.0):
    """Stage changes (steps done) of patience pacing computed step by step, independently of the
    sampler: a bias-corrected EMA, a best, and a count of steps since it improved."""
    changes, raw, weight, best, since = [], 0.0, 0.0, None, 0
    for step, loss in enumerate(losses, start=1):
        raw, weight = smoothing * raw + (1 - smoothing) * loss, smoothing * weight + (1 - smoothing)
        value = raw / weight
        if best is None or value < best * (1 - min_delta):
            best, since = value, 0
        else:
            since += 1
        if since >= tau:
            changes.append(step)
            raw, weight, best, since = 0.0, 0.0, None, 0
    return changes


def _loss_trace(n=1500):
    """Improves, plateaus, improves again; with small wiggles so that the EMA's best moves."""
    g = torch.Generator().manual_seed(0)
    base = [1.0 / (1 + 0.01 * (i % 400)) for i in range(n)]
    return [b + 0.02 * float(torch.rand((), generator=g)) for b in base]


@pytest.mark.parametrize("tau", [3, 25])
def test_patience_decides_at_exactly_tau_steps_with_batched_reductions(tau):
    losses = _loss_trace()
    expected = _reference_patience_changes(losses, tau, smoothing=0.9)
    s = sampler(1000, 40, "easy-to-hard", pacing="patience", patience=tau, smoothing=0.9, sync_every=10)
    changes = []
    for loss in losses:
        if s.in_final_phase:
            break
        if s.advance(loss):
            changes.append(s.step)
    assert len(changes) >= 3 and changes == expected[: len(changes)]
    assert any(c % 10 for c in changes)  # decisions fall between the every-10-steps reductions


def test_max_stage_steps_caps_a_patience_stage():
    s = sampler(1000, 4, "easy-to-hard", pacing="patience", patience=10_000, max_stage_steps=7)
    for i in range(40):
        s.advance(1.0 / (1 + i))  # always improving: only the cap ends a stage
    assert s.realised_lengths() == [7, 7, 7] and s.full_from_step == 22
    assert s.latest_full_from_step == 22


def test_patience_full_from_step_is_unknown_until_reached_then_realised():
    s = sampler(1000, 3, "easy-to-hard", pacing="patience", patience=5, smoothing=0.0)
    assert s.full_from_step is None and s.latest_full_from_step is None
    while not s.in_final_phase:
        s.advance(1.0)
    # the first step sets the best; the stage ends after τ = 5 steps that do not improve on it
    assert s.realised_lengths() == [6, 6] and s.full_from_step == 13


# ----------------------------------------------------------------- shuffled: the allocation control


def _analytic_allocation(n, cumulative, stage_steps, timesteps=1000):
    """Cluster k's share of easy-to-hard's draws before every timestep is active, from uniform
    clusters of equal width: stage s (1-based) of the curriculum holds the top s clusters
    (cumulative) or only cluster N-s+1."""
    stages = range(1, n) if cumulative else range(1, n + 1)
    shares = [0.0] * n
    for s in stages:
        active = list(range(n - s, n)) if cumulative else [n - s]
        for k in active:
            shares[k] += 1 / len(active) / len(stages)
    return shares


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("cumulative", [True, False])
def test_shuffled_draws_match_easy_to_hard_allocation(n, cumulative):
    s = sampler(1000, n, "shuffled", stage_steps=40, cumulative=cumulative)
    twin = sampler(1000, n, "easy-to-hard", stage_steps=40, cumulative=cumulative)
    assert [st.number for st in s.stages()] == [1, 2] and s.stages()[-1].final
    assert s.full_from_step == twin.full_from_step == 1 + 40 * (n - 1 if cumulative else n)
    expected = _analytic_allocation(n, cumulative, 40)
    draws = 100_000
    counts = torch.bincount(s.cluster_of(s.sample(draws)), minlength=n).double()
    drawn = [k for k in range(n) if expected[k] > 0]
    assert all(counts[k] == 0 for k in range(n) if expected[k] == 0)  # cumulative: C1 waits for the end
    assert chisquare(counts[drawn].numpy(), [draws * expected[k] for k in drawn]).pvalue > 1e-3
    # the same counts, step by step, from the curriculum itself over the same span
    while not twin.in_final_phase:
        twin.advance()
    for _ in range(twin.full_from_step - 1):
        s.advance()
    assert s.in_final_phase and s.active_ranges == [(0, 1000)]


def test_shuffled_under_patience_needs_the_reference_lengths():
    with pytest.raises(ValueError, match="curriculum.reference"):
        sampler(1000, 4, "shuffled", pacing="patience")
    with pytest.raises(ValueError, match="curriculum.reference"):  # named, but its lengths not given
        sampler(1000, 4, "shuffled", pacing="patience", reference="schedule.json")
    # the lengths given stand for what the reference's file holds (from_config reads it)
    s = sampler(1000, 4, "shuffled", pacing="patience", reference="schedule.json", reference_lengths=[10, 30, 60])
    assert s.full_from_step == 101
    shares = s.stages()[0].shares  # stage lengths weight the allocation: C4 in all three, C2 only the last
    assert shares[0] == 0 and shares[1] == pytest.approx(0.6 / 3)
    assert shares[3] == pytest.approx(0.1 + 0.3 / 2 + 0.6 / 3)


def test_degenerate_clusterings_are_named():
    from trainables.diffusion.diffusion import GaussianDiffusion

    cosine = GaussianDiffusion(1000, "cosine").log_snr()
    narrow = sampler(1000, 20, clustering="log-snr", log_snr=cosine)
    warning = degenerate_warning(narrow, "cosine")
    assert warning and "log-snr on the cosine schedule with N=20" in warning and "1 timestep(s)" in warning
    assert degenerate_warning(sampler(1000, 20), "linear") is None


def test_fixed_pacing_ignores_loss():
    s = sampler(100, 2, "easy-to-hard", pacing="fixed", stage_steps=3)
    for _ in range(3):
        s.advance(123.0)
    assert s.stage == 2


# ----------------------------------------------------------------- checkpoint and resume


@pytest.mark.parametrize("pacing", ["fixed", "patience"])
def test_resume_mid_stage_gives_the_same_future(pacing):
    def make():
        return sampler(1000, 5, "random", pacing=pacing, stage_steps=7, patience=9, seed=5,
                                 smoothing=0.9, sync_every=3)

    losses = [1.0 / (1 + (i % 13)) for i in range(200)]
    a = make()
    for i in range(23):
        a.sample(8)
        a.advance(losses[i])
    state = copy.deepcopy(a.state_dict())
    future_a = []
    for i in range(23, 120):
        future_a.append((a.sample(8).tolist(), a.stage))
        a.advance(losses[i])

    b = make()
    b.load_state_dict(torch.load(_roundtrip(state), weights_only=False))
    future_b = []
    for i in range(23, 120):
        future_b.append((b.sample(8).tolist(), b.stage))
        b.advance(losses[i])
    assert future_a == future_b
    assert len({st for _, st in future_a}) > 1  # the window crosses a stage change


def test_every_rank_resumes_its_own_stream_from_rank_0s_state():
    """Only rank 0 writes the checkpoint; every rank (on any worker count) must continue its own
    draws, not rank 0's."""
    def make(rank):
        return sampler(1000, 4, "easy-to-hard", stage_steps=10, seed=3, rank=rank)

    uninterrupted = {}
    for rank in range(3):
        s = make(rank)
        for _ in range(15):
            s.sample(4)
            s.advance()
        uninterrupted[rank] = [s.sample(16).tolist()]
    writer = make(0)
    for _ in range(15):
        writer.sample(4)
        writer.advance()
    state = torch.load(_roundtrip(writer.state_dict()), weights_only=False)
    for rank in range(3):
        resumed = make(rank)
        resumed.load_state_dict(state)
        assert [resumed.sample(16).tolist()] == uninterrupted[rank], rank
    assert uninterrupted[1] != uninterrupted[0]


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_state_from_another_curriculum_is_refused():
    a = sampler(100, 4)
    b = sampler(100, 5)
    with pytest.raises(ValueError, match="different curriculum"):
        b.load_state_dict(a.state_dict())


# ----------------------------------------------------------------- DDP: identical decisions


def _patience_rank(rank, world, rendezvous, out_dir):
    # A file, not a free port: a port found free can be taken before the rank binds it (seen in CI).
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    s = sampler(1000, 4, "easy-to-hard", pacing="patience", patience=20, smoothing=0.8, rank=rank)
    trace = []
    for step in range(400):
        # Each rank sees a different local loss: noisy, and on rank 1 biased and flatter.
        local = (1.0 if rank == 0 else 1.7) / (1 + 0.02 * step) + 0.3 * torch.rand(()).item()
        s.advance(torch.tensor(local))
        trace.append(s.stage)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"trace": trace, "t": s.sample(4).tolist()}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_patience_decisions_are_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_patience_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["trace"] == r1["trace"]
    assert r0["trace"][-1] > 1  # the stage really advanced
    assert r0["t"] != r1["t"]  # yet each rank draws its own timesteps
