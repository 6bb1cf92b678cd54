"""The layer rules of docs/ARCHITECTURE.md hold for every module of the platform and the
trainables, and each rule catches a violation planted in a copy of the tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import layer_rules

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_keeps_every_rule():
    found = layer_rules.check(ROOT)
    assert not found, "\n" + "\n".join(map(str, found))


def test_the_table_is_the_one_drawn_in_the_architecture_doc():
    layers = layer_rules.read_table(ROOT / "docs" / "ARCHITECTURE.md")
    assert list(layers) == ["base", "protocol", "spec", "tracking", "cluster", "trial", "report", "search", "cli",
                            "trainables"]
    assert layers["tracking"].third_party == ("mlflow",) and layers["cluster"].third_party == ("ray",)
    assert layers["trainables"].may_import == {"protocol"}
    # every layer's folder says what it owns
    for name in layers:
        if name != "trainables":
            doc = (ROOT / "platform" / "paceray" / name / "__init__.py").read_text()
            assert doc.startswith('"""') and len(doc) > 100, name


@pytest.fixture
def tree(tmp_path):
    """A copy of the platform, the trainables and the architecture doc, to plant violations in."""
    for part in ("platform/paceray", "trainables", "docs/ARCHITECTURE.md"):
        src, dst = ROOT / part, tmp_path / part
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return tmp_path


def plant(tree: Path, file: str, code: str, at_line: int = None) -> int:
    """Put `code` into `file` (at the end, or before line `at_line`); returns its line."""
    path = tree / file
    lines = path.read_text().splitlines(keepends=True)
    line = len(lines) + 1 if at_line is None else at_line
    lines.insert(line - 1, code + "\n")
    path.write_text("".join(lines))
    return line


def planted(tree: Path, plants) -> list:
    """The violations that `plants` [(file, code)] add to the copy's own (planted at files' ends)."""
    before = set(layer_rules.check(tree))
    for file, code in plants:
        plant(tree, file, code)
    return [v for v in layer_rules.check(tree) if v not in before]


def only(found, rule: str):
    assert [v.rule for v in found] == [rule], "\n".join(map(str, found))
    return found[0]


PLANTS = [
    # (file, code, rule, what the line must say)
    ("platform/paceray/base/errors.py", "from paceray.tracking import client", "layer", "base may not import tracking"),
    ("platform/paceray/spec/space.py", "\ndef f():\n    import mlflow\n", "third-party",
     "spec may not import mlflow (only tracking may)"),
    ("platform/paceray/report/search.py", "\ndef g():\n    from ray import tune\n", "third-party",
     "report may not import ray.tune"),
    ("platform/paceray/trial/trainer.py", "\ndef h():\n    import ray\n", "third-party",
     "trial may not import ray (only cluster may)"),
    ("trainables/denoiser/export.py", "from paceray.tracking import run", "layer",
     "trainables import only paceray.protocol, not paceray.tracking.run"),
    ("trainables/diffusion/model.py", "\ndef k():\n    from trainables.denoiser import config\n", "trainables",
     "trainables.diffusion may not import trainables.denoiser"),
    ("trainables/difficulty_probe/analysis.py", "from trainables.diffusion.curriculum import _Stage", "private",
     "the private name _Stage of trainables.diffusion.curriculum"),
]


@pytest.mark.parametrize("file, code, rule, says", PLANTS, ids=[p[2] + ":" + p[0].split("/")[-1] for p in PLANTS])
def test_a_planted_import_fails_naming_the_file_line_and_rule(tree, file, code, rule, says):
    line = len((tree / file).read_text().splitlines()) + 1
    v = only([v for v in planted(tree, [(file, code)]) if v.rule != "cycle"], rule)
    assert v.file == file and v.line in (line, line + 1, line + 2) and says in v.text
    assert str(v).startswith(f"{file}:{v.line}: [{rule}]")


def test_a_type_only_import_counts(tree):
    found = planted(tree, [("platform/paceray/protocol/keys.py",
                            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from paceray.search.driver import run_tune\n")])
    v = only([v for v in found if v.rule != "cycle"], "layer")
    assert "protocol may not import search" in v.text


def test_a_cycle_between_two_modules_of_one_layer(tree):
    v = only(planted(tree, [("platform/paceray/base/errors.py", "\ndef f():\n    from paceray.base import atomic\n")]),
             "cycle")
    assert "paceray.base.atomic, paceray.base.errors" in v.text


def test_a_long_function_and_a_wide_one(tree):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    found = planted(tree, [("platform/paceray/base/dotted.py", f"\ndef long():\n    \"\"\"doc\"\"\"\n{body}\n"),
                           ("trainables/diffusion/model.py", "\ndef wide(self, a, b, c, d, e, f, g):\n    return a\n")])
    assert sorted(v.text for v in found) == ["long's body is 61 lines (at most 60)",
                                            "wide takes 7 parameters (at most 6: give it a small state object)"]
    assert {v.rule for v in found} == {"size"}


def test_a_click_command_may_take_its_options(tree):
    assert planted(tree, [("platform/paceray/cli/main.py",
                           "\n@main.command()\ndef many(a, b, c, d, e, f, g, h):\n    \"\"\"A command.\"\"\"\n")]) == []


def test_a_layer_missing_from_the_table_is_a_violation(tree):
    before = set(layer_rules.check(tree))
    (tree / "platform/paceray/extra").mkdir()
    (tree / "platform/paceray/extra/__init__.py").write_text('"""A layer nobody drew."""\n')
    v = only([v for v in layer_rules.check(tree) if v not in before], "layer")
    assert v.file == "platform/paceray/extra/__init__.py" and "in no layer of the table" in v.text
