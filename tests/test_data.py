"""The dataset layer: every kind prepared from small files written in its real format."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paceray.base.errors import PacerayError
from trainables.diffusion import data
from trainables.diffusion import datasets_sources

RNG = np.random.default_rng(1234)


# --- writers of the real formats ------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gzipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_idx_dataset(directory: Path, gzipped: bool, train: int = 13, test: int = 5, h: int = 6, w: int = 5):
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = RNG.integers(0, 256, (n, h, w), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gzipped)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gzipped)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar10(directory: Path, per_batch: int = 4, test: int = 3):
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {b"batch_label": name.encode(), b"labels": RNG.integers(0, 10, n).tolist(),
                 b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in datasets_sources.CIFAR10_NAMES],
            b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_image_folder(root: Path, mode: str = "RGB", size=(5, 4)) -> dict[str, list[np.ndarray]]:
    channels = 3 if mode == "RGB" else 1
    written = {}
    for name, count in (("zebra", 2), ("ant", 3)):  # written unsorted; labels follow sorted names
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(count):
            pixels = RNG.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name / f"{i}.png")
            written[name].append(pixels.transpose(2, 0, 1))
    (root / "ant" / "notes.txt").write_text("not an image")
    return written


def assert_one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- each dataset kind ----------------------------------------------------------------------

def test_digits_shapes_counts_labels_and_manifest(tmp_path):
    path = data.prepare("digits", tmp_path)
    assert path == tmp_path.resolve() / "datasets" / "digits"
    manifest = data.read_manifest(path)
    assert manifest["name"] == "digits" and manifest["format_version"] == data.FORMAT_VERSION
    assert manifest["image_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["splits"]["train"]["count"] == 1438 and manifest["splits"]["test"]["count"] == 359
    images, labels = data.load_split(path, "train")
    assert images.dtype == torch.uint8 and images.shape == (1438, 1, 8, 8)
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert int(images.max()) == 255 and int(images.min()) == 0  # 0..16 stretched to 0..255
    test_images, _ = data.load_split(path, "test")
    # train and test are disjoint (no image appears in both)
    train_rows = {bytes(row) for row in images.reshape(len(images), -1).numpy()}
    assert sum(bytes(row) in train_rows for row in test_images.reshape(len(test_images), -1).numpy()) < 5


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, dataset, gzipped):
    written = write_idx_dataset(tmp_path / "raw", gzipped)
    path = data.prepare(dataset, tmp_path / "cache", source=tmp_path / "raw", download=False)
    manifest = data.read_manifest(path)
    assert manifest["image_shape"] == [1, 6, 5]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 13, "test": 5}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data.load_split(path, split)
        assert torch.equal(images, torch.from_numpy(written[prefix][0][:, None]))
        assert labels.tolist() == written[prefix][1].tolist()


def test_truncated_idx_names_the_file(tmp_path):
    write_idx_dataset(tmp_path / "raw", gzipped=False)
    broken = tmp_path / "raw" / "t10k-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:-7])
    with pytest.raises(PacerayError) as excinfo:
        data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw")
    assert_one_line_error(excinfo, str(broken), "header says")


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_batches(tmp_path, nested):
    batches_dir = tmp_path / "raw" / "cifar-10-batches-py" if nested else tmp_path / "raw"
    batches = write_cifar10(batches_dir)
    path = data.prepare("cifar10", tmp_path / "cache", source=tmp_path / "raw")
    manifest = data.read_manifest(path)
    assert manifest["image_shape"] == [3, 32, 32] and manifest["class_names"][0] == "airplane"
    images, labels = data.load_split(path, "train")
    assert images.shape == (20, 3, 32, 32)
    first = batches["data_batch_1"]
    # CIFAR rows are the red plane, then green, then blue, each row-major 32x32
    assert torch.equal(images[0, 1].flatten(), torch.from_numpy(first[b"data"][0, 1024:2048]))
    assert labels[:4].tolist() == first[b"labels"]
    assert labels[16:].tolist() == batches["data_batch_5"][b"labels"]
    test_images, test_labels = data.load_split(path, "test")
    assert len(test_images) == 3 and test_labels.tolist() == batches["test_batch"][b"labels"]


def test_image_folder_rgb_labels_from_sorted_folders(tmp_path):
    written = write_image_folder(tmp_path / "pics")
    path = data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")
    assert path.parent == (tmp_path / "cache").resolve() / "datasets"
    assert path.name.startswith("imagefolder-") and len(path.name) == len("imagefolder-") + 12
    manifest = data.read_manifest(path)
    assert manifest["class_names"] == ["ant", "zebra"] and manifest["num_classes"] == 2
    assert manifest["image_shape"] == [3, 4, 5] and list(manifest["splits"]) == ["train"]
    images, labels = data.load_split(path)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    expected = np.stack(written["ant"] + written["zebra"])
    assert torch.equal(images, torch.from_numpy(expected))


def test_an_edited_image_folder_is_prepared_again(tmp_path):
    write_image_folder(tmp_path / "pics")
    first = data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")
    assert data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics") == first  # unchanged: kept
    edited = tmp_path / "pics" / "zebra" / sorted(p.name for p in (tmp_path / "pics" / "zebra").iterdir())[0]
    Image.new("RGB", (5, 4), (255, 0, 0)).save(edited)
    second = data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")
    assert second != first
    images, _ = data.load_split(second)
    assert images[3].tolist() == np.array(Image.open(edited)).transpose(2, 0, 1).tolist()
    # the fingerprint a trial's config carries finds the same shards without reading the folder
    fingerprint = data.folder_fingerprint(tmp_path / "pics")
    assert data.dataset_dir("imagefolder", tmp_path / "cache", tmp_path / "pics", fingerprint) == second


def test_image_folder_gray_when_first_image_is_gray(tmp_path):
    written = write_image_folder(tmp_path / "pics", mode="L")
    path = data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")
    images, _ = data.load_split(path)
    assert images.shape == (5, 1, 4, 5)
    assert torch.equal(images[0], torch.from_numpy(written["ant"][0]))


def test_image_folder_size_mismatch_names_the_file(tmp_path):
    write_image_folder(tmp_path / "pics")
    odd = tmp_path / "pics" / "zebra" / "odd.png"
    Image.new("RGB", (7, 4)).save(odd)
    with pytest.raises(PacerayError) as excinfo:
        data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")
    assert_one_line_error(excinfo, str(odd), "7x4", "5x4")
    assert not (tmp_path / "cache" / "datasets").exists() or not any((tmp_path / "cache" / "datasets").iterdir())


def test_fashion_mnist_from_the_debian_package(tmp_path, fashion_mnist):
    path = data.prepare("fashion-mnist", tmp_path, download=False)
    manifest = data.read_manifest(path)
    assert manifest["image_shape"] == [1, 28, 28]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 60000, "test": 10000}
    assert manifest["class_names"][9] == "Ankle boot"
    _, labels = data.load_split(path, "test", rank=1, world_size=4)
    assert len(labels) == 2500 and torch.bincount(labels).min() > 200  # every class on every rank


# --- written once, atomically, addressed by content ----------------------------------------

def test_content_hash_is_stable_and_tracks_content(tmp_path):
    write_cifar10(tmp_path / "raw")
    first = data.read_manifest(data.prepare("cifar10", tmp_path / "a", source=tmp_path / "raw"))
    second = data.read_manifest(data.prepare("cifar10", tmp_path / "b", source=tmp_path / "raw"))
    assert first["content_hash"] == second["content_hash"]
    batch = pickle.loads((tmp_path / "raw" / "test_batch").read_bytes())
    batch[b"data"][0, 0] ^= 1  # one bit of one pixel
    (tmp_path / "raw" / "test_batch").write_bytes(pickle.dumps(batch))
    third = data.read_manifest(data.prepare("cifar10", tmp_path / "c", source=tmp_path / "raw"))
    assert third["content_hash"] != first["content_hash"]


def test_second_prepare_is_a_no_op(tmp_path):
    write_idx_dataset(tmp_path / "raw", gzipped=True)
    path = data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw")
    before = {p: p.stat().st_mtime_ns for p in [path, *path.iterdir()]}
    for p in (tmp_path / "raw").iterdir():
        p.unlink()  # a second call that read the source again would now fail
    assert data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw") == path
    assert {p: p.stat().st_mtime_ns for p in [path, *path.iterdir()]} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["mnist"]


def test_a_crash_while_writing_leaves_nothing(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "raw", gzipped=False, train=40)
    monkeypatch.setattr(data, "SHARD_ROWS", 8)
    real_write, calls = data.pq.write_table, []

    def write_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(data.pq, "write_table", write_then_die)
    with pytest.raises(OSError, match="disk full"):
        data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw")
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []
    monkeypatch.setattr(data.pq, "write_table", real_write)
    path = data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw")
    assert data.read_manifest(path)["splits"]["train"] == {"count": 40, "shards": [f"train-{i:05d}.parquet" for i in range(5)]}


# --- one shard per rank ---------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_rank_shards_are_disjoint_and_cover_the_split(tmp_path, monkeypatch, world_size):
    monkeypatch.setattr(data, "SHARD_ROWS", 7)  # shard boundaries that do not align with ranks
    write_idx_dataset(tmp_path / "raw", gzipped=False, train=30)
    path = data.prepare("mnist", tmp_path / "cache", source=tmp_path / "raw")
    assert len(data.read_manifest(path)["splits"]["train"]["shards"]) == 5
    whole_images, whole_labels = data.load_split(path, "train")
    parts = [data.load_split(path, "train", rank=r, world_size=world_size) for r in range(world_size)]
    assert sum(len(images) for images, _ in parts) == 30
    for rank, (images, labels) in enumerate(parts):
        assert torch.equal(images, whole_images[rank::world_size])
        assert torch.equal(labels, whole_labels[rank::world_size])


def test_bad_rank_and_missing_split(tmp_path):
    path = data.prepare("digits", tmp_path)
    with pytest.raises(ValueError):
        data.load_split(path, rank=2, world_size=2)
    with pytest.raises(PacerayError) as excinfo:
        data.load_split(path, "validation")
    assert_one_line_error(excinfo, "validation", "train, test")


# --- minibatches ----------------------------------------------------------------------------

def indexed_images(n: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    values = torch.arange(n, dtype=torch.uint8)
    return values.view(n, 1, 1, 1).expand(n, 1, size, size).contiguous(), values.to(torch.int64)


def batch_ids(batch: torch.Tensor) -> list[int]:
    return data.from_unit_range(batch[:, 0, 0, 0]).tolist()


@pytest.mark.parametrize("image_size", [2, 4, 9])
def test_batches_range_size_and_labels(image_size):
    images, labels = indexed_images(20)
    batches = data.ImageBatches(images, labels, batch_size=6, image_size=image_size, order=data.BatchOrder(seed=3))
    x, y = next(batches)
    assert x.shape == (6, 1, image_size, image_size) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and batch_ids(x) == y.tolist()  # labels travel with images
    # a constant image stays constant through any resize
    assert torch.equal(x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))


def test_resize_downscale_antialiases_and_upscale_is_smooth():
    stripes = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    stripes[..., ::4] = 255  # one bright column in four
    down = data.resize_images(stripes, 4)
    # antialiased: the interior is the local mean (~64); plain bilinear would sample 0 everywhere
    assert down.shape == (1, 1, 4, 4) and (down[..., 1:-1].int() - 64).abs().max() <= 1
    ramp = torch.arange(0, 256, 64, dtype=torch.uint8).repeat(4, 1).view(1, 1, 4, 4)
    up = data.resize_images(ramp, 7)  # non-integer factor: nearest would repeat some columns
    assert (up[0, 0, 0, 1:].int() - up[0, 0, 0, :-1].int()).min() > 0


def test_each_epoch_is_a_fresh_permutation_per_seed_and_rank():
    images, labels = indexed_images(12)
    batches = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=7, rank=0))
    epochs = [sum((batch_ids(next(batches)[0]) for _ in range(3)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1] and batches.epoch == 1
    same = data.ImageBatches(images, labels, batch_size=12, image_size=4, order=data.BatchOrder(seed=7, rank=0))
    other_rank = data.ImageBatches(images, labels, batch_size=12, image_size=4, order=data.BatchOrder(seed=7, rank=1))
    assert batch_ids(next(same)[0]) == epochs[0]
    assert batch_ids(next(other_rank)[0]) != epochs[0]


def test_resume_continues_the_same_stream():
    images, labels = indexed_images(10)
    batches = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=11))
    for _ in range(3):  # 12 draws: into the second epoch
        next(batches)
    expected = [batch_ids(next(batches)[0]) for _ in range(5)]
    resumed = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=11))
    resumed.seek(3)
    assert [batch_ids(next(resumed)[0]) for _ in range(5)] == expected
    other_seed = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=999))
    other_seed.seek(3)
    assert [batch_ids(next(other_seed)[0]) for _ in range(5)] != expected


def test_a_resharded_resume_starts_mid_stream_not_at_the_opening_batches():
    """On another worker count a rank's shard is new: seek puts it at the same position of its
    stream an uninterrupted run on that shard would have, not back at the first batches."""
    images, labels = indexed_images(12)
    uninterrupted = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=1))
    stream = [batch_ids(next(uninterrupted)[0]) for _ in range(13)]
    b = data.ImageBatches(images, labels, batch_size=4, image_size=4, order=data.BatchOrder(seed=1))
    b.seek(10)  # step 10: 40 draws = epoch 3, position 4; the next batches cross into epoch 4
    again = [batch_ids(next(b)[0]) for _ in range(3)]
    assert again == stream[10:13] and b.epoch == 4
    assert again != stream[:3]  # not a replay of the opening batches
    assert data.stream_seed(1, 0) != data.stream_seed(1, 0, salt="x")


def test_unit_range_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8)
    unit = data.to_unit_range(pixels)
    assert float(unit[0]) == -1.0 and float(unit[-1]) == 1.0
    assert torch.equal(data.from_unit_range(unit), pixels)
    assert data.from_unit_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# --- missing data, failed downloads ---------------------------------------------------------

def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_sources, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(PacerayError) as excinfo:
        data.prepare("fashion-mnist", tmp_path / "cache", download=False)
    assert_one_line_error(excinfo, str(tmp_path / "not-installed"), "apt-get install dataset-fashion-mnist",
                          "--source DIR")


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_source_without_the_files_names_the_path(tmp_path, dataset):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PacerayError) as excinfo:
        data.prepare(dataset, tmp_path / "cache", source=tmp_path / "empty")
    assert_one_line_error(excinfo, str(tmp_path / "empty"), "--source DIR")


def test_missing_manifest_and_unknown_dataset(tmp_path):
    with pytest.raises(PacerayError) as excinfo:
        data.read_manifest(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path / "manifest.json"), "paceray data prepare")
    with pytest.raises(PacerayError) as excinfo:
        data.prepare("svhn", tmp_path)
    assert_one_line_error(excinfo, "svhn", "cifar10")


@pytest.mark.parametrize("dataset,url_attr", [("fashion-mnist", "FASHION_MNIST_URL"), ("cifar10", "CIFAR10_URL")])
def test_failed_download_says_so_in_one_line(tmp_path, monkeypatch, dataset, url_attr):
    unreachable = "http://127.0.0.1:9/x" + ("/" if dataset == "fashion-mnist" else "")
    monkeypatch.setattr(datasets_sources, url_attr, unreachable)
    monkeypatch.setattr(datasets_sources, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(PacerayError) as excinfo:
        data.prepare(dataset, tmp_path / "cache")
    assert_one_line_error(excinfo, f"could not download {dataset} from http://127.0.0.1:9/x",
                          "(no network?)", "source=DIR")
    assert not (tmp_path / "cache" / "datasets" / dataset).exists()
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # no partial download under the final name or as .part


def test_prepared_manifest_is_plain_json(tmp_path):
    path = data.prepare("digits", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) >= {"name", "splits", "image_shape", "num_classes", "class_names",
                             "content_hash", "format_version"}
    assert len(manifest["content_hash"]) == 64
