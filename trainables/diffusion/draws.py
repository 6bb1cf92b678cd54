"""The random draws of a training step, each from a stream keyed by (train.seed, rank, step).

Data order and timesteps are keyed this way already (data.ImageBatches, curriculum); the rest of
a step's randomness is here: the diffusion noise ε, the label dropout of classifier-free guidance
and the network's own dropout. Keyed draws make a resumed trial draw exactly what an
uninterrupted one draws (the global generator is not in a checkpoint), and give every trial of one
seed the same noise: arms compared by seed share it (common random numbers) instead of each
drawing its own. The model's initial weights are a function of the seed alone (`initial_seed`):
every rank builds the same network, and every arm of a seed starts from it.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch


def stream_seed(seed: int, rank: int, salt: str = "") -> int:
    """A well-mixed 63-bit seed per (seed, rank[, salt]): nearby seeds and ranks share no stream."""
    key = f"{seed}:{rank}" + (f":{salt}" if salt else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@contextmanager
def initial_seed(seed: int) -> Iterator[None]:
    """Inside, the global generators are seeded by `seed` alone (the model's initial weights); the
    caller's generator state is back afterwards."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.manual_seed(stream_seed(seed, 0, "init"))
        yield


class StepDraws:
    """One rank's step-keyed draws. Each generator is re-seeded per step from (seed, rank, step,
    purpose), so a step's draws do not depend on what ran before it."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self._noise = torch.Generator(device=self.device)
        self._labels = torch.Generator(device=self.device)

    def noise(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """ε of step `step`, shaped like `like` (float32, on its device)."""
        self._noise.manual_seed(stream_seed(self.seed, self.rank, f"noise{step}"))
        return torch.randn(like.shape, generator=self._noise, device=self.device, dtype=torch.float32).to(like.device)

    def labels(self, step: int) -> torch.Generator:
        """The label dropout's generator for step `step`."""
        return self._labels.manual_seed(stream_seed(self.seed, self.rank, f"labels{step}"))

    def seed_dropout(self, step: int) -> None:
        """The network's dropout layers draw from the global generators: seed them for step `step`."""
        torch.manual_seed(stream_seed(self.seed, self.rank, f"dropout{step}"))
