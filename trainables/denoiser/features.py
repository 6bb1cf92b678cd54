"""The assets every trial shares, made once in the storage root: the prepared dataset, the FID
feature network, and the reference statistics (per dataset, split, extractor and image size).

`prepare` runs on the driver before any trial starts, so trials only read; the same calls are
idempotent and atomic, so a trial that finds something missing makes it without harm. Commands
that make them hold the storage root's lock of the dataset (`preparing`): two searches started
together on a fresh root would otherwise both train the same FID network.
"""

from __future__ import annotations

from pathlib import Path

from paceray.protocol import PacerayError
from trainables.denoiser.config import Config
from trainables.diffusion.assets import dataset_path, fid_net_path, fingerprinted, preparing, train_dataset_fid_net

REFERENCE_SPLIT = "train"  # FID against the training distribution, as for CIFAR-10 in the literature
PREPARE_WAIT_S = 4 * 3600.0  # an FID network on a large dataset trains for a while on a CPU


def extractor(cfg: Config, storage: Path, data_dir: Path):
    from trainables.diffusion.fid import load_extractor

    if cfg.eval.features == "classifier":
        path = fid_net_path(cfg.data.dataset, storage, data_dir)
        if not path.exists():
            train_dataset_fid_net(cfg.data.dataset, storage, cfg.data.source)
        return load_extractor("classifier", dataset_dir=data_dir, fid_net_path=path)
    return load_extractor("inception", inception_weights=cfg.eval.inception_weights,
                          inception_cache_dir=storage / "inception")


def reference(cfg: Config, storage: Path, data_dir: Path, ext=None, device="cpu"):
    from trainables.diffusion.fid import ReferenceImages, reference_statistics

    ext = ext if ext is not None else extractor(cfg, storage, data_dir)
    return reference_statistics(ext.to(device), data_dir, storage / "fid-stats",
                                ReferenceImages(split=REFERENCE_SPLIT, image_size=cfg.data.image_size), device=device)


def fid_evaluator(cfg: Config, storage: Path, data_dir: Path, device):
    """The in-loop FID: rank 0 holds the cached reference statistics, every rank its samples."""
    import torch.distributed as dist

    from trainables.diffusion.fid import FIDEvaluator

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
    from trainables.diffusion.model import check_image_size

    try:
        check_image_size(cfg.model.preset, cfg.data.image_size)  # a bad preset/size fails here, not on a worker
    except ValueError as e:
        raise PacerayError(str(e)) from None
    with preparing(cfg.data.dataset, root):
        reference(cfg, root, dataset_path(cfg.data, root))
    from trainables.denoiser.measured import resolve
    from trainables.denoiser.references import resolve_shuffled_reference

    config = resolve(config, root, context)
    return resolve_shuffled_reference(config, root, context)
