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
SPEED_DISTRIBUTION_ONLY = ("curriculum.speed_k", "curriculum.speed_tau")
SPEED_WEIGHTING_ONLY = ("loss.speed_lambda", "loss.speed_tau")


def irrelevant(config: dict) -> list[str]:
    c, weighting = config["curriculum"], config.get("loss", {}).get("weighting")
    drawn = [] if c.get("distribution") == "logit-normal" else list(LOGIT_NORMAL_ONLY)
    drawn += [] if c.get("distribution") == "speed" else list(SPEED_DISTRIBUTION_ONLY)
    drawn += [] if weighting == "speed" else list(SPEED_WEIGHTING_ONLY)
    return list(dict.fromkeys([*_curriculum_irrelevant(c), *drawn]))


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


# How an arm's label names a curriculum setting the search varies (the order comes first; the
# distribution and the loss weighting last, whenever they are not uniform).
LABEL_PARTS = {
    "curriculum.num_clusters": "N={}",
    "curriculum.clustering": "{}",
    "curriculum.pacing": "{}",
    "curriculum.stage_steps": "{} steps/stage",
    "curriculum.patience": "τ={}",
}
NAMED_ALWAYS = ("curriculum.order", "curriculum.distribution", "loss.weighting")


def arm_label(config: dict, searched) -> str:
    """The arm a config is: its order, then each other setting the search varies that matters to
    it, then its timestep distribution and its loss weighting where they are not uniform. The
    baseline, order `none` with uniform timesteps and weighting, reads `none`; order `none` with
    min-SNR weighting reads `none min-snr weighting`."""
    off = set(irrelevant(config))
    parts = [str(config["curriculum"]["order"])]
    for path in searched:
        if path in off or path in NAMED_ALWAYS or path == SEED_PATH:
            continue
        value = config
        for key in path.split("."):
            value = value[key]
        parts.append(label_part(path, value))
    return " ".join(parts + drawn_parts(config["curriculum"].get("distribution"),
                                        config.get("loss", {}).get("weighting")))


def label_part(path: str, value) -> str:
    if path == "curriculum.cumulative":
        return "cumulative" if str(value).lower() == "true" else "exclusive"
    return LABEL_PARTS.get(path, f"{path.rpartition('.')[2]}={{}}").format(value)


def drawn_parts(distribution, weighting) -> list[str]:
    """How timesteps are drawn and weighted, where not uniform (None: a run from before the setting)."""
    parts = [] if distribution in ("uniform", None) else [f"{distribution} timesteps"]
    return parts + ([] if weighting in ("uniform", None) else [f"{weighting} weighting"])


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
