"""What t is drawn from inside a stage's active set: the timestep-sampling baselines behind the
curriculum sampler (`curriculum.distribution`).

uniform             the paper's: every active t alike.
logit-normal        SD3's (Esser et al. 2024): t = ⌊sigmoid(m + s·z)·T⌋, z ~ N(0, 1), renormalised
                    over the active t. No reweighting: changing where training looks is the point.
speed               SpeeD's asymmetric sampling (Wang et al., CVPR 2025; class `Speed` below):
                    fewer draws past τ, where the forward process has converged, each draw
                    mirrored about the schedule's "meaningful step". No reweighting here: its
                    change-aware weighting is `loss.weighting: speed` (diffusion.py).
loss-second-moment  improved-diffusion's importance sampler (Nichol & Dhariwal 2021): per t a
                    history of the last K squared losses; once every active t has K of them,
                    p(t) ∝ sqrt(E[loss²]) mixed with 0.1% uniform; the loss is weighted by
                    1 / (|active| · p(t)) so that its expectation is the uniform one. Every rank
                    updates the histories with every rank's (t, loss), so all agree.

A distribution gives `probs(active)` over all T (None = uniform over `active`); the sampler
draws with them and the train loop weights the loss with `importance(t)`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from trainables.diffusion.config import SPEED_K, SPEED_TAU, CurriculumConfig

DISTRIBUTIONS = ("uniform", "logit-normal", "speed", "loss-second-moment")

# SpeeD's defaults: trainables/diffusion/config.py names their file and commit. The meaningful
# step's threshold is the repository's, 1e-4.
SPEED_GRADIENT_THRESHOLD = 1e-4


def speed_meaningful_step(alphas_cumprod: torch.Tensor) -> int:
    """SpeeD's meaningful step m (Speed_IDDPM.__init__): one past the first t at which
    √(1 − ᾱ_t) grows by less than 1e-4 per step (np.gradient: central differences, one-sided at
    the ends), i.e. where the forward process has all but converged; 1 if it never does."""
    grad = torch.gradient(torch.sqrt(1.0 - alphas_cumprod.double()))[0]
    below = (grad < SPEED_GRADIENT_THRESHOLD).nonzero()
    return int(below[0]) + 1 if len(below) else 1


class Uniform:
    name = "uniform"
    learns = False

    def probs(self, active: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LogitNormal:
    """P(t) = Φ((logit((t+1)/T) − m)/s) − Φ((logit(t/T) − m)/s): the exact mass of
    ⌊sigmoid(m + s·z)·T⌋ = t, restricted to the active set and renormalised."""

    name = "logit-normal"
    learns = False

    def __init__(self, timesteps: int, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError("logit-normal needs std > 0")
        edges = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        logit = torch.log(edges) - torch.log1p(-edges)  # -inf at 0, +inf at 1
        cdf = 0.5 * (1 + torch.erf((logit - mean) / (std * math.sqrt(2))))
        self.mass = (cdf[1:] - cdf[:-1]).clamp(min=0)

    def probs(self, active: torch.Tensor) -> torch.Tensor:
        p = torch.zeros_like(self.mass)
        p[active] = self.mass[active]
        if float(p.sum()) <= 0:  # an active set far in a tail: the mass underflowed
            p[active] = 1.0
        return p / p.sum()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Speed:
    """SpeeD's timestep sampling (Speed_IDDPM._sample_time, `sampling: ours`, at the commit
    above): p(t) ∝ k for t < τ·T and 1 from there; each batch draws half its t from p and pairs
    each with its dual, m − t below the meaningful step m (`speed_meaningful_step`) and t − m from
    it. Here the batch's t are drawn i.i.d. from that draw's marginal, q = ½ p + ½ (p pushed
    through the dual): the same distribution of t, without the pairing inside one batch (every
    distribution here is a `probs(active)` the curriculum sampler draws from), restricted to the
    active set and renormalised like the others."""

    name = "speed"
    learns = False

    def __init__(self, timesteps: int, log_snr: torch.Tensor, k: float = SPEED_K, tau: float = SPEED_TAU):
        alphas_cumprod = torch.sigmoid(log_snr.double())  # ᾱ = SNR / (1 + SNR)
        self.meaningful_step = speed_meaningful_step(alphas_cumprod)
        self.tau_step = round(tau * timesteps)
        p = torch.ones(timesteps, dtype=torch.float64)
        p[: self.tau_step] = k
        p = p / p.sum()
        t = torch.arange(timesteps)
        m = self.meaningful_step
        # m − 0 = m is past the last t when m = T: the repository would index out of range there.
        dual = torch.where(t < m, m - t, t - m).clamp(max=timesteps - 1)
        self.mass = 0.5 * p
        self.mass.index_add_(0, dual, 0.5 * p)

    def probs(self, active: torch.Tensor) -> torch.Tensor:
        q = torch.zeros_like(self.mass)
        q[active] = self.mass[active]
        if float(q.sum()) <= 0:  # an active set SpeeD never draws from
            q[active] = 1.0
        return q / q.sum()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMoment:
    name = "loss-second-moment"
    learns = True

    def __init__(self, timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.timesteps, self.history, self.uniform_prob = timesteps, history, uniform_prob
        self.losses = torch.zeros(timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(timesteps, dtype=torch.long)

    def warmed_up(self, active: torch.Tensor) -> bool:
        return bool((self.counts[active] >= self.history).all())

    def probs(self, active: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.warmed_up(active):
            return None  # uniform until every active t has a full history
        weights = torch.zeros(self.timesteps, dtype=torch.float64)
        weights[active] = self.losses[active].pow(2).mean(dim=1).sqrt()
        p = weights / weights.sum()
        p[active] = p[active] * (1 - self.uniform_prob) + self.uniform_prob / len(active)
        return p

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Every rank's (t, loss) of one step, in rank order, into the histories."""
        t, losses = _gather(t), _gather(losses.double())
        for ti, li in zip(t.cpu().tolist(), losses.cpu().tolist()):
            if self.counts[ti] >= self.history:  # drop the oldest
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.counts = state["losses"].double().clone(), state["counts"].long().clone()


def _gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def make_distribution(config: "CurriculumConfig", timesteps: int, log_snr: Optional[torch.Tensor] = None):
    """The distribution `config.distribution` names, with its settings from `config` (a
    CurriculumConfig); `log_snr`: the schedule's ln SNR at each t, which `speed` needs."""
    name = config.distribution
    if name == "uniform":
        return Uniform()
    if name == "logit-normal":
        return LogitNormal(timesteps, config.logit_mean, config.logit_std)
    if name == "speed":
        if log_snr is None or len(log_snr) != timesteps:
            raise ValueError(f"the speed distribution needs the schedule's ln SNR for all {timesteps} timesteps")
        return Speed(timesteps, log_snr, config.speed_k, config.speed_tau)
    if name == "loss-second-moment":
        return LossSecondMoment(timesteps)
    raise ValueError(f"unknown distribution {name!r}; choose one of {', '.join(DISTRIBUTIONS)}")
