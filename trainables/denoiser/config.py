"""One trial's configuration, checked before any Ray resource is used.

This module imports no torch, Ray or diffusers: `paceray --help` and spec validation must
answer in well under a second.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Order = Literal["none", "easy-to-hard", "hard-to-easy", "random", "measured", "shuffled"]
DifficultyMeasure = Literal["convergence_steps", "kl"]
Clustering = Literal["uniform", "log-snr", "quantile"]
Pacing = Literal["fixed", "patience"]
Weighting = Literal["uniform", "min-snr", "p2"]
Dataset = Literal["digits", "fashion-mnist", "mnist", "cifar10", "imagefolder"]
Preset = Literal["tiny", "small", "base", "ddpm-cifar10"]


class _Section(BaseModel):
    # A typo in a spec must fail loudly, never be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: Dataset = "digits"
    image_size: int = Field(8, ge=4, le=512)
    source: Optional[str] = None  # a directory holding the raw files (IDX, CIFAR batches, a folder)
    # imagefolder: the content fingerprint of `source`, filled in by prepare (an edited folder is
    # prepared again; the workers need not read the folder to find its shards).
    fingerprint: Optional[str] = None
    class_conditional: bool = False
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)  # classifier-free guidance training


class ModelConfig(_Section):
    preset: Preset = "tiny"


class DiffusionConfig(_Section):
    timesteps: int = Field(1000, ge=2, le=100_000)
    schedule: Literal["linear", "cosine"] = "linear"


class CurriculumConfig(_Section):
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
    # What t is drawn from inside the active set (trainables/denoiser/distributions.py).
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


class LossConfig(_Section):
    weighting: Weighting = "uniform"
    gamma: float = Field(5.0, gt=0.0)  # min-snr γ; p2 γ is p2_gamma
    p2_k: float = Field(1.0, gt=0.0)
    p2_gamma: float = Field(1.0, ge=0.0)


class TrainConfig(_Section):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(2e-3, gt=0.0, le=1e4)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    seed: int = 0
    log_every: int = Field(20, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    checkpoint_keep: int = Field(2, ge=1)  # best K by eval/fid, plus the latest


class EvalConfig(_Section):
    every: int = Field(200, ge=1)
    fid_samples: int = Field(256, ge=2)
    sampler_steps: int = Field(25, ge=1)
    batch_size: int = Field(256, ge=1)
    features: Literal["classifier", "inception"] = "classifier"
    inception_weights: Optional[str] = None
    guidance_scale: float = Field(1.0, ge=0.0)
    sample_grid: int = Field(64, ge=0)  # images in the logged grid; 0 logs none


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.curriculum.num_clusters > self.diffusion.timesteps:
            raise ValueError(
                f"curriculum.num_clusters ({self.curriculum.num_clusters}) must be at most "
                f"diffusion.timesteps ({self.diffusion.timesteps})"
            )
        if self.curriculum.order == "measured" and not self.curriculum.difficulty:
            raise ValueError("curriculum.order=measured needs curriculum.difficulty: a difficulty.json or the "
                             "run id of a difficulty-probe search")
        if self.curriculum.order == "shuffled" and self.curriculum.pacing == "patience" and not self.curriculum.reference:
            raise ValueError("curriculum.order=shuffled with pacing=patience needs curriculum.reference: the "
                             "curriculum/schedule.json or run id of a finished easy-to-hard trial, whose realised "
                             "stage lengths give the allocation")
        if self.curriculum.order == "shuffled" and self.curriculum.distribution != "uniform":
            raise ValueError("curriculum.order=shuffled draws easy-to-hard's allocation with t uniform within each "
                             "stage: curriculum.distribution must be uniform")
        if self.diffusion.schedule == "linear" and self.diffusion.timesteps < 21:
            # DDPM's β_T = 0.02 rescaled by 1000/T must stay below 1.
            raise ValueError(f"diffusion.timesteps ({self.diffusion.timesteps}) must be at least 21 for the "
                             f"linear schedule; use diffusion.schedule=cosine for fewer")
        if self.eval.sampler_steps > self.diffusion.timesteps:
            raise ValueError(
                f"eval.sampler_steps ({self.eval.sampler_steps}) must be at most "
                f"diffusion.timesteps ({self.diffusion.timesteps})"
            )
        return self
