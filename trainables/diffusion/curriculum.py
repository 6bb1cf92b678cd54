"""The easy-to-hard timestep curriculum of Kim et al. (ICLR 2025), and the variants we search.

Timesteps [0, T) are split into N clusters C1..CN, C1 the lowest noise (hardest to denoise),
CN the highest (easiest). A `CurriculumSampler` is asked for timesteps each step, like
improved-diffusion's `ScheduleSampler.sample`; `advance()` moves it one training step on and
decides when the next cluster joins. Pure PyTorch: no Ray, no diffusers. What it does is a
`CurriculumConfig` (trainables/diffusion/config.py), which holds every field, default and check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional, Sequence, get_args

import torch
import torch.distributed as dist

from trainables.diffusion.config import Clustering, CurriculumConfig, Order, Pacing
from trainables.diffusion.distributions import make_distribution

ORDERS, CLUSTERINGS, PACINGS = get_args(Order), get_args(Clustering), get_args(Pacing)

# EDM's training distribution of ln σ (Karras et al. 2022): N(P_mean, P_std²).
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


# --------------------------------------------------------------------------- clustering


def _strictly_increasing(edges: Sequence[float], timesteps: int) -> list[int]:
    """Round cut points to integers, keeping every cluster non-empty (N ≤ T guarantees room)."""
    n = len(edges) - 1
    out = [0] + [int(round(e)) for e in edges[1:-1]] + [timesteps]
    for k in range(1, n):  # push up: at least one timestep per cluster from the left
        out[k] = max(out[k], out[k - 1] + 1)
    for k in range(n - 1, 0, -1):  # push down: leave room for the clusters on the right
        out[k] = min(out[k], out[k + 1] - 1)
    return out


def cut_by_decreasing_value(values: torch.Tensor, levels: Sequence[float]) -> list[int]:
    """For a decreasing per-timestep quantity, the first t whose value falls below each level."""
    v = values.double().flip(0)  # increasing, so searchsorted applies
    t = values.numel()
    return [t - int(torch.searchsorted(v, float(lv), right=False)) for lv in levels]


def cluster_edges(
    timesteps: int,
    num_clusters: int,
    clustering: str = "uniform",
    log_snr: Optional[torch.Tensor] = None,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
) -> list[int]:
    """Edges e_0=0 < e_1 < … < e_N=T; cluster k (1-based) is [e_{k-1}, e_k).

    uniform   equal timestep intervals (the paper's discrete-time setting).
    log-snr   equal intervals of ln SNR(t) of the schedule in use (`log_snr`, length T).
    quantile  equal probability mass of EDM's training noise distribution, ln σ ~ N(P_mean, P_std²)
              (the paper's continuous setting), mapped onto the timesteps through σ_t = e^{-λ_t/2}.
    """
    if not 1 <= num_clusters <= timesteps:
        raise ValueError(f"num_clusters must be in [1, {timesteps}], got {num_clusters}")
    n = num_clusters
    if clustering == "uniform":
        raw = [k * timesteps / n for k in range(n + 1)]
    elif clustering in ("log-snr", "quantile"):
        if log_snr is None or log_snr.numel() != timesteps:
            raise ValueError(f"{clustering} clustering needs the schedule's ln SNR for all {timesteps} timesteps")
        if clustering == "log-snr":
            hi, lo = float(log_snr[0]), float(log_snr[-1])
            levels = [hi - k * (hi - lo) / n for k in range(1, n)]
            raw = [0, *cut_by_decreasing_value(log_snr, levels), timesteps]
        else:
            # ln σ = -λ/2 increases with t; equal-mass cut points of ln σ become λ levels.
            ln_sigma_cuts = sigma_quantile_log_edges(n, p_mean, p_std)[1:-1]
            levels = [-2.0 * s for s in ln_sigma_cuts]
            raw = [0, *cut_by_decreasing_value(log_snr, levels), timesteps]
    else:
        raise ValueError(f"unknown clustering {clustering!r}; choose one of {', '.join(CLUSTERINGS)}")
    return _strictly_increasing(raw, timesteps)


def sigma_quantile_log_edges(num_clusters: int, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> list[float]:
    """ln σ cut points giving N clusters of equal mass under N(p_mean, p_std²) (ends ±inf).

    This is the EDM (continuous σ) form of the clustering; a sampler over σ uses it directly.
    """
    nd = NormalDist(p_mean, p_std)
    return [-math.inf, *(nd.inv_cdf(k / num_clusters) for k in range(1, num_clusters)), math.inf]


# --------------------------------------------------------------------------- order


def stage_order(order: str, num_clusters: int, seed: int = 0, ranking: Optional[Sequence[int]] = None) -> list[int]:
    """0-based cluster indices in the order the stages introduce them (index 0 = C1, hardest).
    `measured` takes `ranking`: a difficulty probe's clusters, easiest first."""
    n = num_clusters
    if order == "measured":
        if ranking is None or sorted(ranking) != list(range(n)):
            raise ValueError(f"order 'measured' needs a ranking of all {n} clusters, got {ranking}")
        return list(ranking)
    if order == "easy-to-hard":
        return list(range(n - 1, -1, -1))
    if order == "hard-to-easy":
        return list(range(n))
    if order == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g).tolist()
    if order == "none":
        return []
    raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# --------------------------------------------------------------------------- pacing


class FixedPacing:
    """Every curriculum stage lasts `stage_steps` steps."""

    name = "fixed"
    wants_loss = False

    def __init__(self, stage_steps: int):
        self.stage_steps = stage_steps

    @property
    def longest_stage(self) -> int:
        return self.stage_steps

    def stage_done(self, steps_in_stage: int, loss=None) -> bool:
        return steps_in_stage >= self.stage_steps

    def start_stage(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PatiencePacing:
    """A stage ends after exactly τ consecutive steps in which the bias-corrected EMA of the
    (all-reduced) loss did not improve on its best, or at `max_stage_steps`.

    The DDP all-reduce is batched: per-step losses wait on the device and are reduced together at
    most every `sync_every` steps, then replayed one by one. The next reduction is never later
    than the first step at which τ could be reached (τ − steps already without improvement), so a
    decision falls on the exact step an unbatched reduction would give, on every rank alike.
    """

    name = "patience"
    wants_loss = True

    def __init__(self, patience: int, smoothing: float, min_delta: float, max_stage_steps: Optional[int],
                 sync_every: int):
        self.patience, self.smoothing, self.min_delta = patience, smoothing, min_delta
        self.max_stage_steps, self.sync_every = max_stage_steps, max(1, sync_every)
        self.start_stage()

    @property
    def longest_stage(self) -> Optional[int]:
        return self.max_stage_steps

    def start_stage(self) -> None:
        # A new cluster changes the loss's scale: patience starts afresh for every stage.
        self._ema_raw, self._ema_weight, self.smoothed = 0.0, 0.0, None
        self.best, self.since_best = None, 0
        self._pending: list = []

    @property
    def _due(self) -> int:
        return min(self.sync_every, self.patience - self.since_best)

    def stage_done(self, steps_in_stage: int, loss=None) -> bool:
        if self.max_stage_steps is not None and steps_in_stage >= self.max_stage_steps:
            return True  # a function of the step count alone: every rank agrees without a reduction
        if loss is None:
            raise ValueError("patience pacing needs the step's loss")
        self._pending.append(loss.detach().float().reshape(()) if torch.is_tensor(loss) else torch.tensor(float(loss)))
        if len(self._pending) < self._due:
            return False
        values = torch.stack([v.to(self._pending[0].device) for v in self._pending])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / dist.get_world_size()
        self._pending = []
        done = False
        for value in values.cpu().double().tolist():
            done = self._observe(value)
        return done

    def _observe(self, value: float) -> bool:
        self._ema_raw = self.smoothing * self._ema_raw + (1 - self.smoothing) * value
        self._ema_weight = self.smoothing * self._ema_weight + (1 - self.smoothing)
        self.smoothed = self._ema_raw / self._ema_weight
        if self.best is None or self.smoothed < self.best * (1 - self.min_delta):
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"ema_raw": self._ema_raw, "ema_weight": self._ema_weight, "smoothed": self.smoothed,
                "best": self.best, "since_best": self.since_best,
                "pending": [float(v) for v in self._pending]}

    def load_state_dict(self, state: dict) -> None:
        self._ema_raw, self._ema_weight = state["ema_raw"], state["ema_weight"]
        self.smoothed, self.best, self.since_best = state["smoothed"], state["best"], int(state["since_best"])
        self._pending = [torch.tensor(v) for v in state["pending"]]


def make_pacing(config: CurriculumConfig, sync_every: int):
    """The pacing strategy `config.pacing` names, from its fields (their checks are the config's);
    `sync_every`: the most steps patience's losses wait for their DDP all-reduce."""
    if config.pacing == "fixed":
        return FixedPacing(config.stage_steps)
    if config.pacing == "patience":
        return PatiencePacing(config.patience, config.smoothing, config.min_delta, config.max_stage_steps, sync_every)
    raise ValueError(f"unknown pacing {config.pacing!r}; choose one of {', '.join(PACINGS)}")


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    number: int  # 1-based; the last stage of a plan is the final all-timesteps phase
    clusters: tuple[int, ...]  # 1-based cluster numbers that can be drawn, C1 hardest
    ranges: tuple[tuple[int, int], ...]  # merged half-open timestep intervals that can be drawn
    final: bool = False  # ordinary training on all timesteps, uniformly, to the end
    length: Optional[int] = None  # steps, when the stage's length is fixed whatever the pacing
    shares: Optional[tuple[float, ...]] = None  # per-cluster draw probabilities; None: uniform over `ranges`


def _curriculum_stages(order: Sequence[int], cumulative: bool, edges: Sequence[int]) -> list[tuple[tuple, tuple]]:
    """(clusters, ranges) of each stage of an ordered curriculum, stage 1 first."""
    out = []
    for i in range(len(order)):
        chosen = order[: i + 1] if cumulative else [order[i]]
        out.append((tuple(sorted(k + 1 for k in chosen)),
                    tuple(merge_ranges([(edges[k], edges[k + 1]) for k in chosen]))))
    return out


def allocation(edges: Sequence[int], stages: Sequence[tuple[tuple, tuple]], lengths: Sequence[int]) -> list[float]:
    """Each cluster's share of the draws over stages of the given lengths, t uniform over each
    stage's active set: cluster k gets Σ_s (len_s / Σlen) · |C_k ∩ A_s| / |A_s|."""
    total = sum(lengths)
    shares = [0.0] * (len(edges) - 1)
    for (clusters, ranges), length in zip(stages, lengths):
        active = sum(hi - lo for lo, hi in ranges)
        for k in clusters:
            shares[k - 1] += (length / total) * (edges[k] - edges[k - 1]) / active
    return shares


@dataclass(frozen=True)
class SamplerInputs:
    """What the sampler takes besides its config: what the config's paths name, already read
    (`from_config` reads them; tests and `references.py` give them directly), and how often
    patience pacing all-reduces its losses under DDP."""

    ranking: Optional[Sequence[int]] = None  # order measured: the probe's clusters, easiest first (0-based)
    reference_lengths: Optional[Sequence[int]] = None  # order shuffled, patience: the reference's stage lengths
    sync_every: int = 10


class CurriculumSampler:
    """Draws timesteps from the active set of the current stage and paces the stages.

    Stages follow `order`: stage n trains on the union of the first n clusters of the order
    (cumulative, so stage N is already all timesteps and is the final phase) or on the n-th alone
    (exclusive, then the final phase N+1). `none` is one stage, the final phase: the uniform
    baseline. `shuffled`, the allocation control, is one stage as long as easy-to-hard's
    curriculum with the same settings, drawing t i.i.d. from the per-cluster allocation that
    curriculum gives over that span, then the final phase.
    """

    def __init__(self, config: CurriculumConfig, timesteps: int, *, log_snr: Optional[torch.Tensor] = None,
                 rank: int = 0, inputs: Optional[SamplerInputs] = None):
        """`timesteps`: the diffusion's T; `log_snr`: its ln SNR at each t (log-snr and quantile
        clustering need it); `rank`: the DDP rank, which draws timesteps of its own."""
        inputs = inputs or SamplerInputs()
        self.config, self.timesteps, self.rank = config, timesteps, rank
        self.num_clusters, self.order_name, self.clustering = config.num_clusters, config.order, config.clustering
        self.pacing, self.cumulative = config.pacing, config.cumulative
        self.edges = cluster_edges(timesteps, config.num_clusters, config.clustering, log_snr)
        self.pacer = make_pacing(config, inputs.sync_every)
        # `shuffled` introduces no cluster of its own: its plan draws easy-to-hard's allocation.
        self.order = ([] if config.order == "shuffled"
                      else stage_order(config.order, config.num_clusters, config.seed, inputs.ranking))
        self.distribution = make_distribution(config, timesteps, log_snr)
        self._last_probs: Optional[torch.Tensor] = None
        self.plan = self._plan(inputs.reference_lengths)
        self.full_index = self._full_index()  # the plan never changes, nor does this
        self._edges_t = torch.tensor(self.edges[1:-1], dtype=torch.long)
        # Mutable state: everything here goes into the checkpoint.
        self.step = 0
        self.stage_index = 0
        self.stage_starts = [0]  # steps done when each stage reached so far began
        self.generator = torch.Generator()
        self._reseed()
        self._refresh()

    # ----------------------------------------------------------------- the plan

    def _plan(self, reference_lengths) -> list[Stage]:
        every = tuple(range(1, self.num_clusters + 1))
        full = ((0, self.timesteps),)
        if self.order_name == "shuffled":
            control = _curriculum_stages(stage_order("easy-to-hard", self.num_clusters), self.cumulative, self.edges)
            before_full = [s for s in control if s[1] != full] if self.cumulative else control
            if self.pacing == "fixed":
                lengths = [self.config.stage_steps] * len(before_full)
            elif reference_lengths is None:
                raise ValueError("order 'shuffled' with patience pacing needs the realised stage lengths of an "
                                 "easy-to-hard trial (curriculum.reference)")
            else:
                lengths = [int(x) for x in reference_lengths][: len(before_full)]
                if len(lengths) < len(before_full) or min(lengths, default=1) < 1:
                    raise ValueError(f"order 'shuffled' needs {len(before_full)} positive stage lengths from its "
                                     f"reference, got {list(reference_lengths)}")
            if not lengths:
                return [Stage(1, every, full, final=True)]
            shares = allocation(self.edges, before_full[: len(lengths)], lengths)
            drawn = tuple(k for k in every if shares[k - 1] > 0)
            ranges = tuple(merge_ranges([(self.edges[k - 1], self.edges[k]) for k in drawn]))
            return [Stage(1, drawn, ranges, length=sum(lengths), shares=tuple(shares)),
                    Stage(2, every, full, final=True)]
        stages = [Stage(i + 1, c, r) for i, (c, r) in enumerate(_curriculum_stages(self.order, self.cumulative, self.edges))]
        if self.cumulative and stages:
            last = stages[-1]
            return [*stages[:-1], Stage(last.number, last.clusters, last.ranges, final=True)]
        return [*stages, Stage(len(stages) + 1, every, full, final=True)]

    def stages(self) -> list[Stage]:
        """Every stage in order, the final all-timesteps phase last."""
        return list(self.plan)

    def _full_index(self) -> int:
        """Index of the first stage from which every timestep is drawn uniformly to the end."""
        i = len(self.plan) - 1
        while i > 0 and self.plan[i - 1].ranges == ((0, self.timesteps),) and self.plan[i - 1].shares is None:
            i -= 1
        return i

    def planned_lengths(self, latest: bool = False) -> list[Optional[int]]:
        """Length of each stage before the final one: fixed ones exactly; under patience None, or
        with `latest` the cap (`max_stage_steps`, None when uncapped)."""
        bound = self.pacer.longest_stage if (latest or self.pacing == "fixed") else None
        return [s.length if s.length is not None else bound for s in self.plan[:-1]]

    def _full_from(self, lengths) -> Optional[int]:
        before = lengths[: self.full_index]
        return None if any(x is None for x in before) else 1 + sum(before)

    @property
    def full_from_step(self) -> Optional[int]:
        """The first training step (1-based) at which every timestep is active: realised once
        reached, planned before that (None when patience decides it)."""
        if self.stage_index >= self.full_index:
            return self.stage_starts[self.full_index] + 1
        return self._full_from(self.planned_lengths())

    @property
    def latest_full_from_step(self) -> Optional[int]:
        """The latest `full_from_step` can be (from the patience cap; None when uncapped)."""
        return self._full_from(self.planned_lengths(latest=True))

    def realised_lengths(self) -> list[int]:
        """Steps each stage before the current one lasted."""
        return [b - a for a, b in zip(self.stage_starts, self.stage_starts[1:])]

    # ----------------------------------------------------------------- what is active

    @property
    def clusters(self) -> list[tuple[int, int]]:
        return [(self.edges[k], self.edges[k + 1]) for k in range(self.num_clusters)]

    @property
    def in_final_phase(self) -> bool:
        return self.stage_index >= len(self.plan) - 1

    @property
    def stage(self) -> int:
        """1-based stage number: the final phase is N for cumulative orders, N+1 for exclusive
        ones, 1 for `none`, 2 for `shuffled`."""
        return self.plan[self.stage_index].number

    def _refresh(self) -> None:
        current = self.plan[self.stage_index]
        self.active_ranges = list(current.ranges)
        self.active_clusters = list(current.clusters)
        self._active_t = torch.cat([torch.arange(lo, hi) for lo, hi in self.active_ranges])
        self._probs = None  # fixed for the stage: the shuffled allocation or a static distribution
        if current.shares is not None:
            sizes = torch.tensor([hi - lo for lo, hi in self.clusters], dtype=torch.float64)
            per_t = torch.tensor(current.shares, dtype=torch.float64) / sizes
            self._probs = per_t[self.cluster_of(torch.arange(self.timesteps))]
        elif not self.distribution.learns:
            self._probs = self.distribution.probs(self._active_t)

    @property
    def t_min(self) -> int:
        return self.active_ranges[0][0]

    @property
    def t_max(self) -> int:
        """Largest active timestep (inclusive)."""
        return self.active_ranges[-1][1] - 1

    def cluster_of(self, t: torch.Tensor) -> torch.Tensor:
        """0-based cluster index of each timestep (0 = C1)."""
        return torch.bucketize(t.cpu(), self._edges_t, right=True)

    # ----------------------------------------------------------------- sampling

    def _reseed(self) -> None:
        # Seeded from (seed, rank, step): each rank draws its own timesteps, and a resume on any
        # number of ranks continues the same stream without gathering per-rank RNG states.
        self.generator.manual_seed((self.config.seed * 1_000_003 + self.rank) * 10_000_019 + self.step)

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`batch_size` timesteps from the active set: uniformly, from the stage's allocation, or
        from the distribution (see `importance` for the loss weights that go with it)."""
        probs = self._probs
        if self.distribution.learns:
            probs = self._last_probs = self.distribution.probs(self._active_t)
        if probs is not None:
            t = torch.multinomial(probs, batch_size, replacement=True, generator=self.generator)
        else:
            t = self._active_t[torch.randint(self._active_t.numel(), (batch_size,), generator=self.generator)]
        return t.to(device, non_blocking=True) if device is not None else t

    def importance(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Loss weights 1 / (|active| · p(t)) for the timesteps `sample` just drew from a learned
        distribution (so the weighted loss's expectation is the uniform one); None otherwise."""
        if self._last_probs is None:
            return None
        p = self._last_probs.to(t.device)[t]
        return (1.0 / (self._active_t.numel() * p)).float()

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """The step's per-sample (raw) losses, for a distribution that learns from them (a
        collective under DDP: every rank calls it every step)."""
        if self.distribution.learns:
            self.distribution.update(t.detach(), losses.detach())

    # ----------------------------------------------------------------- pacing

    @property
    def wants_loss(self) -> bool:
        """Whether `advance` needs the step's loss now (patience pacing in a paced stage)."""
        return not self.in_final_phase and self.plan[self.stage_index].length is None and self.pacer.wants_loss

    def advance(self, loss: Optional[torch.Tensor | float] = None) -> bool:
        """One training step done (with its mean local loss, for patience). True if the stage changed."""
        self.step += 1
        changed = False
        if not self.in_final_phase:
            current, in_stage = self.plan[self.stage_index], self.step - self.stage_starts[-1]
            if current.length is not None:
                changed = in_stage >= current.length
            else:
                changed = self.pacer.stage_done(in_stage, loss)
            if changed:
                self.stage_index += 1
                self.stage_starts.append(self.step)
                self.pacer.start_stage()
                self._refresh()
        self._reseed()
        return changed

    def fixed_schedule(self) -> list[tuple[Stage, Optional[int], Optional[int]]]:
        """(stage, start_step, end_step) in steps done; None where patience decides, end None for
        the open final phase."""
        out, start = [], 0
        for st, length in zip(self.plan, [*self.planned_lengths(), None]):
            end = None if start is None or length is None else start + length
            out.append((st, start, None if st.final else end))
            start = end
        return out

    # ----------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "stage_index": self.stage_index,
            "stage_starts": list(self.stage_starts),
            "pacing": self.pacer.state_dict(),
            "edges": list(self.edges),
            "order": list(self.order),
            "plan": [s.number for s in self.plan],
            "distribution": self.distribution.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["edges"]) != self.edges or list(state["order"]) != self.order:
            raise ValueError("checkpoint was written by a different curriculum (clusters or order differ)")
        if "plan" not in state or list(state["plan"]) != [s.number for s in self.plan]:
            raise ValueError("checkpoint was written by a different curriculum (its stages differ: written "
                             "before stages were renumbered, or with another cumulative setting or order)")
        self.step, self.stage_index = int(state["step"]), int(state["stage_index"])
        self.stage_starts = [int(x) for x in state["stage_starts"]]
        self.pacer.start_stage()
        self.pacer.load_state_dict(state["pacing"])
        self.distribution.load_state_dict(state.get("distribution", {}))
        # Not the saved generator: that is the writing rank's (rank 0's). The stream is a function
        # of (seed, rank, step), so reseeding gives each rank its own, exactly where it left off.
        self._reseed()
        self._refresh()


def degenerate_warning(sampler: CurriculumSampler, schedule: str) -> Optional[str]:
    """One line when a cluster is too narrow to be a task of its own: fewer than
    max(2, T / (10 N)) timesteps (e.g. log-snr on the cosine schedule puts the top clusters on
    single timesteps near T)."""
    sizes = [hi - lo for lo, hi in sampler.clusters]
    floor = max(2.0, sampler.timesteps / (10 * sampler.num_clusters))
    k = min(range(len(sizes)), key=sizes.__getitem__)
    if sizes[k] >= floor:
        return None
    lo, hi = sampler.clusters[k]
    return (f"degenerate clustering: {sampler.clustering} on the {schedule} schedule with N={sampler.num_clusters} "
            f"makes C{k + 1} = [{lo}, {hi}) only {sizes[k]} timestep(s) wide (fewer than {floor:g}); "
            f"choose fewer clusters or another clustering")


def measured_ranking(path: str, measure: str, num_clusters: int) -> list[int]:
    """The clusters of a difficulty probe's file, easiest first by `measure` (0-based)."""
    from trainables.diffusion.difficulty import load_difficulty, ranking

    return ranking(load_difficulty(path), measure, num_clusters)


def from_config(curriculum: CurriculumConfig, diffusion_timesteps: int, log_snr=None,
                rank: int = 0) -> CurriculumSampler:
    """Build the sampler from a trial's `CurriculumConfig`, reading the files its paths name
    (`prepare` has resolved them to files in the storage root)."""
    ranking = None
    if curriculum.order == "measured":
        ranking = measured_ranking(curriculum.difficulty, curriculum.difficulty_measure, curriculum.num_clusters)
    reference_lengths = None
    if curriculum.order == "shuffled" and curriculum.reference:
        reference_lengths = reference_stage_lengths(curriculum.reference)
    return CurriculumSampler(curriculum, diffusion_timesteps, log_snr=log_snr, rank=rank,
                             inputs=SamplerInputs(ranking=ranking, reference_lengths=reference_lengths))


def reference_stage_lengths(path: str, raw: Optional[bytes] = None) -> list[int]:
    """The realised stage lengths in a trial's `curriculum/schedule.json` (see TrialLog.finish),
    read from `path` or from its bytes `raw`."""
    import json

    try:
        data = json.loads(raw if raw is not None else open(path, "rb").read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    lengths = data.get("realised_stage_lengths") if isinstance(data, dict) else None
    if not isinstance(lengths, list) or not all(isinstance(x, int) and x > 0 for x in lengths):
        raise ValueError(f"{path}: realised_stage_lengths must be a list of positive step counts, got {lengths!r}")
    return lengths
