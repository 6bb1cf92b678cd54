"""The `classifier` FID features: a small CNN trained on the prepared dataset itself.

Its penultimate layer (128-d by default) is a domain feature space that needs no download,
unlike Inception-v3. `train_fid_net` fits it on the train split, measures test accuracy and
saves it (atomically) with everything needed to rebuild it and to tell which FID it gives:
architecture arguments, dataset name and content hash, the image size it expects, accuracy.
`load_fid_net` returns it as a feature extractor for `fid.FIDEvaluator`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paceray.protocol import PacerayError, one_line, progress_bar, write_atomic
from trainables.diffusion.data import load_split, read_manifest, to_unit_range

FORMAT_VERSION = 1
SAMPLES_PER_RUN = 360_000  # default epochs: this many images seen, within [3, 100] epochs (Fashion-MNIST: 6)


class FIDNet(nn.Module):
    """conv-conv-pool stages until the map is at most 7 px, then a linear feature layer and a
    classifier head. `features(x)` is the pre-activation of the feature layer: ReLU outputs have
    dead units and a half-clipped distribution, a poorer fit for a Gaussian."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16,
                 feature_dim: int = 128):
        super().__init__()
        self.arch = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                         width=width, feature_dim=feature_dim)
        layers, channels, size = [], in_channels, image_size
        out = width
        while True:
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
            if size <= 7:
                break
            layers.append(nn.MaxPool2d(2))
            size //= 2
            out *= 2
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(channels, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Float images in [-1, 1] -> (N, channels, size, size): gray <-> RGB, bilinear resize
    (antialiased when shrinking, as `data.resize_images` does for the reference images)."""
    if x.ndim != 4:
        raise ValueError(f"want images (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


class ClassifierFeatures(nn.Module):
    """A trained FIDNet as a torchmetrics feature extractor: [-1, 1] images of any size in,
    `num_features` float features out."""

    def __init__(self, net: FIDNet, dataset: str, weights_id: str):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.channels = net.arch["in_channels"]
        self.image_size = net.arch["image_size"]
        self.num_features = net.arch["feature_dim"]  # torchmetrics reads this instead of a dummy forward
        self.weights_id = weights_id  # tells two trainings apart: in the name and the statistics' cache key
        # The name is what FIDs are grouped by: a retrained network is another feature space.
        self.feature_name = f"classifier:{dataset}@{self.image_size}px(d={self.num_features})#{weights_id[:8]}"

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # BatchNorm and dropout stay in eval mode whatever the caller asks

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(fit_images(x, self.channels, self.image_size))


# --- training ---------------------------------------------------------------------------------

def default_epochs(train_images: int) -> int:
    return max(3, min(100, math.ceil(SAMPLES_PER_RUN / train_images)))


def _shifted(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to `max_shift` px (pad with background -1): cheap augmentation
    that keeps small datasets such as digits from being memorised."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(net: FIDNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_unit_range(images[start:start + batch_size])
        correct += int((net(x).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


@dataclass(frozen=True)
class FidNetRecipe:
    """How the FID network is trained: `epochs` (None: `default_epochs`; a fraction such as 0.25
    trains on that share of one epoch's batches), the seed, the batch size and learning rate,
    and the network's width and feature size."""

    epochs: float | None = None
    seed: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 16
    feature_dim: int = 128


def train_fid_net(dataset_dir: str | Path, out_path: str | Path, recipe: FidNetRecipe = FidNetRecipe(),
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train on the train split, measure on the test split, save to `out_path` atomically.

    Returns accuracy (test), epochs, seconds, train/test image counts, the dataset and the path.
    """
    start = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if "test" not in manifest["splits"]:
        raise PacerayError(f"{dataset_dir}: the FID network needs a test split to measure itself; "
                           f"{manifest['name']} has only {', '.join(manifest['splits'])}")
    train_x, train_y = load_split(dataset_dir, "train")
    test_x, test_y = load_split(dataset_dir, "test")
    channels, height, width_px = manifest["image_shape"]
    if height != width_px:
        raise PacerayError(f"{dataset_dir}: images are {height}x{width_px}; the FID network wants square images")
    epochs = default_epochs(len(train_x)) if recipe.epochs is None else recipe.epochs
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")

    torch.manual_seed(recipe.seed)
    device = torch.device(device)
    net = FIDNet(channels, height, manifest["num_classes"], recipe.width, recipe.feature_dim).to(device)
    _fit(net, (train_x, train_y), replace(recipe, epochs=epochs), device, manifest["name"])
    net = net.cpu()
    test_accuracy = accuracy(net, test_x, test_y)
    record = {
        "format_version": FORMAT_VERSION,
        "arch": net.arch,
        "state_dict": net.state_dict(),
        "dataset": manifest["name"],
        "dataset_hash": manifest["content_hash"],
        "image_size": height,
        "accuracy": test_accuracy,
        "epochs": epochs,
        "seed": recipe.seed,
    }
    out_path = Path(out_path)
    atomic_torch_save(record, out_path)
    return {"accuracy": test_accuracy, "epochs": epochs, "seconds": time.perf_counter() - start,
            "train_images": len(train_x), "test_images": len(test_x), "dataset": manifest["name"],
            "dataset_hash": manifest["content_hash"], "path": str(out_path)}


def _fit(net: FIDNet, train: tuple[torch.Tensor, torch.Tensor], recipe: FidNetRecipe, device: torch.device,
         dataset: str) -> None:
    """`recipe.epochs` passes over the shuffled, randomly shifted train split (the last pass may
    be a fraction), with a one-cycle learning rate."""
    train_x, train_y = train
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(train_x) / recipe.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=5e-4)
    total_steps = max(1, round(recipe.epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps)
    max_shift = max(1, train_x.shape[-2] // 8)
    step = 0
    with progress_bar(f"training the {dataset} FID network", total_steps, "steps") as advance:
        for _ in range(math.ceil(recipe.epochs)):
            net.train()
            order = torch.randperm(len(train_x), generator=generator)
            for first in range(0, len(order), recipe.batch_size):
                if step == total_steps:  # a fractional last epoch
                    break
                step += 1
                index = order[first:first + recipe.batch_size]
                x = _shifted(to_unit_range(train_x[index]), generator, max_shift).to(device)
                loss = F.cross_entropy(net(x), train_y[index].to(device), label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                advance(1)


def load_fid_net(path: str | Path, dataset_dir: str | Path | None = None) -> ClassifierFeatures:
    """The saved network as a feature extractor; with `dataset_dir`, refuse a network trained on
    other data (its FID would not be comparable)."""
    path = Path(path)
    if not path.is_file():
        raise PacerayError(f"no FID network at {path}: train one with `paceray fid-net train DATASET`")
    blob = path.read_bytes()
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        net = FIDNet(**record["arch"])
        net.load_state_dict(record["state_dict"])
    except Exception as e:  # a truncated, foreign or older file: the fix is the same
        raise PacerayError(one_line(f"{path} is not a paceray FID network ({type(e).__name__}: {e}); "
                                    f"delete it and run `paceray fid-net train DATASET`")) from None
    if dataset_dir is not None:
        manifest = read_manifest(dataset_dir)
        if manifest["content_hash"] != record["dataset_hash"]:
            raise PacerayError(f"{path} was trained on {record['dataset']} ({record['dataset_hash'][:12]}), not on "
                               f"{dataset_dir} ({manifest['content_hash'][:12]}): run `paceray fid-net train "
                               f"{manifest['name']}`")
    return ClassifierFeatures(net, record["dataset"], hashlib.sha256(blob).hexdigest()[:16])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save under a temporary name, then rename (paceray.atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))
