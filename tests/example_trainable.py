"""A trainable that is not a diffusion model, in a module of its own: the platform must run it
through `paceray tune` by its dotted path (`example_trainable:TRAINABLE`) knowing nothing about it.

Its "training" fits y = exp(-rate·step) by gradient-free decay: the metric `toy/error` falls at a
rate the search varies, so the report's ranking is known in advance."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from paceray.protocol import Horizon, Trainable, TrialContext


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.1, gt=0)
    length: int = Field(8, ge=1)
    fail_at: int = Field(0, ge=0)  # 0: never; else report a failure at that step


def train_loop(config: dict, context: TrialContext) -> None:
    import ray.train

    cfg = Config.model_validate(config)
    run = context.run_logger()
    for step in range(1, cfg.length + 1):
        if step == cfg.fail_at:
            context.fail(f"toy failure at step {step}", step=step)
            if run:
                run.close()
            return
        error = math.exp(-cfg.rate * step)
        if run:
            run.log_metrics({"toy/error": error}, step)
        ray.train.report({"step": step, "toy/error": error})
    if run:
        run.close()


TRAINABLE = Trainable(
    name="example",
    config=Config,
    train_loop=train_loop,
    metric="toy/error",
    mode="min",
    horizon=lambda config: Horizon(steps=config["length"], report_every=1),
    run_name=lambda config, trial_id: f"rate{config['rate']}-{trial_id}",
    checkpoints_to_keep=lambda config: 1,
)
