"""The difficulty probe: the observational study of §3 of Kim et al. (ICLR 2025).

One trial per timestep cluster (a Tune grid over `probe.cluster`) trains the denoiser's model on
that cluster's timesteps alone and tracks its held-out loss; the report ranks the clusters by
how fast they converge and by the relative entropy between consecutive forward marginals, and
writes `difficulty.json`, which the denoiser's `curriculum.order: measured` reads. Importing this
package imports no torch.
"""

from paceray.protocol import Horizon, PrepareContext, Trainable, TrialContext
from trainables.difficulty_probe.config import Config


def train_loop(config: dict, context: TrialContext) -> None:
    from trainables.difficulty_probe.train import train_loop as _train_loop

    _train_loop(config, context)


def prepare(config: dict, context: PrepareContext) -> dict:
    """The dataset in the storage root, once, before any trial (the denoiser's data code)."""
    from pathlib import Path

    from trainables.diffusion.assets import dataset_path, fingerprinted
    from trainables.diffusion.data import read_manifest
    from trainables.diffusion.model import check_image_size

    config = fingerprinted(config)
    cfg = Config.model_validate(config)
    manifest = read_manifest(dataset_path(cfg.data, Path(context.storage)))
    if "test" not in manifest["splits"]:
        raise ValueError(f"data.dataset: {cfg.data.dataset} has no test split for the held-out loss")
    check_image_size(cfg.model.preset, cfg.data.image_size)
    return config


def report():
    from trainables.difficulty_probe.report import ProbeReportHook

    return ProbeReportHook()


TRAINABLE = Trainable(
    name="difficulty-probe",
    description="per-cluster convergence and KL of the denoising tasks (Kim et al. §3)",
    config=Config,
    train_loop=train_loop,
    metric="probe/heldout_loss",
    mode="min",
    horizon=lambda config: Horizon(steps=config["train"]["steps"], report_every=config["probe"]["eval_every"]),
    run_name=lambda config, trial_id: f"probe-C{config['probe']['cluster']}-{trial_id}",
    checkpoints_to_keep=lambda config: 1,
    prepare=prepare,
    report=report,
)

__all__ = ["TRAINABLE", "Config"]
