"""Captions beside a prepared dataset: from an image folder's captions.jsonl or captions.csv, from
a Parquet table, and templated from class names; each source written here in its real format."""

from __future__ import annotations

import csv
import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PACERAY
from paceray.base.errors import PacerayError
from test_data import write_image_folder
from trainables.diffusion import captions as cap
from trainables.diffusion import data


def _texts(folder) -> dict[str, str]:
    """A caption per image of write_image_folder's folder, naming its file (to check the order)."""
    return {f"{cls}/{i}.png": f"{cls} number {i}, with a comma" for cls, n in (("ant", 3), ("zebra", 2))
            for i in range(n)}


def _prepared(tmp_path):
    write_image_folder(tmp_path / "pics")
    return data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_captions_from_each_table_format_follow_the_images_order(tmp_path, kind):
    path = _prepared(tmp_path)
    manifest_before = (path / data.MANIFEST).read_bytes()
    texts = _texts(tmp_path / "pics")
    rows = list(reversed(texts.items()))  # any order in the table
    table = tmp_path / "pics" / "captions.jsonl" if kind == "jsonl" else tmp_path / f"captions.{kind}"
    if kind == "jsonl":
        table.write_text("".join(json.dumps({"file": f, "text": t}) + "\n" for f, t in rows) + "\n")
    elif kind == "csv":
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "text"])
            writer.writerows(rows)
    else:
        pq.write_table(pa.table({"file": [f for f, _ in rows], "text": [t for _, t in rows]}), table)
    prepared = cap.prepare_captions(path, table, tmp_path / "pics")
    assert not prepared.templated and prepared.source == str(table.resolve()) and prepared.counts == {"train": 5}
    # the images' order: ant 0..2, then zebra 0..1 (load_split's rows)
    assert cap.load_captions(prepared.path) == [texts[f"ant/{i}.png"] for i in range(3)] + [
        texts[f"zebra/{i}.png"] for i in range(2)]
    assert cap.load_captions(prepared.path, rank=1, world_size=2) == [texts["ant/1.png"], texts["zebra/0.png"]]
    # the images and their manifest untouched: caches keyed by their content hash stay valid
    assert (path / data.MANIFEST).read_bytes() == manifest_before
    meta = json.loads((prepared.path / cap.CAPTIONS_MANIFEST).read_text())
    assert meta["images_content_hash"] == data.read_manifest(path)["content_hash"]
    assert cap.prepare_captions(path, table, tmp_path / "pics") == prepared  # a second call: the same set


def test_a_folder_captions_file_does_not_change_the_images_fingerprint(tmp_path):
    path = _prepared(tmp_path)
    (tmp_path / "pics" / "captions.csv").write_text("file,text\n")
    assert data.prepare("imagefolder", tmp_path / "cache", source=tmp_path / "pics") == path
    assert cap.folder_captions(tmp_path / "pics") == (tmp_path / "pics" / "captions.csv").resolve()


@pytest.mark.parametrize("lines, needles", [
    ({"ant/0.png": "a", "ant/1.png": "b", "ant/2.png": "c", "zebra/0.png": "d"}, ["no caption for", "zebra/1.png"]),
    ({"ant/0.png": "a", "ant/1.png": " ", "ant/2.png": "c", "zebra/0.png": "d", "zebra/1.png": "e"},
     ["captions.jsonl:2: the caption of ant/1.png is empty"]),
    ({"ant/0.png": "a", "ant/9.png": "b"}, ["captions.jsonl:2: ant/9.png is not an image of"]),
])
def test_a_missing_empty_or_unknown_caption_is_one_line_naming_the_file(tmp_path, lines, needles):
    path = _prepared(tmp_path)
    table = tmp_path / "pics" / "captions.jsonl"
    table.write_text("".join(json.dumps({"file": f, "text": t}) + "\n" for f, t in lines.items()))
    with pytest.raises(PacerayError) as caught:
        cap.prepare_captions(path, table, tmp_path / "pics")
    message = str(caught.value)
    assert "\n" not in message and str(table) in message and all(n in message for n in needles), message
    assert not (path / cap.CAPTIONS_DIR).exists() or not any((path / cap.CAPTIONS_DIR).iterdir())


def test_malformed_tables_are_one_line(tmp_path):
    path = _prepared(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "ant/0.png", "text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(PacerayError, match=r"bad\.jsonl:2: not a JSON object"):
        cap.prepare_captions(path, bad, tmp_path / "pics")
    columns = tmp_path / "bad.csv"
    columns.write_text("path,caption\nant/0.png,a\n")
    with pytest.raises(PacerayError, match=r"bad\.csv: a captions CSV needs the columns file and text"):
        cap.prepare_captions(path, columns, tmp_path / "pics")
    with pytest.raises(PacerayError, match="captions from a table name image files"):
        cap.prepare_captions(data.prepare("digits", tmp_path / "cache"), bad)


def test_templated_captions_name_each_image_class_and_say_so(tmp_path):
    path = data.prepare("digits", tmp_path)
    prepared = cap.prepare_captions(path, "templated")
    assert prepared.templated and prepared.source == "templated"
    _, labels = data.load_split(path, "test")
    texts = cap.load_captions(prepared.path, "test")
    assert len(texts) == len(labels) == 359
    assert all(t.split()[-1] == str(int(y)) for t, y in zip(texts, labels))
    assert {t.rsplit(" ", 1)[0] for t in texts} == {t.rsplit(" ", 1)[0] for t in cap.DIGIT_TEMPLATES}
    assert cap.prepare_captions(path, "templated").key == prepared.key  # the same draw every time


def test_templated_fashion_mnist_reads_a_photo_of_a_sneaker(tmp_path, fashion_mnist):
    path = data.prepare("fashion-mnist", tmp_path, source=fashion_mnist)
    prepared = cap.prepare_captions(path, "templated")
    _, labels = data.load_split(path, "test")
    texts = cap.load_captions(prepared.path, "test")
    sneakers = [t for t, y in zip(texts, labels) if int(y) == 7]
    assert "a photo of a sneaker" in sneakers and all(t.endswith("sneaker") for t in sneakers)


def test_data_prepare_finds_a_folder_captions_file(tmp_path):
    write_image_folder(tmp_path / "pics")
    with (tmp_path / "pics" / "captions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file", "text"), *_texts(tmp_path / "pics").items()])
    r = subprocess.run([PACERAY, "data", "prepare", "imagefolder", "--source", str(tmp_path / "pics"),
                        "--storage", str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "captions " in r.stdout and "captions.csv): 5 in" in r.stdout, r.stdout
    r = subprocess.run([PACERAY, "data", "prepare", "digits", "--storage", str(tmp_path / "cache"),
                        "--captions", str(tmp_path / "pics" / "captions.csv")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "captions from a table name image files" in r.stderr
