"""`paceray sample EXPORT` on exported models of each conditioning mode paceray trains: the
folders are written as `export` writes them (a DDPMPipeline of a preset UNet and the trial's
scheduler), with random weights."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PACERAY


def _export(folder, num_classes=None, schedule="linear"):
    from diffusers import DDPMPipeline

    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.diffusion.model import build_model

    torch.manual_seed(0)
    unet = build_model("tiny", 8, 1, num_classes)
    DDPMPipeline(unet=unet, scheduler=GaussianDiffusion(100, schedule).scheduler).save_pretrained(folder)
    return folder


def _run(*args):
    return subprocess.run([PACERAY, "sample", *map(str, args)], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("mode", ["unconditional", "class"])
def test_sample_draws_a_grid_and_says_how(tmp_path, mode):
    export = _export(tmp_path / "pipeline", 10 if mode == "class" else None, "cosine")
    out = tmp_path / "out" / "grid.png"
    extra = ["--label", 3, "--guidance", 2.0] if mode == "class" else []
    r = _run(export, "--n", 6, "--steps", 4, "--seed", 1, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)  # 6 images of 8x8 in a 3-wide grid, 1px gutters
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["n"] == 6 and record["steps"] == 4 and record["seed"] == 1
    assert record["conditioning"] == ("class" if mode == "class" else "none")
    assert record["label"] == (3 if mode == "class" else None)
    again = tmp_path / "again.png"
    assert _run(export, "--n", 6, "--steps", 4, "--seed", 1, "--out", again, *extra).returncode == 0
    assert np.array_equal(np.asarray(Image.open(again)), grid)  # the seed fixes the draw


@pytest.mark.parametrize("classes, args, needle", [
    (None, ["--label", 1], "--label needs a class-conditional model; this one is unconditional"),
    (10, ["--label", 10], "--label 10 is not a class of this model (0..9)"),
    (10, ["--guidance", 3], "--guidance 3.0 needs --label"),
    (10, ["--prompt", "a photo of a sneaker"], "--prompt needs a text-conditioned model; this one is class-conditional"),
])
def test_a_condition_the_model_cannot_take_is_one_line(tmp_path, classes, args, needle):
    export = _export(tmp_path / "pipeline", classes)
    r = _run(export, "--n", 2, "--steps", 2, "--out", tmp_path / "x.png", *args)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_folder_that_is_no_export_is_one_line(tmp_path):
    (tmp_path / "nothing").mkdir()
    r = _run(tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "no unet/ folder" in r.stderr, r.stderr
