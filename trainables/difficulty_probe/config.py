"""A probe trial's configuration, checked before any Ray resource is used (imports no torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables.diffusion.config import Clustering, DataConfig, DiffusionConfig, ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProbeSection(_Section):
    cluster: int = Field(1, ge=1)  # 1-based; C1 = lowest noise, like the curriculum's
    num_clusters: int = Field(5, ge=1)
    clustering: Clustering = "uniform"
    eval_every: int = Field(20, ge=1)  # steps between held-out losses
    heldout_samples: int = Field(256, ge=8)  # test images, each at a fixed t and noise of the cluster
    tolerance: float = Field(0.05, gt=0.0, lt=1.0)  # convergence: within 5% of the final smoothed loss
    smoothing: float = Field(0.6, ge=0.0, lt=1.0)  # EMA over the held-out evals
    kl_ridge: float = Field(1e-3, gt=0.0)  # added to the data covariance's diagonal for the KL


class ProbeTrain(_Section):
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    seed: int = 0


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: ProbeTrain = ProbeTrain()
    probe: ProbeSection = ProbeSection()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.probe.num_clusters > self.diffusion.timesteps:
            raise ValueError(f"probe.num_clusters ({self.probe.num_clusters}) must be at most "
                             f"diffusion.timesteps ({self.diffusion.timesteps})")
        if self.probe.cluster > self.probe.num_clusters:
            raise ValueError(f"probe.cluster ({self.probe.cluster}) must be at most probe.num_clusters "
                             f"({self.probe.num_clusters})")
        if self.data.class_conditional:
            raise ValueError("data.class_conditional: the probe trains unconditional denoisers")
        if self.diffusion.schedule == "linear" and self.diffusion.timesteps < 21:
            raise ValueError(f"diffusion.timesteps ({self.diffusion.timesteps}) must be at least 21 for the "
                             f"linear schedule; use diffusion.schedule=cosine for fewer")
        return self
