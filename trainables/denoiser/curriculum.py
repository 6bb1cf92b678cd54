"""The easy-to-hard timestep curriculum of Kim et al. (ICLR 2025), and the variants we search.

Timesteps [0, T) are split into N clusters C1..CN, C1 the lowest noise (hardest to denoise),
CN the highest (easiest). A `CurriculumSampler` is asked for timesteps each step, like
improved-diffusion's `ScheduleSampler.sample`; `advance()` moves it one training step on and
decides when the next cluster joins. Pure PyTorch: no Ray, no diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional, Sequence

import torch
import torch.distributed as dist

ORDERS = ("none", "easy-to-hard", "hard-to-easy", "random", "measured")
CLUSTERINGS = ("uniform", "log-snr", "quantile")
PACINGS = ("fixed", "patience")

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


# --------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class Stage:
    number: int  # 1..N for curriculum stages, N+1 for the final all-timesteps phase
    clusters: tuple[int, ...]  # 1-based cluster numbers, C1 hardest
    ranges: tuple[tuple[int, int], ...]  # merged half-open timestep intervals

    final: bool = False  # the all-timesteps phase after the curriculum


class CurriculumSampler:
    """Draws timesteps uniformly from the active clusters and paces the stages.

    Stages 1..N follow `order`; stage n trains on the union of the first n clusters of the
    order (cumulative) or on the n-th alone. After stage N comes ordinary training on all
    timesteps (stage N+1). `order="none"` starts in that phase: the uniform baseline.
    """

    def __init__(
        self,
        timesteps: int,
        num_clusters: int,
        order: str = "easy-to-hard",
        clustering: str = "uniform",
        pacing: str = "fixed",
        stage_steps: int = 100,
        patience: int = 200,
        cumulative: bool = True,
        smoothing: float = 0.99,
        min_delta: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        log_snr: Optional[torch.Tensor] = None,
        sync_every: int = 10,
        ranking: Optional[Sequence[int]] = None,
    ):
        if pacing not in PACINGS:
            raise ValueError(f"unknown pacing {pacing!r}; choose one of {', '.join(PACINGS)}")
        if stage_steps < 1 or patience < 1:
            raise ValueError("stage_steps and patience must be ≥ 1")
        self.timesteps = timesteps
        self.edges = cluster_edges(timesteps, num_clusters, clustering, log_snr)
        self.num_clusters = num_clusters
        self.order_name = order
        self.order = stage_order(order, num_clusters, seed, ranking)
        self.pacing, self.stage_steps, self.patience = pacing, stage_steps, patience
        self.cumulative, self.smoothing, self.min_delta = cumulative, smoothing, min_delta
        self.seed, self.rank, self.sync_every = seed, rank, max(1, sync_every)
        self._edges_t = torch.tensor(self.edges[1:-1], dtype=torch.long)
        # Mutable state: everything here goes into the checkpoint.
        self.step = 0
        self.stage_index = 0 if self.order else len(self.order)  # index into order; len = final
        self.stage_started = 0
        self.smoothed: Optional[float] = None  # bias-corrected EMA of the all-reduced loss
        self._ema_raw, self._ema_weight = 0.0, 0.0
        self.best: Optional[float] = None
        self.since_best = 0
        self._pending = None  # on-device sum of local losses since the last sync
        self._pending_n = 0
        self.generator = torch.Generator()
        self._reseed()
        self._refresh()

    # ----------------------------------------------------------------- what is active

    @property
    def clusters(self) -> list[tuple[int, int]]:
        return [(self.edges[k], self.edges[k + 1]) for k in range(self.num_clusters)]

    @property
    def in_final_phase(self) -> bool:
        return self.stage_index >= len(self.order)

    @property
    def stage(self) -> int:
        """1-based stage number; N+1 in the final all-timesteps phase (from step 0 for `none`)."""
        return self.stage_index + 1 if not self.in_final_phase else self.num_clusters + 1

    def stage_at(self, index: int) -> Stage:
        if index >= len(self.order):
            return Stage(self.num_clusters + 1, tuple(range(1, self.num_clusters + 1)), ((0, self.timesteps),), True)
        chosen = self.order[: index + 1] if self.cumulative else [self.order[index]]
        clusters = tuple(sorted(k + 1 for k in chosen))
        ranges = tuple(merge_ranges([(self.edges[k], self.edges[k + 1]) for k in chosen]))
        return Stage(index + 1, clusters, ranges)

    def stages(self) -> list[Stage]:
        """Every stage in order, the final all-timesteps phase last."""
        return [self.stage_at(i) for i in range(len(self.order) + 1)]

    def _refresh(self) -> None:
        current = self.stage_at(self.stage_index)
        self.active_ranges = list(current.ranges)
        self.active_clusters = list(current.clusters)
        self._active_t = torch.cat([torch.arange(lo, hi) for lo, hi in self.active_ranges])

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
        self.generator.manual_seed((self.seed * 1_000_003 + self.rank) * 10_000_019 + self.step)

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`batch_size` timesteps drawn uniformly from the active set."""
        idx = torch.randint(self._active_t.numel(), (batch_size,), generator=self.generator)
        t = self._active_t[idx]
        return t.to(device, non_blocking=True) if device is not None else t

    # ----------------------------------------------------------------- pacing

    def advance(self, loss: Optional[torch.Tensor | float] = None) -> bool:
        """One training step done (with its mean local loss, for patience). True if the stage changed."""
        self.step += 1
        changed = False
        if not self.in_final_phase:
            if self.pacing == "fixed":
                if self.step - self.stage_started >= self.stage_steps:
                    changed = self._next_stage()
            elif loss is not None:
                changed = self._observe(loss)
        self._reseed()
        return changed

    def _observe(self, loss: torch.Tensor | float) -> bool:
        loss = loss.detach().float().reshape(()) if torch.is_tensor(loss) else torch.tensor(float(loss))
        self._pending = loss if self._pending is None else self._pending + loss.to(self._pending.device)
        self._pending_n += 1
        if self._pending_n < self.sync_every:
            return False
        # The decision must be identical on every DDP rank: decide from the all-reduced mean.
        mean = self._pending / self._pending_n
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.SUM)
            mean = mean / dist.get_world_size()
        n, value = self._pending_n, float(mean)
        self._pending, self._pending_n = None, 0
        decay = self.smoothing**n
        self._ema_raw = decay * self._ema_raw + (1 - decay) * value
        self._ema_weight = decay * self._ema_weight + (1 - decay)
        self.smoothed = self._ema_raw / self._ema_weight
        if self.best is None or self.smoothed < self.best * (1 - self.min_delta):
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += n
        if self.since_best >= self.patience:
            return self._next_stage()
        return False

    def _next_stage(self) -> bool:
        self.stage_index += 1
        self.stage_started = self.step
        # A new cluster changes the loss's scale: patience starts afresh for the new stage.
        self._ema_raw, self._ema_weight, self.smoothed = 0.0, 0.0, None
        self.best, self.since_best = None, 0
        self._pending, self._pending_n = None, 0
        self._refresh()
        return True

    def fixed_schedule(self) -> list[tuple[Stage, int, Optional[int]]]:
        """(stage, start_step, end_step) under fixed pacing; end None for the open final phase."""
        out = []
        for i, st in enumerate(self.stages()):
            final = i >= len(self.order)
            start = i * self.stage_steps
            out.append((st, start, None if final else start + self.stage_steps))
        return out

    # ----------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        pending = None if self._pending is None else float(self._pending)
        return {
            "step": self.step,
            "stage_index": self.stage_index,
            "stage_started": self.stage_started,
            "ema_raw": self._ema_raw,
            "ema_weight": self._ema_weight,
            "smoothed": self.smoothed,
            "best": self.best,
            "since_best": self.since_best,
            "pending": pending,
            "pending_n": self._pending_n,
            "edges": list(self.edges),
            "order": list(self.order),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["edges"]) != self.edges or list(state["order"]) != self.order:
            raise ValueError("checkpoint was written by a different curriculum (clusters or order differ)")
        self.step, self.stage_index = int(state["step"]), int(state["stage_index"])
        self.stage_started = int(state["stage_started"])
        self._ema_raw, self._ema_weight = state["ema_raw"], state["ema_weight"]
        self.smoothed, self.best, self.since_best = state["smoothed"], state["best"], int(state["since_best"])
        self._pending = None if state["pending"] is None else torch.tensor(state["pending"])
        self._pending_n = int(state["pending_n"])
        # Not the saved generator: that is the writing rank's (rank 0's). The stream is a function
        # of (seed, rank, step), so reseeding gives each rank its own, exactly where it left off.
        self._reseed()
        self._refresh()


def measured_ranking(path: str, measure: str, num_clusters: int) -> list[int]:
    """The clusters of a difficulty probe's file, easiest first by `measure` (0-based)."""
    from trainables.difficulty_probe.difficulty import load_difficulty, ranking

    return ranking(load_difficulty(path), measure, num_clusters)


def from_config(curriculum, diffusion_timesteps: int, log_snr=None, rank: int = 0) -> CurriculumSampler:
    """Build the sampler from a `CurriculumConfig` (pydantic) section."""
    ranking = None
    if curriculum.order == "measured":
        ranking = measured_ranking(curriculum.difficulty, curriculum.difficulty_measure, curriculum.num_clusters)
    return CurriculumSampler(
        timesteps=diffusion_timesteps,
        num_clusters=curriculum.num_clusters,
        order=curriculum.order,
        clustering=curriculum.clustering,
        pacing=curriculum.pacing,
        stage_steps=curriculum.stage_steps,
        patience=curriculum.patience,
        cumulative=curriculum.cumulative,
        smoothing=curriculum.smoothing,
        min_delta=curriculum.min_delta,
        seed=curriculum.seed,
        rank=rank,
        log_snr=log_snr,
        ranking=ranking,
    )
