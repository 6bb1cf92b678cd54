"""What the platform's search asks of the denoiser: which settings a trial's others make
irrelevant (so a grid over order × N runs `none` once per seed, and Optuna's space is
conditional), its seed path, and the step from which its FID compares fairly with other arms'
(when the curriculum has shown every timestep). No torch: this runs on the driver before Ray."""

from __future__ import annotations

from typing import Optional

SEED_PATH = "train.seed"
CURRICULUM_SHAPE = ("curriculum.num_clusters", "curriculum.clustering", "curriculum.cumulative")
PACING = ("curriculum.pacing",)
FIXED_ONLY = ("curriculum.stage_steps",)
PATIENCE_ONLY = ("curriculum.patience", "curriculum.max_stage_steps", "curriculum.smoothing",
                 "curriculum.min_delta", "curriculum.patience_loss")
RANDOM_ONLY = ("curriculum.seed",)
MEASURED_ONLY = ("curriculum.difficulty", "curriculum.difficulty_measure")
SHUFFLED_ONLY = ("curriculum.reference",)


LOGIT_NORMAL_ONLY = ("curriculum.logit_mean", "curriculum.logit_std")


def irrelevant(config: dict) -> list[str]:
    c = config["curriculum"]
    logit = [] if c.get("distribution") == "logit-normal" else list(LOGIT_NORMAL_ONLY)
    return list(dict.fromkeys([*_curriculum_irrelevant(c), *logit]))


def _curriculum_irrelevant(c: dict) -> list[str]:
    order, pacing = c["order"], c["pacing"]
    if order == "none":  # the uniform baseline: no clusters, no stages, nothing to pace
        return [*CURRICULUM_SHAPE, *PACING, *FIXED_ONLY, *PATIENCE_ONLY, *RANDOM_ONLY, *MEASURED_ONLY,
                *SHUFFLED_ONLY]
    out = list(PATIENCE_ONLY if pacing == "fixed" else FIXED_ONLY)
    if order == "shuffled" and pacing == "fixed":
        out += SHUFFLED_ONLY  # its allocation comes from the fixed stage length
    if order == "shuffled" and pacing == "patience":
        out += PATIENCE_ONLY  # it does not pace itself: the reference's stage lengths do
    if order != "random":
        out += RANDOM_ONLY
    if order != "measured":
        out += MEASURED_ONLY
    if order != "shuffled":
        out += SHUFFLED_ONLY
    return list(dict.fromkeys(out))


def stages_before_full(config: dict) -> int:
    c = config["curriculum"]
    if c["order"] == "none":
        return 0
    return c["num_clusters"] - 1 if c["cumulative"] else c["num_clusters"]


def judged_from(config: dict) -> Optional[int]:
    """The latest step from which every timestep is active (`full_from_step`, at most the
    budget): fixed pacing exactly; patience from `max_stage_steps` (uncapped: the whole budget)."""
    c, steps = config["curriculum"], config["train"]["steps"]
    k = stages_before_full(config)
    if k == 0:
        return 1
    if c["pacing"] == "fixed":
        return min(steps, 1 + k * c["stage_steps"])
    cap = c.get("max_stage_steps")
    return steps if cap is None else min(steps, 1 + k * cap)


# What arms of one pack may differ in: how timesteps are drawn and how the loss weights them.
# Everything else (data, model, diffusion, train, eval; the seed included) they share.
PACKABLE = ("curriculum", "loss")
PACK_BUDGET_ENV = "PACERAY_PACK_BUDGET_GB"  # model state one packed trial may hold, for `tune.pack: auto`
PACK_BUDGET_GB = 4.0
MAX_PACK = 16
# Bytes of state per parameter an arm holds beside the others: fp32 weights, EMA, gradient and
# AdamW's two moments. Activations are not multiplied: the arms' steps run one after another.
STATE_BYTES_PER_PARAM = 4 * 5


def pack_key(config: dict) -> str:
    """Configs with equal keys may train in one packed trial: equal outside curriculum.* and loss.*."""
    import json

    return json.dumps({k: v for k, v in config.items() if k not in PACKABLE}, sort_keys=True, default=str)


def max_pack(config: dict) -> int:
    """How many arms of this config one trial holds under `tune.pack: auto`: the model state the
    pack budget (PACERAY_PACK_BUDGET_GB, default 4 GiB) takes, at most MAX_PACK."""
    import os

    import torch

    from trainables.diffusion.model import build_model

    with torch.device("meta"):
        model = build_model(config["model"]["preset"], config["data"]["image_size"], 3,
                            10 if config["data"].get("class_conditional") else None)
    params = sum(p.numel() for p in model.parameters())
    budget = float(os.environ.get(PACK_BUDGET_ENV, PACK_BUDGET_GB)) * 2**30
    return max(1, min(MAX_PACK, int(budget // (params * STATE_BYTES_PER_PARAM))))
