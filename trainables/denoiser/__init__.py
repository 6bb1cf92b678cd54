"""The denoiser trainable: a diffusers UNet trained with a timestep curriculum.

Exposes what the platform relies on: `Config` and `train_loop`, and the optional hooks
`prepare` (shared assets, once, before any trial) and `export` (the best checkpoint as a
diffusers pipeline). Importing this package imports no torch: the hooks load their code when
called.
"""

from trainables.denoiser.config import Config


def train_loop(config: dict) -> None:
    """Ray Train per-worker function (trainables/denoiser/train.py)."""
    from trainables.denoiser.train import train_loop as _train_loop

    _train_loop(config)


def prepare(config: dict, storage: str) -> None:
    """Dataset, FID network and reference statistics in the storage root (features.py)."""
    from trainables.denoiser.features import prepare as _prepare

    _prepare(config, storage)


def export(checkpoint_dir: str, config: dict, out_dir: str) -> str:
    """A checkpoint's EMA model as a `DDPMPipeline` folder (export.py)."""
    from trainables.denoiser.export import export as _export

    return _export(checkpoint_dir, config, out_dir)


def check_checkpoint(checkpoint_dir: str) -> None:
    """Raise a one-line PacerayError if a checkpoint cannot be resumed from (export.py)."""
    from trainables.denoiser.export import check_checkpoint as _check

    _check(checkpoint_dir)


__all__ = ["Config", "train_loop", "prepare", "export", "check_checkpoint"]
