"""FID through torchmetrics, with our feature extractors, cached reference statistics and DDP.

Two extractors (`load_extractor`), both nn.Modules taking float images in [-1, 1] of any size:

- `classifier`: the dataset's own small CNN (`fid_net`), a domain FID with no download.
- `inception`: Inception-v3 pool features (2048-d), the literature's FID. The weights are the
  TorchScript export of the TF "2015-12-05" graph that StyleGAN2-ADA, EDM and clean-fid load
  (torch-fidelity converts the same graph). torch-fidelity itself cannot be used here: it
  imports torchvision, and no torchvision build on the package index matches our torch CPU
  wheel. The file comes from `inception_weights`, `$PACERAY_INCEPTION_WEIGHTS`, an earlier
  download, or a download where a network exists.

Reference statistics (n, feature sum, sum of outer products, float64) are computed once per
(dataset content hash, split, extractor and its weights, image size) and cached on disk.

`FIDEvaluator` holds a torchmetrics `FrechetInceptionDistance` whose states torchmetrics sums
across ranks at `compute()` when torch.distributed is initialised. The reference statistics are
therefore loaded on rank 0 only (zeros on the others), so the summed reference is exact and the
FID from N ranks equals the one-process FID on the same images.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from paceray.protocol import PacerayError, one_line
from trainables.diffusion.data import load_split, read_manifest, resize_images, to_unit_range
from trainables.diffusion.datasets_sources import DOWNLOAD_ERRORS, download, file_digest
from trainables.diffusion.fid_net import atomic_torch_save, load_fid_net

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "PACERAY_INCEPTION_WEIGHTS"
DOWNLOAD_TIMEOUT_S = 60
EXTRACTORS = ("classifier", "inception")
STATS_VERSION = 2  # 2: the reference features KID needs are cached with the statistics
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
KID_MAX_REFERENCE = 10_000  # reference features kept for KID (a fixed subset of larger splits)


# --- extractors -------------------------------------------------------------------------------

class InceptionFeatures(nn.Module):
    """The TorchScript Inception-v3 as a feature extractor: [-1, 1] images -> 2048 pool features.

    The network takes RGB pixel values in [0, 255], resizes to 299x299 itself (bilinear) and
    normalises inside; we round to whole pixel values as a saved PNG would hold them."""

    num_features = 2048

    def __init__(self, scripted: torch.jit.ScriptModule, weights_id: str):
        super().__init__()
        self.net = scripted.eval()
        self.weights_id = weights_id
        # FIDs are grouped by this name: another file (another conversion) is another feature space.
        self.feature_name = f"inception-v3-2015-12-05(d=2048)#{weights_id[:8]}"

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"want gray or RGB images (N, 1|3, H, W), got shape {tuple(x.shape)}")
        pixels = x.float().expand(-1, 3, -1, -1).clamp(-1, 1).add(1).mul(127.5).round()
        features = self.net(pixels, return_features=True)
        return features.reshape(len(x), -1).float()


def _download(url: str, dest: Path) -> None:
    try:
        download(url, dest, DOWNLOAD_TIMEOUT_S)
    except DOWNLOAD_ERRORS as e:
        raise PacerayError(one_line(
            f"cannot download the Inception-v3 weights from {url} ({e}): fetch {INCEPTION_FILE} from that "
            f"URL elsewhere and pass eval.inception_weights=PATH or set {INCEPTION_ENV}=PATH, "
            f"or use eval.features=classifier (no download)")) from None


def load_inception(weights: str | Path | None = None, *, url: str = INCEPTION_URL,
                   cache_dir: str | Path | None = None) -> InceptionFeatures:
    """Weights from `weights`, else $PACERAY_INCEPTION_WEIGHTS, else `cache_dir` (default: torch
    hub's checkpoint folder), downloading there first if the file is not there yet."""
    weights = weights or os.environ.get(INCEPTION_ENV) or None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PacerayError(f"Inception-v3 weights {path} not found: download {INCEPTION_FILE} from "
                               f"{INCEPTION_URL} and give its path (eval.inception_weights or {INCEPTION_ENV})")
    else:
        folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        path = folder / INCEPTION_FILE
        if not path.is_file():
            _download(url, path)
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # not a TorchScript archive: a torch-fidelity .pth, a truncated download, ...
        raise PacerayError(one_line(f"{path} is not the TorchScript Inception-v3 ({type(e).__name__}: {e}); "
                                    f"use {INCEPTION_FILE} from {INCEPTION_URL}")) from None
    return InceptionFeatures(scripted, file_digest(path, "sha256")[:16])


def load_extractor(kind: str, *, dataset_dir: str | Path | None = None, fid_net_path: str | Path | None = None,
                   inception_weights: str | Path | None = None,
                   inception_cache_dir: str | Path | None = None) -> nn.Module:
    """The feature extractor `kind` ("classifier" or "inception"), in eval mode on the CPU.

    It has `feature_name` (e.g. "classifier:digits@8px(d=128)"), `num_features` and
    `weights_id` (a digest of its weights file)."""
    if kind == "classifier":
        if fid_net_path is None:
            raise PacerayError("eval.features=classifier needs a trained FID network: run `paceray fid-net train DATASET`")
        return load_fid_net(fid_net_path, dataset_dir)
    if kind == "inception":
        return load_inception(inception_weights, cache_dir=inception_cache_dir)
    raise PacerayError(f"unknown FID features {kind!r}: use one of {', '.join(EXTRACTORS)}")





# --- reference statistics ---------------------------------------------------------------------

class Precomputed(nn.Module):
    """What the torchmetrics metrics are given as their extractor: features computed once by
    ours, shared by FID and KID (one feature pass per batch for both)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class ReferenceStats:
    """Sufficient statistics of the real images' features, in torchmetrics' state layout, and the
    features themselves (at most KID_MAX_REFERENCE, a fixed subset) for KID."""

    num_samples: int
    feature_sum: torch.Tensor  # (d,) float64
    outer_sum: torch.Tensor  # (d, d) float64: sum of f f^T
    features: str  # the extractor's feature_name
    key: dict[str, Any]  # what they were computed from
    kid_features: Optional[torch.Tensor] = None  # (m, d) float32

    def mean_and_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.feature_sum / self.num_samples
        cov = (self.outer_sum - self.num_samples * torch.outer(mean, mean)) / (self.num_samples - 1)
        return mean, cov


@functools.cache
def _fid_class():
    """torchmetrics' FID whose compute also returns the (synced) sample counts, in float64.
    Defined on first use: importing torchmetrics costs ~2 s, and a command whose reference
    statistics are cached (every one after the first) never computes a FID on the driver."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class _FID(FrechetInceptionDistance):
        def update(self, imgs: torch.Tensor, real: bool) -> None:
            super().update(imgs, real)
            self.orig_dtype = torch.float64  # keep full precision; the caller rounds if it wants

        def compute(self) -> dict[str, Any]:
            # Runs inside torchmetrics' sync context: the states here are the sums over all ranks.
            num_real, num_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
            fid = super().compute() if min(num_real, num_fake) >= 2 else torch.tensor(float("nan"))
            return {"fid": fid, "num_real": num_real, "num_fake": num_fake}

    return _FID


def _metric(extractor: nn.Module):
    # normalize=False: our extractors take [-1, 1] floats themselves; reset_real_features=False:
    # reset() between evaluations keeps the reference side.
    metric = _fid_class()(feature=extractor, normalize=False, reset_real_features=False)
    metric.orig_dtype = torch.float64  # for a rank that saw no fake image
    return metric


@dataclass(frozen=True)
class ReferenceImages:
    """Which real images `reference_statistics` describes: those of `split`, resized to
    `image_size` (the size the generator makes; None: the dataset's own), fed to the extractor
    `batch_size` at a time."""

    split: str = "train"
    image_size: int | None = None
    batch_size: int = 256


def reference_statistics(extractor: nn.Module, dataset_dir: str | Path, cache_dir: str | Path,
                         which: ReferenceImages = ReferenceImages(),
                         device: str | torch.device = "cpu") -> ReferenceStats:
    """The real images' feature statistics, from `cache_dir` if computed before.

    The images of `which.split` are resized to `which.image_size` with `data.resize_images`,
    exactly as training sees them, then fed in [-1, 1] to the extractor. Under DDP only rank 0
    needs these (see FIDEvaluator).
    """
    split, batch_size = which.split, which.batch_size
    manifest = read_manifest(dataset_dir)
    image_size = which.image_size or manifest["image_shape"][-1]
    key = {"version": STATS_VERSION, "dataset": manifest["name"], "dataset_hash": manifest["content_hash"],
           "split": split, "features": extractor.feature_name, "weights": extractor.weights_id,
           "image_size": image_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"refstats-{manifest['name']}-{split}-{image_size}px-{digest}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                return ReferenceStats(saved["num_samples"], saved["feature_sum"], saved["outer_sum"],
                                      saved["features"], saved["key"], saved["kid_features"])
        except Exception:  # unreadable: fall through and compute it again (written atomically below)
            pass
    images, _ = load_split(dataset_dir, split)
    metric = _metric(Precomputed(extractor.num_features)).to(device)
    kept = _kid_reference_rows(len(images))
    kid_rows = []
    for start in range(0, len(images), batch_size):
        batch = resize_images(images[start:start + batch_size].to(device), image_size)
        with torch.no_grad():
            features = extractor(to_unit_range(batch))
        metric.update(features, real=True)
        rows = kept[(kept >= start) & (kept < start + len(batch))] - start
        kid_rows.append(features[rows.to(features.device)].float().cpu())
    stats = ReferenceStats(int(metric.real_features_num_samples), metric.real_features_sum.cpu(),
                           metric.real_features_cov_sum.cpu(), extractor.feature_name, key, torch.cat(kid_rows))
    atomic_torch_save({"num_samples": stats.num_samples, "feature_sum": stats.feature_sum,
                       "outer_sum": stats.outer_sum, "features": stats.features, "key": key,
                       "kid_features": stats.kid_features}, path)
    return stats


def _kid_reference_rows(n: int) -> torch.Tensor:
    """The reference images whose features KID keeps: all up to KID_MAX_REFERENCE, else a fixed
    random subset (seed 0), in dataset order."""
    if n <= KID_MAX_REFERENCE:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:KID_MAX_REFERENCE].sort().values


# --- evaluation -------------------------------------------------------------------------------

class FIDEvaluator:
    """FID and KID of generated images against the cached reference, exact under DDP.

    Every rank calls `update` with its share of generated images (floats in [-1, 1]) and then
    `compute()` (a collective when torch.distributed is initialised); every rank gets the same
    {"fid", "kid", "kid_std", "kid_subset_size", "features", "num_fake", "num_real",
    "class_accuracy"}. `reference` may be None on ranks other than 0.

    Images given with the labels they were drawn for (a class-conditional model's) are also
    classified by the extractor's own classifier head, where it has one (the `classifier` FID
    network): `class_accuracy` is the share of them it assigns their label, summed over ranks
    (NaN without labels or without a head, e.g. Inception).

    One feature pass per batch feeds both metrics. FID: torchmetrics sums its states over ranks.
    KID (torchmetrics' KernelInceptionDistance, polynomial kernel, KID_SUBSETS subsets of
    min(KID_MAX_SUBSET, n) samples): the generated features are gathered on rank 0, put in an
    order that does not depend on which rank drew them, scored with a fixed seed, and the result
    broadcast, so N ranks and one process give the same KID on the same images.
    """

    def __init__(self, extractor: nn.Module, reference: ReferenceStats | None,
                 device: str | torch.device = "cpu"):
        self.features = extractor.feature_name
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device)
        self.num_features = extractor.num_features
        self.metric = _metric(Precomputed(self.num_features)).to(self.device)
        self._fake: list[torch.Tensor] = []
        self._classified = torch.zeros(2, dtype=torch.float64, device=self.device)  # correct, counted
        self.kid_reference = None
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if self.rank != 0:
            return  # zeros here: torchmetrics sums the states over ranks, rank 0 holds the reference
        if reference is None:
            raise ValueError("FIDEvaluator needs the reference statistics on rank 0")
        if reference.features != self.features:
            raise PacerayError(f"reference statistics are of {reference.features} features, the extractor gives "
                               f"{self.features}: compute them with this extractor")
        if reference.num_samples < 2:
            raise PacerayError(f"reference statistics hold {reference.num_samples} image(s); FID needs at least 2")
        self.metric.real_features_sum = reference.feature_sum.to(self.device, torch.float64)
        self.metric.real_features_cov_sum = reference.outer_sum.to(self.device, torch.float64)
        self.metric.real_features_num_samples = torch.tensor(reference.num_samples, device=self.device)
        self.kid_reference = reference.kid_features

    @torch.no_grad()
    def update(self, fake: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.update_features(self.extractor(fake.to(self.device)), labels)

    @property
    def classifies(self) -> bool:
        """Whether the extractor has a classifier head on its features (a FIDNet's)."""
        return hasattr(getattr(self.extractor, "net", None), "head")

    @torch.no_grad()
    def update_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Count generated images by their features (from this evaluator's extractor) and, given
        the labels they were drawn for, whether its classifier head agrees."""
        self.metric.update(features, real=False)
        self._fake.append(features.detach().float())
        if labels is not None and self.classifies:
            predicted = self.extractor.net.head(features).argmax(dim=1)
            self._classified[0] += float((predicted == labels.to(predicted.device)).sum())
            self._classified[1] += len(labels)

    def fork(self) -> "FIDEvaluator":
        """An evaluator of its own generated images, sharing this one's extractor and reference:
        several models scored side by side (`update_together`) hold one feature network."""
        other = copy.copy(self)
        other.metric = self.metric.clone()
        other._fake = []
        other._classified = torch.zeros_like(self._classified)
        return other

    def compute(self) -> dict[str, Any]:
        result = self.metric.compute()
        if result["num_fake"] < 2 or result["num_real"] < 2:
            raise PacerayError(f"FID needs at least 2 generated and 2 reference images, got {result['num_fake']} "
                               f"and {result['num_real']}: raise eval.fid_samples")
        kid, kid_std, subset = self._kid()
        return {"fid": float(result["fid"]), "kid": kid, "kid_std": kid_std, "kid_subset_size": subset,
                "features": self.features, "num_fake": result["num_fake"], "num_real": result["num_real"],
                "class_accuracy": self._class_accuracy()}

    def _class_accuracy(self) -> float:
        counts = self._classified.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # every rank, every eval: a collective like the others here
        correct, counted = counts.tolist()
        return correct / counted if counted else float("nan")

    def _kid(self) -> tuple[float, float, int]:
        local = torch.cat(self._fake) if self._fake else torch.zeros(0, self.num_features, device=self.device)
        fake = _gather_rows(local)
        out = torch.full((3,), float("nan"), dtype=torch.float64, device=self.device)
        if self.rank == 0 and self.kid_reference is not None:
            out[:] = torch.tensor(kid_score(self.kid_reference, fake.cpu()), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(out, src=0)
        kid, std, subset = out.tolist()
        return kid, std, 0 if math.isnan(subset) else int(subset)

    def reset(self) -> None:
        """Forget the generated images; keep the reference."""
        self.metric.reset()
        self._fake = []
        self._classified.zero_()


@torch.no_grad()
def update_together(evaluators: list[FIDEvaluator], fakes: list[torch.Tensor],
                    labels: list[torch.Tensor | None] | None = None) -> None:
    """Each evaluator's batch of generated images (and the labels they were drawn for, if any)
    through one pass of their shared extractor (see `FIDEvaluator.fork`): one larger batch rather
    than one per model, the same features up to the extractor's floating-point reduction order."""
    extractor = evaluators[0].extractor
    if any(e.extractor is not extractor for e in evaluators):
        raise ValueError("update_together needs evaluators forked from one (one extractor)")
    features = extractor(torch.cat([x.to(evaluators[0].device) for x in fakes]))
    for evaluator, part, y in zip(evaluators, features.split([len(x) for x in fakes]), labels or [None] * len(fakes)):
        evaluator.update_features(part, y)


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, rank 0's first (shares may differ in length by one)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes)])


def kid_score(reference: torch.Tensor, fake: torch.Tensor) -> tuple[float, float, float]:
    """(KID mean, std over subsets, subset size) with torchmetrics' KernelInceptionDistance; NaN
    when either side has fewer than 2 samples. The generated features are first sorted by a fixed
    random projection, so the score does not depend on the order they arrived in."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(KID_MAX_SUBSET, len(reference), len(fake))
    if subset < 2:
        return float("nan"), float("nan"), float(subset)
    projection = torch.randn(fake.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fake = fake.double()[torch.argsort(fake.double() @ projection)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": that is the point
        metric = KernelInceptionDistance(feature=Precomputed(fake.shape[1]), subsets=KID_SUBSETS, subset_size=subset,
                                         sync_on_compute=False)
    metric.update(reference.double(), real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same subsets at every eval, on every world size
        mean, std = metric.compute()
    return float(mean), float(std), float(subset)
