"""One trial's configuration, checked before any Ray resource is used.

This module imports no torch, Ray or diffusers: `paceray --help` and spec validation must
answer in well under a second.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from trainables.diffusion.config import CurriculumConfig, DataConfig, DiffusionConfig, LossConfig, ModelConfig, Section


class TrainConfig(Section):
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
    # How a packed trial's arms step (tune.pack): one after another (`loop`, the default and the
    # fallback), or as one vmapped computation over their stacked weights (`stacked`, for a GPU
    # a small network leaves idle: trainables/denoiser/stacked.py).
    pack_compute: Literal["loop", "stacked"] = "loop"


class EvalConfig(Section):
    every: int = Field(200, ge=1)
    fid_samples: int = Field(256, ge=2)
    sampler_steps: int = Field(25, ge=1)
    batch_size: int = Field(256, ge=1)
    features: Literal["classifier", "inception"] = "classifier"
    inception_weights: Optional[str] = None
    guidance_scale: float = Field(1.0, ge=0.0)
    sample_grid: int = Field(64, ge=0)  # images in the logged grid; 0 logs none


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        # The curriculum's own checks (e.g. that `measured` names a difficulty file) are
        # CurriculumConfig's; those that need the diffusion timesteps too are here.
        if self.curriculum.num_clusters > self.diffusion.timesteps:
            raise ValueError(
                f"curriculum.num_clusters ({self.curriculum.num_clusters}) must be at most "
                f"diffusion.timesteps ({self.diffusion.timesteps})"
            )
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
