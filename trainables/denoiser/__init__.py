"""The denoiser trainable: a diffusers UNet trained with a timestep curriculum.

Exposes the two names the platform relies on. Importing this package imports no torch:
`Config` is plain pydantic, and `train_loop` loads the training code only when a Ray worker
calls it.
"""

from trainables.denoiser.config import Config


def train_loop(config: dict) -> None:
    """Ray Train per-worker function (see trainables/denoiser/train.py)."""
    from trainables.denoiser.train import train_loop as _train_loop

    _train_loop(config)


__all__ = ["Config", "train_loop"]
