"""Captions for a prepared dataset, kept beside its image shards and never in them.

`prepare_captions` writes `captions/{key}/captions.parquet` (one row per image: split, text, in the
shards' row order) and `captions.json` (where the captions came from, whether they are templated,
their own content hash, and the content hash of the images they caption) into the prepared
dataset's folder, once and atomically. The image shards and their manifest are not touched, so
what is keyed by the images' content hash (the FID reference statistics, the FID network) stays
valid whatever captions are added; `key` is the captions' own content hash, so several caption
sets of one dataset live side by side.

Where captions come from:
- a table of image files and texts: `.jsonl` lines `{"file": ..., "text": ...}`, a `.csv` or a
  `.parquet` with columns `file` and `text`; `file` is relative to the image folder
  (`class/name.png`). An image folder's own `captions.jsonl` or `captions.csv` is found by itself.
- `templated`: for a dataset with class names (digits, MNIST, Fashion-MNIST, CIFAR-10), one of a
  few templates per image ("a photo of a sneaker"), drawn with a fixed seed. Such captions only
  restate the label; everything that shows them says they are templated.

Every image needs one non-empty caption: a missing, empty, unknown or repeated one is a one-line
error naming the captions file (and its line) and the image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paceray.protocol import PacerayError, one_line
from trainables.diffusion.data import FOLDER_CAPTION_FILES, read_manifest
from trainables.diffusion.datasets_sources import image_folder_files

TEMPLATED = "templated"
CAPTIONS_DIR = "captions"
CAPTIONS_FILE = "captions.parquet"
CAPTIONS_MANIFEST = "captions.json"
FORMAT_VERSION = 1
TEMPLATE_SEED = 0
DIGIT_TEMPLATES = ("a photo of the digit {name}", "a handwritten {name}", "the number {name}",
                   "an image of the digit {name}")
OBJECT_TEMPLATES = ("a photo of a {name}", "a picture of a {name}", "an image of a {name}",
                    "a small photo of a {name}")
TEMPLATES = {"digits": DIGIT_TEMPLATES, "mnist": DIGIT_TEMPLATES}  # other datasets: OBJECT_TEMPLATES


@dataclass(frozen=True)
class Captions:
    """One caption set as prepared: its folder, key, source and whether it is templated."""

    path: Path
    key: str
    source: str
    templated: bool
    counts: dict  # split -> captions


def prepare_captions(dataset_dir: str | Path, captions: str | Path, image_folder: Optional[str | Path] = None) -> Captions:
    """Captions for the prepared dataset in `dataset_dir`: `templated`, or a table of image files
    and texts (relative to `image_folder`, the dataset's source folder). A second call with the
    same captions returns the set already written."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if str(captions) == TEMPLATED:
        texts, source = _templated(dataset_dir, manifest), TEMPLATED
    else:
        table = Path(captions).expanduser().resolve()
        if image_folder is None:
            raise PacerayError(f"{table}: captions from a table name image files, so they need an image folder "
                               f"(dataset imagefolder with --source DIR); use --captions templated for "
                               f"{manifest['name']}")
        texts, source = {"train": _from_table(table, image_folder)}, str(table)
    return _write(dataset_dir, manifest, texts, source, templated=source == TEMPLATED)


def folder_captions(image_folder: str | Path) -> Optional[Path]:
    """The image folder's own captions file (captions.jsonl, else captions.csv), if it has one."""
    root = Path(image_folder).expanduser().resolve()
    return next((root / name for name in FOLDER_CAPTION_FILES if (root / name).is_file()), None)


def read_captions(path: str | Path) -> Captions:
    manifest_path = Path(path) / CAPTIONS_MANIFEST
    try:
        m = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise PacerayError(f"no {manifest_path}: prepare the captions first (`paceray data prepare ... --captions`)") from None
    except (OSError, ValueError) as e:
        raise PacerayError(one_line(f"{manifest_path}: unreadable ({e}); delete {path} and prepare again")) from None
    if m.get("format_version") != FORMAT_VERSION:
        raise PacerayError(f"{manifest_path}: format_version {m.get('format_version')}, this paceray reads "
                           f"{FORMAT_VERSION}; delete {path} and prepare again")
    return Captions(Path(path), m["key"], m["source"], m["templated"], m["splits"])


def load_captions(path: str | Path, split: str = "train", rank: int = 0, world_size: int = 1) -> list[str]:
    """Rank `rank`'s captions of `split`: those of the rows `data.load_split` gives it (i % world_size == rank)."""
    captions = read_captions(path)
    if split not in captions.counts:
        raise PacerayError(f"{path}: no captions for split {split!r}; it has {', '.join(captions.counts)}")
    table = pq.read_table(Path(path) / CAPTIONS_FILE, filters=[("split", "=", split)], columns=["text"])
    return table.column("text").to_pylist()[rank::world_size]


# --- sources --------------------------------------------------------------------------------

def _templated(dataset_dir: Path, manifest: dict) -> dict[str, list[str]]:
    names = manifest.get("class_names")
    if not names:
        raise PacerayError(f"{dataset_dir}: {manifest['name']} has no class names to fill caption templates with; "
                           f"give --captions FILE")
    templates = TEMPLATES.get(manifest["name"], OBJECT_TEMPLATES)
    texts = {}
    for split, info in manifest["splits"].items():
        labels = np.concatenate([pq.read_table(dataset_dir / f, columns=["label"]).column("label").to_numpy()
                                 for f in info["shards"]])
        which = np.random.default_rng(TEMPLATE_SEED).integers(len(templates), size=len(labels))
        texts[split] = [templates[w].format(name=names[y].lower()) for w, y in zip(which, labels)]
    return texts


def _from_table(table: Path, image_folder: str | Path) -> list[str]:
    """The texts of the image folder's images, in prepared order, from `table`."""
    root, _, files = image_folder_files(image_folder)
    wanted = {path.relative_to(root).as_posix() for path, _ in files}
    given: dict[str, str] = {}
    for where, file, text in _rows(table):
        name = Path(str(file)).as_posix().removeprefix("./") if file is not None else ""
        if name not in wanted:
            raise PacerayError(one_line(f"{where}: {name or '(no file)'} is not an image of {root} "
                                        f"(files are relative to it, as class/name.png)"))
        if name in given:
            raise PacerayError(one_line(f"{where}: a second caption for {name}"))
        if not isinstance(text, str) or not text.strip():
            raise PacerayError(one_line(f"{where}: the caption of {name} is empty"))
        given[name] = text.strip()
    missing = [path.relative_to(root).as_posix() for path, _ in files
               if path.relative_to(root).as_posix() not in given]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PacerayError(f"{table}: no caption for {root / missing[0]}{more}")
    return [given[path.relative_to(root).as_posix()] for path, _ in files]


def _rows(table: Path):
    """(where, file, text) of each row of a .jsonl, .csv or .parquet captions table."""
    if not table.is_file():
        raise PacerayError(f"{table}: no such captions file")
    suffix = table.suffix.lower()
    if suffix == ".jsonl":
        with table.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or "file" not in row or "text" not in row:
                    raise PacerayError(f"{table}:{number}: not a JSON object with \"file\" and \"text\"")
                yield f"{table}:{number}", row["file"], row["text"]
    elif suffix == ".csv":
        with table.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not {"file", "text"} <= set(reader.fieldnames or ()):
                raise PacerayError(f"{table}: a captions CSV needs the columns file and text (has {reader.fieldnames})")
            for row in reader:
                yield f"{table}:{reader.line_num}", row["file"], row["text"]
    elif suffix == ".parquet":
        try:
            data = pq.read_table(table)
        except (OSError, pa.ArrowException) as e:
            raise PacerayError(one_line(f"{table}: unreadable Parquet ({e})")) from None
        if not {"file", "text"} <= set(data.column_names):
            raise PacerayError(f"{table}: a captions table needs the columns file and text (has {data.column_names})")
        for number, (file, text) in enumerate(zip(data.column("file").to_pylist(), data.column("text").to_pylist())):
            yield f"{table}: row {number}", file, text
    else:
        raise PacerayError(f"{table}: captions are read from .jsonl, .csv or .parquet, not {suffix or 'a file without a suffix'}")


# --- writing --------------------------------------------------------------------------------

def _write(dataset_dir: Path, manifest: dict, texts: dict[str, list[str]], source: str, templated: bool) -> Captions:
    for split, info in manifest["splits"].items():
        if len(texts.get(split, ())) != info["count"]:
            raise PacerayError(f"{source}: {len(texts.get(split, ()))} captions for the {info['count']} images of "
                               f"{manifest['name']}/{split}")
    digest = hashlib.sha256()
    for split, rows in texts.items():
        digest.update(f"{split}:{len(rows)}\n".encode())
        for text in rows:
            digest.update(text.encode() + b"\0")
    key = digest.hexdigest()[:16]
    target = dataset_dir / CAPTIONS_DIR / key
    if (target / CAPTIONS_MANIFEST).is_file():
        return read_captions(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=target.parent))
    building.chmod(0o755)
    try:
        splits = [split for split, rows in texts.items() for _ in rows]
        table = pa.table({"split": pa.array(splits, pa.string()),
                          "text": pa.array([t for rows in texts.values() for t in rows], pa.string())})
        pq.write_table(table, building / CAPTIONS_FILE, compression="zstd")
        (building / CAPTIONS_MANIFEST).write_text(json.dumps({
            "format_version": FORMAT_VERSION, "key": key, "content_hash": digest.hexdigest(), "source": source,
            "templated": templated, "splits": {split: len(rows) for split, rows in texts.items()},
            "images_content_hash": manifest["content_hash"]}, indent=2) + "\n")
        try:
            os.rename(building, target)
        except OSError:
            if not (target / CAPTIONS_MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return read_captions(target)
