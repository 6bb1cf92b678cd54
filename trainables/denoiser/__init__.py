"""The denoiser trainable: a diffusers UNet trained with a timestep curriculum.

`TRAINABLE` declares everything the platform may ask of it (paceray.protocol.Trainable),
registered as the entry point `denoiser` of the group `paceray.trainables`. Importing this
package imports no torch: each hook loads its code when called.
"""

from paceray.protocol import Horizon, Packing, PrepareContext, Trainable, TrialContext
from trainables.denoiser.config import Config


def train_loop(config: dict, context: TrialContext):
    """Ray Train per-worker function (trainables/denoiser/train.py); a packed trial's returns the
    arms that failed on their own."""
    from trainables.denoiser.train import train_loop as _train_loop

    return _train_loop(config, context)


def prepare(config: dict, context: PrepareContext) -> dict:
    """Dataset, FID network and reference statistics in the storage root (features.py); a
    measured order's difficulty reference resolved to a file there."""
    from trainables.denoiser.features import prepare as _prepare

    return _prepare(config, context)


def export(checkpoint_dir: str, config: dict, out_dir: str) -> str:
    """A checkpoint's EMA model as a `DDPMPipeline` folder (export.py)."""
    from trainables.denoiser.export import export as _export

    return _export(checkpoint_dir, config, out_dir)


def check_checkpoint(checkpoint_dir: str) -> None:
    """Raise a one-line PacerayError if a checkpoint cannot be resumed from (export.py)."""
    from trainables.denoiser.export import check_checkpoint as _check

    _check(checkpoint_dir)


def run_name(config: dict, trial_id: str) -> str:
    c = config["curriculum"]
    return f"{c['order']}-N{c['num_clusters']}-{trial_id}"


def commands():
    from trainables.denoiser.commands import COMMANDS

    return COMMANDS


def report():
    from trainables.denoiser.study_report import StudyReportHook

    return StudyReportHook()


def irrelevant(config: dict) -> list:
    from trainables.denoiser.search_hooks import irrelevant as _irrelevant

    return _irrelevant(config)


def arm_label(config: dict, searched) -> str:
    from trainables.denoiser.search_hooks import arm_label as _arm_label

    return _arm_label(config, searched)


def judged_from(config: dict):
    from trainables.denoiser.search_hooks import judged_from as _judged_from

    return _judged_from(config)


def pack_key(config: dict) -> str:
    from trainables.denoiser.search_hooks import pack_key as _pack_key

    return _pack_key(config)


def max_pack(config: dict) -> int:
    from trainables.denoiser.search_hooks import max_pack as _max_pack

    return _max_pack(config)


TRAINABLE = Trainable(
    name="denoiser",
    description="a diffusers UNet trained with a timestep curriculum; FID tracked over training",
    config=Config,
    train_loop=train_loop,
    metric="eval/fid",
    mode="min",
    progress=(("stage", "curriculum/stage"), ("FID", "eval/fid")),
    # What a checkpoint holds the shape of: the network, the data it was fitted to, the noise
    # schedule, the curriculum's clusters and order (its sampler state).
    resume_fixed=("model", "data", "diffusion", "curriculum.num_clusters", "curriculum.order",
                  "curriculum.clustering", "curriculum.cumulative", "curriculum.distribution"),
    horizon=lambda config: Horizon(steps=config["train"]["steps"], report_every=config["eval"]["every"]),
    run_name=run_name,
    arm_label=arm_label,
    checkpoints_to_keep=lambda config: config["train"]["checkpoint_keep"],
    prepare=prepare,
    export=export,
    check_checkpoint=check_checkpoint,
    commands=commands,
    report=report,
    irrelevant=irrelevant,
    seed_path="train.seed",
    judged_from=judged_from,
    # Arms equal but for their curriculum and loss weighting train packed (tune.pack).
    packing=Packing(key=pack_key, max_pack=max_pack),
)

__all__ = ["TRAINABLE", "Config"]
