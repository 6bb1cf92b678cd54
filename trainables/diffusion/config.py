"""The config sections both trainables share: data, model, diffusion, curriculum and loss. Each
is the one place for its fields, defaults and checks. Imports no torch, Ray or diffusers:
`paceray --help` and spec validation must answer in well under a second."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

Order = Literal["none", "easy-to-hard", "hard-to-easy", "random", "measured", "shuffled"]
DifficultyMeasure = Literal["convergence_steps", "kl"]
Clustering = Literal["uniform", "log-snr", "quantile"]
Pacing = Literal["fixed", "patience"]
Weighting = Literal["uniform", "min-snr", "p2", "speed"]
Dataset = Literal["digits", "fashion-mnist", "mnist", "cifar10", "imagefolder"]
Preset = Literal["tiny", "small", "base", "ddpm-cifar10"]


# SpeeD's defaults (Wang et al., CVPR 2025), from NUS-HPC-AI-Lab/SpeeD at commit
# f5650f960915e1d8c556a89a847c7eeb62b884e4, configs/ablation/base.yaml: `k: 5, lam: 0.6, tau: 700`
# for T = 1000 (Speed_IDDPM's own constructor defaults, k=1 and lam=5, would weigh some t
# negatively). τ is kept as a fraction of T, so that other T work.
SPEED_K, SPEED_TAU, SPEED_LAMBDA = 5.0, 0.7, 0.6

# The error type of a check that a path field is given: `curriculum preview` asks for the flag
# that gives it (its context names the field) instead of quoting the spec's message.
NEEDS_PATH = "needs_path"


class Section(BaseModel):
    # A typo in a spec must fail loudly, never be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: Dataset = "digits"
    image_size: int = Field(8, ge=4, le=512)
    source: Optional[str] = None  # a directory holding the raw files (IDX, CIFAR batches, a folder)
    # imagefolder: the content fingerprint of `source`, filled in by prepare (an edited folder is
    # prepared again; the workers need not read the folder to find its shards).
    fingerprint: Optional[str] = None
    class_conditional: bool = False
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)  # classifier-free guidance training


class ModelConfig(Section):
    preset: Preset = "tiny"


class DiffusionConfig(Section):
    timesteps: int = Field(1000, ge=2, le=100_000, description="Diffusion timesteps T.")
    schedule: Literal["linear", "cosine"] = Field("linear", description=(
        "Noise schedule (log-snr and quantile clustering depend on it). linear: DDPM's β 1e-4 → 0.02."))


class CurriculumConfig(Section):
    """Every field, default and check of the timestep curriculum: a trial's spec, `curriculum
    preview`'s flags and the sampler (trainables/diffusion/curriculum.py) all take it from here.
    Checks that need the diffusion timesteps (num_clusters ≤ T) are the trial config's."""

    order: Order = Field("easy-to-hard", description="The order in which clusters join the active set.")
    num_clusters: int = Field(20, ge=1, description="Clusters N of the timesteps.")
    clustering: Clustering = Field("uniform", description="How the timesteps are cut into clusters.")
    pacing: Pacing = Field("fixed", description="What ends a stage: a fixed step count, or patience.")
    stage_steps: int = Field(100, ge=1, description="Fixed pacing: steps per stage.")
    patience: int = Field(200, ge=1, description="Patience pacing: τ, steps without improvement that end a stage.")
    max_stage_steps: Optional[int] = Field(None, ge=1, description="Patience pacing: the longest a stage may run.")
    # What patience watches: the raw ε-prediction loss (comparable across loss weightings) or
    # the weighted loss the optimiser minimises.
    patience_loss: Literal["raw", "weighted"] = Field("raw", description="Patience pacing: the loss it watches.")
    # trainables/diffusion/distributions.py
    distribution: Literal["uniform", "logit-normal", "speed", "loss-second-moment"] = Field(
        "uniform", description="What t is drawn from inside the active set.")
    logit_mean: float = Field(0.0, description="logit-normal: m.")  # t = ⌊sigmoid(m + s·z)·T⌋
    logit_std: float = Field(1.0, gt=0, description="logit-normal: s.")
    # SpeeD's defaults (trainables/diffusion/distributions.py names their file and commit).
    speed_k: float = Field(SPEED_K, gt=0, description="speed: how much likelier a t below τ is than one above.")
    speed_tau: float = Field(SPEED_TAU, gt=0, le=1, description="speed: τ, as a fraction of T.")
    smoothing: float = Field(0.99, ge=0.0, lt=1.0, description="Patience pacing: the EMA of the loss it watches.")
    min_delta: float = Field(0.0, ge=0.0, description="Patience pacing: the relative improvement that counts as one.")
    cumulative: bool = Field(True, description="Stage n trains on the first n clusters of the order (else the n-th).")
    seed: int = Field(0, description="Permutation seed of the random order.")
    # `prepare` resolves `difficulty` to a file in the storage root, checking that the probe
    # measured this T, N, clustering and schedule.
    difficulty: Optional[str] = Field(None, description=(
        "Order measured: a difficulty probe's difficulty.json (its search's report/ artifact; a spec may name "
        "that search's parent run id instead)."))
    difficulty_measure: DifficultyMeasure = Field(
        "convergence_steps", description="Order measured: the probe's measure, clusters easiest (smallest) first.")
    # `prepare` resolves `reference` to a file in the storage root, as it does `difficulty`.
    reference: Optional[str] = Field(None, description=(
        "Order shuffled under patience pacing: an easy-to-hard trial's curriculum/schedule.json (a spec may name "
        "that trial's run id instead); its realised stage lengths give the allocation."))

    @model_validator(mode="after")
    def _consistent(self) -> "CurriculumConfig":
        if self.order == "measured" and not self.difficulty:
            raise PydanticCustomError(NEEDS_PATH, "curriculum.order=measured needs curriculum.difficulty: a "
                                      "difficulty.json or the run id of a difficulty-probe search",
                                      {"field": "difficulty"})
        # Only the path is checked here: the sampler takes the lengths it names already read, and
        # checks that they are enough (trainables/diffusion/curriculum.py).
        if self.order == "shuffled" and self.pacing == "patience" and not self.reference:
            raise PydanticCustomError(NEEDS_PATH, "curriculum.order=shuffled with pacing=patience needs "
                                      "curriculum.reference: the curriculum/schedule.json or run id of a finished "
                                      "easy-to-hard trial, whose realised stage lengths give the allocation",
                                      {"field": "reference"})
        if self.order == "shuffled" and self.distribution != "uniform":
            raise ValueError("order 'shuffled' draws easy-to-hard's allocation with t uniform within each stage; "
                             f"it takes distribution 'uniform', not {self.distribution!r}")
        return self


class LossConfig(Section):
    weighting: Weighting = "uniform"
    # SpeeD's change-aware weighting (trainables/diffusion/diffusion.py): w(t) in [1 − λ, λ] below
    # τ·T by how fast ᾱ changes there, 1 above. λ in [0.5, 1]: 0.5 weighs every t below τ alike.
    speed_lambda: float = Field(SPEED_LAMBDA, ge=0.5, le=1.0)
    speed_tau: float = Field(SPEED_TAU, gt=0, le=1)
    gamma: float = Field(5.0, gt=0.0)  # min-snr γ; p2 γ is p2_gamma
    p2_k: float = Field(1.0, gt=0.0)
    p2_gamma: float = Field(1.0, ge=0.0)
