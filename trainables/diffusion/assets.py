"""The assets trials share, made once in the storage root: the prepared dataset and the FID
feature network. Commands that make them hold the storage root's lock of the dataset
(`preparing`): two searches started together on a fresh root would otherwise both train the
same FID network."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from paceray.protocol import storage_lock
from trainables.diffusion.config import DataConfig
from trainables.diffusion.data import dataset_dir
from trainables.diffusion.data import prepare as prepare_dataset

PREPARE_WAIT_S = 4 * 3600.0  # an FID network on a large dataset trains for a while on a CPU


@contextmanager
def preparing(dataset: str, storage: Path) -> Iterator[None]:
    """One command at a time makes a dataset's shared files in a storage root (shards, FID
    network, reference statistics); another waits for it, then finds them made. Not re-entrant:
    only the commands' entry points take it."""
    with storage_lock(Path(storage) / "locks" / f"prepare-{dataset}", f"preparing {dataset}",
                      wait=PREPARE_WAIT_S):
        yield


def dataset_path(data: DataConfig, storage: Path, make: bool = True) -> Path:
    path = dataset_dir(data.dataset, storage, data.source, data.fingerprint)
    if make:  # prepared once; checked (Parquet footers only) each time it is reused
        return prepare_dataset(data.dataset, storage, source=data.source, fingerprint=data.fingerprint)
    return path


def fingerprinted(config: dict) -> dict:
    """An image folder's config with the folder's content fingerprint (data.fingerprint), taken
    once on the driver: every trial then reads the shards of exactly this content."""
    data = config["data"]
    if data["dataset"] != "imagefolder" or not data.get("source"):
        return config
    from trainables.diffusion.data import folder_fingerprint

    return {**config, "data": {**data, "fingerprint": folder_fingerprint(data["source"])}}


def fid_net_path(dataset: str, storage: Path, data_dir: Path) -> Path:
    """One FID network per prepared content (two image folders never share one); retraining it
    replaces the file, and its FIDs then carry another weights digest (see fid_net)."""
    from trainables.diffusion.data import read_manifest

    return storage / "fid-nets" / f"{dataset}-{read_manifest(data_dir)['content_hash'][:12]}.pt"


def train_dataset_fid_net(dataset: str, storage: Path, source: Optional[str] = None, epochs: Optional[float] = None,
                          seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Train the classifier FID network of `dataset` (on CPU or the local GPU) into the storage root."""
    import torch

    from trainables.diffusion.fid_net import FidNetRecipe, train_fid_net

    data_dir = dataset_path(DataConfig(dataset=dataset, source=source), storage)
    out = fid_net_path(dataset, storage, data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"training the {dataset} FID network once (saved to {out}) …", flush=True)
    info = train_fid_net(data_dir, out, FidNetRecipe(epochs=epochs, seed=seed), device=device)
    return out, info
