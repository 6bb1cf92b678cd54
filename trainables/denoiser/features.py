"""The assets every trial shares, made once in the storage root: the prepared dataset, the FID
feature network, and the reference statistics (per dataset, split, extractor and image size).

`prepare` runs on the driver before any trial starts, so trials only read; the same calls are
idempotent and atomic, so a trial that finds something missing makes it without harm. Commands
that make them hold the storage root's lock of the dataset (`preparing`): two searches started
together on a fresh root would otherwise both train the same FID network.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from paceray.protocol import PacerayError, storage_lock
from trainables.denoiser.config import Config, DataConfig
from trainables.denoiser.data import dataset_dir, prepare as prepare_dataset

REFERENCE_SPLIT = "train"  # FID against the training distribution, as for CIFAR-10 in the literature
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
    from trainables.denoiser.data import folder_fingerprint

    return {**config, "data": {**data, "fingerprint": folder_fingerprint(data["source"])}}


def fid_net_path(dataset: str, storage: Path, data_dir: Path) -> Path:
    """One FID network per prepared content (two image folders never share one); retraining it
    replaces the file, and its FIDs then carry another weights digest (see fid_net)."""
    from trainables.denoiser.data import read_manifest

    return storage / "fid-nets" / f"{dataset}-{read_manifest(data_dir)['content_hash'][:12]}.pt"


def train_dataset_fid_net(dataset: str, storage: Path, source: Optional[str] = None, epochs: Optional[float] = None,
                          seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Train the classifier FID network of `dataset` (on CPU or the local GPU) into the storage root."""
    import torch

    from trainables.denoiser.fid_net import train_fid_net

    data_dir = dataset_path(DataConfig(dataset=dataset, source=source), storage)
    out = fid_net_path(dataset, storage, data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"training the {dataset} FID network once (saved to {out}) …", flush=True)
    info = train_fid_net(data_dir, out, epochs=epochs, seed=seed, device=device)
    return out, info


def extractor(cfg: Config, storage: Path, data_dir: Path):
    from trainables.denoiser.fid import load_extractor

    if cfg.eval.features == "classifier":
        path = fid_net_path(cfg.data.dataset, storage, data_dir)
        if not path.exists():
            train_dataset_fid_net(cfg.data.dataset, storage, cfg.data.source)
        return load_extractor("classifier", dataset_dir=data_dir, fid_net_path=path)
    return load_extractor("inception", inception_weights=cfg.eval.inception_weights,
                          inception_cache_dir=storage / "inception")


def reference(cfg: Config, storage: Path, data_dir: Path, ext=None, device="cpu"):
    from trainables.denoiser.fid import reference_statistics

    ext = ext if ext is not None else extractor(cfg, storage, data_dir)
    return reference_statistics(ext.to(device), data_dir, storage / "fid-stats", split=REFERENCE_SPLIT,
                                image_size=cfg.data.image_size, device=device)


def fid_evaluator(cfg: Config, storage: Path, data_dir: Path, device):
    """The in-loop FID: rank 0 holds the cached reference statistics, every rank its samples."""
    import torch.distributed as dist

    from trainables.denoiser.fid import FIDEvaluator

    ext = extractor(cfg, storage, data_dir).to(device)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ref = reference(cfg, storage, data_dir, ext, device) if rank == 0 else None
    return FIDEvaluator(ext, ref, device)


def prepare(config: dict, context) -> dict:
    """The platform's hook (context: paceray.protocol.PrepareContext): dataset, FID network and
    reference statistics, before any trial. Returns the config every trial gets."""
    config = fingerprinted(config)
    cfg = Config.model_validate(config)
    root = Path(context.storage)
    from trainables.denoiser.model import check_image_size

    try:
        check_image_size(cfg.model.preset, cfg.data.image_size)  # a bad preset/size fails here, not on a worker
    except ValueError as e:
        raise PacerayError(str(e)) from None
    with preparing(cfg.data.dataset, root):
        reference(cfg, root, dataset_path(cfg.data, root))
    from trainables.denoiser.measured import resolve
    from trainables.denoiser.references import resolve_shuffled_reference

    config = resolve(config, root, context.tracking_uri)
    return resolve_shuffled_reference(config, root, context.tracking_uri)
