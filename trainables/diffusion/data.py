"""The denoiser's data: prepare a dataset once, read one rank's shard, draw minibatches.

`prepare` turns raw files (see `datasets_sources`) into Parquet shards of uint8 images plus
labels and a `manifest.json`, written once and atomically under `{cache_dir}/datasets/`.
`load_split` reads a DDP rank's disjoint share of a split. `ImageBatches` yields endless
random minibatches in [-1, 1] from a tensor preloaded on the training device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from paceray.protocol import PacerayError, one_line, progress_bar
from trainables.diffusion.datasets_sources import RawDataset, read_raw
from trainables.diffusion.draws import stream_seed

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_ROWS = 16384  # ~12 MiB of uint8 pixels per CIFAR-10 shard before compression


def dataset_dir(dataset: str, cache_dir: str | Path, source: str | Path | None = None,
                fingerprint: Optional[str] = None) -> Path:
    """Where `prepare` puts `dataset`: {cache_dir}/datasets/{dataset}, or, for an image folder,
    .../imagefolder-{short hash of the folder's absolute path and its content fingerprint}, so an
    edited folder is prepared again. `fingerprint` (folder_fingerprint, which `prepare` of the
    trainable puts in the config) spares a worker from reading the folder again."""
    if dataset not in DATASETS:
        raise PacerayError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = Path(cache_dir).expanduser().resolve() / "datasets"
    if dataset != "imagefolder":
        return root / dataset
    if source is None:
        raise PacerayError("imagefolder needs source=DIR (--source DIR): a folder with one sub-folder of images per class")
    folder = Path(source).expanduser().resolve()
    fingerprint = fingerprint or folder_fingerprint(folder)
    key = hashlib.sha256(f"{folder}\0{fingerprint}".encode()).hexdigest()[:12]
    return root / f"imagefolder-{key}"


# An image folder's own captions (trainables/diffusion/captions.py) are no part of its images:
# editing them prepares new captions, not the images again.
FOLDER_CAPTION_FILES = ("captions.jsonl", "captions.csv")


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over every file's path (relative to `folder`) and content, in sorted order: any
    added, removed, renamed or edited image changes it (the folder's caption files do not)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise PacerayError(f"imagefolder: {folder} is not a directory; pass --source DIR holding one sub-folder "
                           f"of images per class")
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not (p.parent == folder and p.name in FOLDER_CAPTION_FILES))
    with progress_bar(f"fingerprinting {folder.name}", len(files), "files") as advance:
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
            advance(1)
    return digest.hexdigest()


def prepare(dataset: str, cache_dir: str | Path, source: str | Path | None = None,
            download: bool = True, fingerprint: Optional[str] = None) -> Path:
    """Write `dataset` as Parquet shards + manifest.json once; later calls return at once.

    The shards are built in a temporary folder beside the target and renamed into place, so a
    crash leaves no half-written dataset, and concurrent preparers (DDP workers on one node)
    race harmlessly: the first rename wins, the others drop their copy.
    """
    target = dataset_dir(dataset, cache_dir, source, fingerprint)
    if (target / MANIFEST).is_file():
        check_shards(target)
        return target
    if target.exists():
        raise PacerayError(f"{target} exists but holds no {MANIFEST} (not written by paceray): delete it and prepare again")
    raw = read_raw(dataset, source, Path(cache_dir).expanduser().resolve(), download)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    building.chmod(0o755)  # mkdtemp makes it owner-only; other users and pods read it too
    try:
        _write_prepared(raw, dataset, building)
        try:
            os.rename(building, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone after a rename; our copy if we lost the race
    return target


def _content_hash_update(digest: hashlib._Hash, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    digest.update(f"{split}:{list(images.shape)}\n".encode())
    digest.update(images.tobytes())
    digest.update(labels.astype("<i8").tobytes())


@dataclass
class _PreparedWriter:
    """What writing a dataset's splits into `out` gathers: the content digest, each split's entry,
    the image shape [C, H, W] (every split's must match the first's) and the largest label."""

    name: str
    out: Path
    digest: Any = field(default_factory=hashlib.sha256)
    splits: dict[str, Any] = field(default_factory=dict)
    image_shape: Optional[list] = None
    max_label: int = -1

    def write_split(self, split: str, images, labels) -> None:
        """One split's shards into `out` and its entry into `splits`."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise PacerayError(f"{self.name}/{split}: images {images.shape} and labels {labels.shape} "
                               f"do not form a dataset")
        if self.image_shape not in (None, list(images.shape[1:])):
            raise PacerayError(f"{self.name}: split {split} has images {list(images.shape[1:])}, "
                               f"others {self.image_shape}")
        _content_hash_update(self.digest, split, images, labels)
        shards = []
        for start in range(0, len(images), SHARD_ROWS):
            file = f"{split}-{len(shards):05d}.parquet"
            pq.write_table(_to_table(images[start:start + SHARD_ROWS], labels[start:start + SHARD_ROWS]),
                           self.out / file, compression="zstd")
            shards.append(file)
        self.splits[split] = {"count": len(images), "shards": shards}
        self.max_label = max(self.max_label, int(labels.max()))
        self.image_shape = list(images.shape[1:])


def _write_prepared(raw: RawDataset, name: str, out: Path) -> dict[str, Any]:
    writer = _PreparedWriter(name, out)
    with progress_bar(f"writing {name}", sum(len(labels) for _, labels in raw.splits.values()), "images") as advance:
        for split, (images, labels) in raw.splits.items():
            writer.write_split(split, images, labels)
            advance(len(labels))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "splits": writer.splits,
        "image_shape": writer.image_shape,  # [C, H, W]
        "num_classes": len(raw.class_names) if raw.class_names else writer.max_label + 1,
        "class_names": raw.class_names,
        "content_hash": writer.digest.hexdigest(),  # sha256 over split names, shapes, pixels, labels
        "source": raw.source,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _to_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    # One fixed-size binary cell per image: reading back is one zero-copy view of the column.
    width = int(np.prod(images.shape[1:]))
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(images), [None, pa.py_buffer(images)])
    return pa.table({"image": column, "label": pa.array(labels, pa.int64())})


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PacerayError(f"no {path}: prepare the dataset first (`paceray data prepare DATASET`)") from None
    except (OSError, ValueError) as e:
        raise PacerayError(one_line(f"{path}: unreadable ({e}); delete {path.parent} and prepare again")) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PacerayError(f"{path}: format_version {manifest.get('format_version')}, this paceray reads "
                           f"{FORMAT_VERSION}; delete {path.parent} and prepare again")
    return manifest


def _unreadable(file: Path, e: Exception) -> PacerayError:
    return PacerayError(one_line(f"{file}: unreadable Parquet shard ({type(e).__name__}: {e}), e.g. cut short by a "
                                 f"crash or a full disk; delete {file.parent} and prepare again"))


def check_shards(dataset_dir: str | Path) -> None:
    """Every shard of a prepared dataset readable and holding the rows its manifest says, checked
    from the Parquet footers alone (milliseconds): a truncated shard is one line before any trial
    starts, not a worker's traceback on every retry."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    for split, info in manifest["splits"].items():
        rows = 0
        for file in info["shards"]:
            try:
                rows += pq.read_metadata(dataset_dir / file).num_rows
            except (OSError, pa.ArrowException) as e:
                raise _unreadable(dataset_dir / file, e) from None
        if rows != info["count"]:
            raise PacerayError(f"{dataset_dir}: {split} shards hold {rows} rows, {MANIFEST} says {info['count']}; "
                               f"delete {dataset_dir} and prepare again")


def load_split(dataset_dir: str | Path, split: str = "train", rank: int = 0,
               world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s rows of `split`: uint8 images (n, C, H, W) and int64 labels (n,).

    Rank r gets the rows i with i % world_size == r: disjoint across ranks, their union the
    whole split, and every rank sees every class even when the files are sorted by label.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise PacerayError(f"{dataset_dir}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    info = manifest["splits"][split]
    shape = tuple(manifest["image_shape"])
    width = int(np.prod(shape))
    mine = len(range(rank, info["count"], world_size))
    images = np.empty((mine, *shape), np.uint8)
    labels = np.empty(mine, np.int64)
    seen = filled = 0  # rows read so far across shards, rows of ours written
    for file in info["shards"]:
        try:
            table = pq.read_table(dataset_dir / file, columns=["image", "label"])
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(dataset_dir / file, e) from None
        start = (rank - seen) % world_size  # first row of this shard that is ours
        shard_images = _pixels(table.column("image"), width).reshape(-1, *shape)[start::world_size]
        shard_labels = table.column("label").to_numpy()[start::world_size]
        if filled + len(shard_images) > mine:
            break
        images[filled:filled + len(shard_images)] = shard_images
        labels[filled:filled + len(shard_labels)] = shard_labels
        filled += len(shard_images)
        seen += table.num_rows
    if seen != info["count"] or filled != mine:
        raise PacerayError(f"{dataset_dir}: {split} shards hold {seen} rows, manifest says {info['count']}; "
                           f"delete {dataset_dir} and prepare again")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _pixels(column: pa.ChunkedArray, width: int) -> np.ndarray:
    parts = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise PacerayError("a prepared shard holds null images; delete the dataset folder and prepare again")
        data = chunk.buffers()[1]
        parts.append(np.frombuffer(data, np.uint8, count=len(chunk) * width, offset=chunk.offset * width))
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


# --- pixels <-> model range -----------------------------------------------------------------

def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8 0..255."""
    return images.clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_().to(torch.uint8)


def resize_images(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, image_size, image_size), on the images' device.

    Bilinear both ways. Downscaling antialiases (a box-like filter over every source pixel),
    so fine texture does not alias into moire. Upscaling is bilinear rather than nearest
    because nearest is only even at integer factors: 28 -> 32 would double every 7th row and
    column, a stripe pattern the denoiser would learn and the FID network would see. Use this
    same function for the FID reference images so both sides are resized alike.
    """
    n, c, h, w = images.shape
    if (h, w) == (image_size, image_size):
        return images
    out = torch.empty((n, c, image_size, image_size), dtype=torch.uint8, device=images.device)
    downscale = image_size < h or image_size < w
    for start in range(0, n, chunk):  # bounded float memory for large datasets
        part = images[start:start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(image_size, image_size), mode="bilinear",
                             align_corners=False, antialias=downscale)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class BatchOrder:
    """Whose shuffles order an `ImageBatches` stream: the trial's seed and the worker's rank."""

    seed: int = 0
    rank: int = 0


class ImageBatches:
    """Endless random minibatches of (float images in [-1, 1], int64 labels) on `device`.

    The images are resized once and kept as uint8 on the device, so a step costs one index
    into that tensor and one scale. Order: epoch e is a permutation seeded by (seed, rank, e),
    so the stream is a function of its position alone: `seek(step)` puts a resumed run where an
    uninterrupted one would be, and on another worker count each rank starts at the same point
    of its own (new) shard's stream. Nothing about the data goes into checkpoints.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, image_size: int,
                 device: str | torch.device = "cpu", order: BatchOrder = BatchOrder()):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"want uint8 images (N, C, H, W) and N labels, got {images.dtype} {tuple(images.shape)}, {len(labels)}")
        if len(images) == 0:
            raise PacerayError(f"rank {order.rank} has no images: the split holds fewer rows than there are workers")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size, self.seed, self.rank = batch_size, order.seed, order.rank
        self.images = resize_images(images.to(self.device), image_size)
        self.labels = labels.to(self.device, torch.int64)
        self.epoch, self._order = -1, None
        self.seek(0)

    def __len__(self) -> int:
        return len(self.images)

    def seek(self, step: int) -> None:
        """Continue after `step` batches have been drawn."""
        self._drawn = step * self.batch_size

    @property
    def batches_drawn(self) -> int:
        """The stream's position in batches: the steps trained, when each step draws one."""
        return self._drawn // self.batch_size

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self.epoch:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, f"epoch{epoch}"))
            self._order = torch.randperm(len(self.images), generator=gen).to(self.device)
            self.epoch = epoch
        return self._order

    def __iter__(self) -> "ImageBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts, needed, n = [], self.batch_size, len(self.images)
        while needed:
            epoch, position = divmod(self._drawn, n)
            take = min(needed, n - position)
            parts.append(self._order_of(epoch)[position:position + take])
            self._drawn += take
            needed -= take
        index = parts[0] if len(parts) == 1 else torch.cat(parts)
        return to_unit_range(self.images[index]), self.labels[index]
