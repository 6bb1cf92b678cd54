"""The config sections both trainables share: data, model, diffusion, curriculum and loss. Each
is the one place for its fields, defaults and checks. Imports no torch, Ray or diffusers:
`paceray --help` and spec validation must answer in well under a second."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Order = Literal["none", "easy-to-hard", "hard-to-easy", "random", "measured", "shuffled"]
DifficultyMeasure = Literal["convergence_steps", "kl"]
Clustering = Literal["uniform", "log-snr", "quantile"]
Pacing = Literal["fixed", "patience"]
Weighting = Literal["uniform", "min-snr", "p2"]
Dataset = Literal["digits", "fashion-mnist", "mnist", "cifar10", "imagefolder"]
Preset = Literal["tiny", "small", "base", "ddpm-cifar10"]


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
    timesteps: int = Field(1000, ge=2, le=100_000)
    schedule: Literal["linear", "cosine"] = "linear"


class CurriculumConfig(Section):
    order: Order = "easy-to-hard"
    num_clusters: int = Field(20, ge=1)
    clustering: Clustering = "uniform"
    pacing: Pacing = "fixed"
    stage_steps: int = Field(100, ge=1)  # fixed pacing: steps per stage
    patience: int = Field(200, ge=1)  # patience pacing: τ steps without improvement
    max_stage_steps: Optional[int] = Field(None, ge=1)  # patience pacing: no stage runs longer
    # What patience watches: the raw ε-prediction loss (comparable across loss weightings) or
    # the weighted loss the optimiser minimises.
    patience_loss: Literal["raw", "weighted"] = "raw"
    # What t is drawn from inside the active set (trainables/diffusion/distributions.py).
    distribution: Literal["uniform", "logit-normal", "loss-second-moment"] = "uniform"
    logit_mean: float = 0.0  # logit-normal: t = ⌊sigmoid(m + s·z)·T⌋
    logit_std: float = Field(1.0, gt=0.0)
    smoothing: float = Field(0.99, ge=0.0, lt=1.0)  # EMA of the loss that patience watches
    min_delta: float = Field(0.0, ge=0.0)  # relative improvement that counts as one
    cumulative: bool = True
    seed: int = 0  # the permutation of `random`
    # order `measured`: clusters easiest first by a difficulty probe's measure. `difficulty` is a
    # difficulty.json or a probe search's parent run id; `prepare` resolves it to a file in the
    # storage root (checking that the probe measured this T, N, clustering and schedule).
    difficulty: Optional[str] = None
    difficulty_measure: DifficultyMeasure = "convergence_steps"
    # order `shuffled` under patience pacing: the easy-to-hard trial whose realised stage lengths
    # give the allocation, a `curriculum/schedule.json` or that trial's run id (`prepare` resolves it).
    reference: Optional[str] = None


class LossConfig(Section):
    weighting: Weighting = "uniform"
    gamma: float = Field(5.0, gt=0.0)  # min-snr γ; p2 γ is p2_gamma
    p2_k: float = Field(1.0, gt=0.0)
    p2_gamma: float = Field(1.0, ge=0.0)
