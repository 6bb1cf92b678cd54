"""Raw dataset formats -> numpy arrays, and the downloads that fetch them.

Readers: IDX files (MNIST, Fashion-MNIST), the CIFAR-10 python batches, scikit-learn's bundled
8x8 digits, and a folder of class sub-folders of images. Each returns a `RawDataset`: per split
uint8 images (N, C, H, W) and int64 labels (N,). No torch here: preparing a dataset needs only
numpy, PIL and the standard library.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from paceray.protocol import PacerayError, one_line, write_atomic

# Debian's `dataset-fashion-mnist` installs the four gzip'd IDX files here.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # yann.lecun.com refuses bots
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 20.0

# md5 of the files the URLs above serve (the checksums torchvision verifies). Debian re-gzips
# Fashion-MNIST, so its .gz files differ byte-wise: only downloads are checked against these.
_IDX_MD5 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
_CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

IDX_STEMS = {"train": "train", "test": "t10k"}  # split -> file name prefix
IDX_HINT = "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

DIGIT_NAMES = [str(d) for d in range(10)]
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass
class RawDataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 (N,C,H,W), int64 (N,))
    class_names: list[str] | None
    source: str  # where it was read from, recorded in the manifest


def read_raw(dataset: str, source: str | Path | None, cache_dir: Path, download: bool) -> RawDataset:
    """Find (or fetch) `dataset`'s raw files and read them into memory."""
    if dataset == "digits":
        if source is not None:
            raise PacerayError("digits is bundled with scikit-learn and takes no source: drop source/--source")
        return read_digits()
    if dataset in ("mnist", "fashion-mnist"):
        directory = locate_idx(dataset, source, cache_dir, download)
        names = FASHION_MNIST_NAMES if dataset == "fashion-mnist" else DIGIT_NAMES
        return RawDataset(read_idx_dir(directory), names, str(directory))
    if dataset == "cifar10":
        return read_cifar10(locate_cifar10(source, cache_dir, download))
    if dataset == "imagefolder":
        if source is None:
            raise PacerayError("imagefolder needs source=DIR (--source DIR): a folder with one sub-folder of images per class")
        return read_image_folder(Path(source))
    raise PacerayError(f"unknown dataset {dataset!r}: use digits, mnist, fashion-mnist, cifar10 or imagefolder")


# --- scikit-learn digits --------------------------------------------------------------------

def read_digits() -> RawDataset:
    from sklearn.datasets import load_digits  # slow import; only this dataset needs it

    bunch = load_digits()
    # Pixel values are 0..16: stretch to the full uint8 range like every other dataset.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # Every 5th image is test (20%): deterministic with no RNG whose stream could change
    # between numpy versions, and balanced because the bundle cycles through the digits.
    is_test = np.arange(len(labels)) % 5 == 4
    splits = {"train": (images[~is_test], labels[~is_test]), "test": (images[is_test], labels[is_test])}
    return RawDataset(splits, DIGIT_NAMES, "sklearn.datasets.load_digits")


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_stems() -> list[str]:
    return [f"{prefix}-{kind}" for prefix in IDX_STEMS.values()
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def _missing_idx(directory: Path) -> list[str]:
    return [stem for stem in _idx_stems() if _idx_file(directory, stem) is None]


def locate_idx(dataset: str, source: str | Path | None, cache_dir: Path, download: bool) -> Path:
    """The directory holding `dataset`'s four IDX files: source, the system copy, or a download."""
    if source is not None:
        directory = Path(source).expanduser().resolve()
        missing = _missing_idx(directory)
        if missing:
            raise PacerayError(f"{dataset}: {directory} has no {missing[0]}[.gz]; "
                               f"pass --source DIR holding {IDX_HINT}")
        return directory
    downloads = Path(cache_dir) / "downloads" / dataset
    looked = ([FASHION_MNIST_DIR] if dataset == "fashion-mnist" else []) + [downloads]
    for directory in looked:
        if not _missing_idx(directory):
            return directory
    url = FASHION_MNIST_URL if dataset == "fashion-mnist" else MNIST_URL
    if not download:
        apt = "run `apt-get install dataset-fashion-mnist`, " if dataset == "fashion-mnist" else ""
        raise PacerayError(f"{dataset}: no IDX files in {' or '.join(map(str, looked))}; {apt}"
                           f"pass --source DIR holding {IDX_HINT}, or allow the download from {url} (needs a network)")
    for name, md5 in _IDX_MD5[dataset].items():
        if _idx_file(downloads, name[: -len(".gz")]) is None:
            apt = " (or run `apt-get install dataset-fashion-mnist`)" if dataset == "fashion-mnist" else ""
            fetch(url + name, downloads / name, md5, what=dataset, holding=IDX_HINT + apt)
    return downloads


def read_idx(path: Path) -> np.ndarray:
    """One IDX file of unsigned bytes (gzip'd or not) as an array of the shape its header says."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: truncated gzip
        raise PacerayError(one_line(f"{path}: cannot read it ({e}); replace the file")) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PacerayError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, want 000008xx)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = memoryview(data)[header:]
    if len(body) != int(np.prod(dims)):
        raise PacerayError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {len(body)}; replace the file")
    return np.frombuffer(body, np.uint8).reshape(dims)


def read_idx_dir(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split, prefix in IDX_STEMS.items():
        images_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PacerayError(f"{directory}: {images_path.name} holds {images.shape}, {labels_path.name} "
                               f"holds {labels.shape}; want (N, H, W) images and N labels")
        splits[split] = (images[:, None], labels.astype(np.int64))
    return splits


# --- CIFAR-10 python batches ----------------------------------------------------------------

def _cifar10_batches_dir(directory: Path) -> Path:
    nested = directory / "cifar-10-batches-py"
    return nested if nested.is_dir() else directory


def _missing_cifar10(directory: Path) -> list[str]:
    return [name for names in CIFAR10_BATCHES.values() for name in names if not (directory / name).is_file()]


def locate_cifar10(source: str | Path | None, cache_dir: Path, download: bool) -> Path:
    hint = "cifar-10-batches-py (data_batch_1..5, test_batch)"
    if source is not None:
        directory = _cifar10_batches_dir(Path(source).expanduser().resolve())
        missing = _missing_cifar10(directory)
        if missing:
            raise PacerayError(f"cifar10: {directory} has no {missing[0]}; pass --source DIR holding {hint}")
        return directory
    downloads = Path(cache_dir) / "downloads" / "cifar10"
    directory = downloads / "cifar-10-batches-py"
    if not _missing_cifar10(directory):
        return directory
    if not download:
        raise PacerayError(f"cifar10: no CIFAR-10 python batches in {directory}; pass --source DIR holding {hint}, "
                           f"or allow the download from {CIFAR10_URL} (needs a network)")
    archive = downloads / "cifar-10-python.tar.gz"
    if not archive.is_file():
        fetch(CIFAR10_URL, archive, _CIFAR10_MD5, what="cifar10", holding=hint)
    unpack = Path(tempfile.mkdtemp(prefix=".extract-", dir=downloads))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(unpack, filter="data")  # "data": no absolute paths, links or devices
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete earlier copy
        os.replace(unpack / "cifar-10-batches-py", directory)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise PacerayError(one_line(f"cifar10: cannot unpack {archive} ({e}); delete it and retry")) from None
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
    return directory


def _load_pickle(path: Path) -> dict:
    # The CIFAR batches are pickles: only read a directory you trust (as with any pickle).
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise PacerayError(one_line(f"cifar10: cannot unpickle {path} ({type(e).__name__}: {e}); replace it")) from None
    if not isinstance(batch, dict):
        raise PacerayError(f"cifar10: {path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    return batch


def read_cifar10(directory: Path) -> RawDataset:
    splits = {}
    for split, names in CIFAR10_BATCHES.items():
        images, labels = [], []
        for name in names:
            path = directory / name
            batch = _load_pickle(path)
            if b"data" not in batch or b"labels" not in batch:
                raise PacerayError(f"cifar10: {path} lacks b'data' or b'labels'; not a CIFAR-10 python batch")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
                raise PacerayError(f"cifar10: {path} has data {data.shape} and {len(batch_labels)} labels; "
                                   "want (N, 3072) and N")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
            labels.append(batch_labels)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    names = CIFAR10_NAMES
    if (directory / "batches.meta").is_file():
        meta = _load_pickle(directory / "batches.meta")
        if b"label_names" in meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    return RawDataset(splits, names, str(directory))


# --- a folder of class folders of images ----------------------------------------------------

def image_folder_files(source: str | Path) -> tuple[Path, list[str], list[tuple[Path, int]]]:
    """An image folder's root, its classes (sorted sub-folder names) and its images with their
    labels, in the order they are prepared (by class, then file name): captions follow it."""
    root = Path(source).expanduser().resolve()
    how = "pass --source DIR holding one sub-folder of images per class"
    if not root.is_dir():
        raise PacerayError(f"imagefolder: {root} is not a directory; {how}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((root / name).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")]
    if not files:
        raise PacerayError(f"imagefolder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in sub-folders of {root}; {how}")
    return root, classes, files


def read_image_folder(source: Path) -> RawDataset:
    from PIL import Image, UnidentifiedImageError

    root, classes, files = image_folder_files(source)

    images = None
    first = files[0][0]
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as image:
                if images is None:  # the first image decides the mode and the size of all
                    mode = "L" if image.mode in _GRAY_MODES else "RGB"
                    width, height = image.size
                    images = np.empty((len(files), 1 if mode == "L" else 3, height, width), np.uint8)
                if image.size != (width, height):
                    raise PacerayError(f"imagefolder: {path} is {image.size[0]}x{image.size[1]} but {first} is "
                                       f"{width}x{height}; resize all images to one size")
                pixels = np.asarray(image.convert(mode))
        except (OSError, UnidentifiedImageError) as e:
            raise PacerayError(one_line(f"imagefolder: cannot read {path} ({e}); fix or remove it")) from None
        images[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return RawDataset({"train": (images, labels)}, classes, str(root))


# --- downloads ------------------------------------------------------------------------------

def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DOWNLOAD_ERRORS = (OSError, ValueError, http.client.HTTPException)  # URLError, timeouts: OSError


def download(url: str, dest: Path, timeout: float, check=None) -> None:
    """`url` to `dest`, atomically (a partial file never has the final name); `check(tmp)` may
    refuse the downloaded file before it gets that name. Raises one of DOWNLOAD_ERRORS."""
    def write(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        if check is not None:
            check(Path(tmp))

    write_atomic(dest, write)


def fetch(url: str, dest: Path, md5: str | None, what: str, holding: str) -> Path:
    """Download a dataset file `url` to `dest`, checked against its md5."""
    def check(tmp: Path) -> None:
        if md5 is not None and (got := file_digest(tmp, "md5")) != md5:
            raise PacerayError(f"download of {what} from {url} has md5 {got}, expected {md5}: retry, "
                               f"or pass source=DIR (--source DIR) holding {holding}")

    try:
        download(url, dest, DOWNLOAD_TIMEOUT_S, check)
    except DOWNLOAD_ERRORS as e:
        raise PacerayError(one_line(f"could not download {what} from {url} (no network?): "
                                    f"pass source=DIR (--source DIR) holding {holding} [{e}]")) from None
    return dest
