"""One trial = one Ray Train `TorchTrainer` run of the trainable's `train_loop`.

Used as is by `paceray train`, and inside each Tune trial by `paceray tune`. The trainer's
`name` is stable per trial: Ray Train resumes a run from `{storage_path}/{name}`, so a
restarted trial continues from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONTEXT_KEY = "paceray"  # the platform's part of the trial config (the trainable pops it)


@dataclass
class TrialContext:
    """What the platform tells a trainable beyond its own config."""

    trial_id: str
    run_id: Optional[str]  # the MLflow run rank 0 logs into
    tracking_uri: Optional[str]
    storage: str  # storage root: datasets, FID nets, reference statistics
    run_dir: str
    console_progress: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def trainer_for(trainable, config: dict, ctx: TrialContext, resources: Resources, storage_path: Path,
                name: str, max_failures: int = 2, keep_best: int = 2, callbacks: Optional[list] = None):
    """A TorchTrainer for one trial; `fit()` it to run (or resume) the trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker=trainable.train_loop,
        train_loop_config={**config, CONTEXT_KEY: ctx.as_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray keeps the latest checkpoint besides the best K by eval/fid.
            checkpoint_config=CheckpointConfig(num_to_keep=keep_best, checkpoint_score_attribute="eval/fid",
                                               checkpoint_score_order="min"),
            callbacks=callbacks or [],
        ),
    )


def trial_storage(run_dir: Path) -> Path:
    return run_dir / "ray"
