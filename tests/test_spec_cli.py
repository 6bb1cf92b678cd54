"""Spec loading and the CLI's contract: every error is one line naming the file and the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paceray.base.errors import PacerayError
from paceray.base.dotted import flatten
from paceray.spec import space
from paceray.spec.specfile import load, parse_overrides

REPO = Path(__file__).resolve().parents[1]
PACERAY = [str(Path(sys.executable).parent / "paceray")]


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
name: t
trainable: denoiser
base:
  curriculum: {num_clusters: 4}
  train: {steps: 10}
search:
  curriculum.order: {grid: [none, easy-to-hard]}
  train.lr: {loguniform: [0.0001, 0.01]}
"""


def test_good_spec_fills_defaults_and_resolves_paths(tmp_path):
    s = load(write(tmp_path, GOOD))
    assert s.base["curriculum"]["num_clusters"] == 4
    assert s.base["diffusion"]["timesteps"] == 1000  # default from the trainable's Config
    assert set(s.search) == {"curriculum.order", "train.lr"}
    assert s.run_dir.is_absolute()
    assert space.trial_count_preview(s) == 2


def test_set_overrides_base_and_pins_searched_paths(tmp_path):
    s = load(write(tmp_path, GOOD), parse_overrides(["train.steps=3", "curriculum.order=random"]))
    assert s.base["train"]["steps"] == 3 and s.base["curriculum"]["order"] == "random"
    assert "curriculum.order" not in s.search


@pytest.mark.parametrize(
    "text,needle",
    [
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {num_clusters: 0}}\n", "base.curriculum.num_clusters"),
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {num_clusters: 2000}}\n", "num_clusters (2000) must be at most diffusion.timesteps"),
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {patience: -1}}\n", "base.curriculum.patience"),
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {stage_steps: -5}}\n", "base.curriculum.stage_steps"),
        ("name: t\ntrainable: denoiser\nbase: {eval: {fid_samples: 1}}\n", "base.eval.fid_samples"),
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {order: sideways}}\n", "base.curriculum.order"),
        ("name: t\ntrainable: denoiser\nbase: {curriculum: {clustering: kmeans}}\n", "base.curriculum.clustering"),
        ("name: t\ntrainable: denoiser\nbase: {data: {dataset: imagenet}}\n", "base.data.dataset"),
        ("name: t\ntrainable: denoiser\nbase: {model: {preset: huge}}\n", "base.model.preset"),
        ("name: t\ntrainable: denoiser\nbase: {train: {steps: many}}\n", "base.train.steps"),
        ("name: t\ntrainable: denoiser\nbase: {train: {stepz: 3}}\n", "base.train.stepz"),
        ("name: t\ntrainable: denoiser\nbogus: 1\n", "bogus"),
        ("name: t\ntrainable: denoiser\nsearch: {curriculum.num_clusters: {grid: [2, 5000]}}\n", "search point curriculum.num_clusters=5000"),
        ("name: t\ntrainable: denoiser\nsearch: {curriculum.nope: {grid: [1]}}\n", "search.curriculum.nope"),
        # Both ends are valid integers; almost every draw in between is not.
        ("name: t\ntrainable: denoiser\nsearch: {curriculum.num_clusters: {uniform: [2, 8]}}\n",
         "search.curriculum.num_clusters: uniform [2.0, 8.0] draws fractional values over an integer field"),
        ("name: t\ntrainable: denoiser\nsearch: {train.lr: {loguniform: [0, 1]}}\n", "search.train.lr"),
        ("name: t\ntrainable: denoiser\nsearch: {train.lr: {grid: [0.1], choice: [0.2]}}\n", "exactly one"),
        ("name: t\ntrainable: nosuch\n", "no trainable named"),
        ("name: t\ntrainable: denoiser\nresources: {workers: 2, gpus_per_worker: 0.5}\n", "fractional"),
        ("name: t\ntrainable: denoiser\nresources: {workers: 2, min_workers: 3}\n", "min_workers (3) is more than workers (2)"),
        ("name: t\ntrainable: denoiser\nresources: {placement: everywhere}\n", "resources.placement"),
        ("name: t\ntrainable: denoiser\nresources: {socket_ifname: 'eth0; rm'}\n", "resources.socket_ifname"),
        ("name: [unclosed\n", "malformed YAML"),
        ("- just\n- a list\n", "YAML mapping"),
    ],
)
def test_bad_specs_give_one_line_naming_file_and_field(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(PacerayError) as e:
        load(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_spec_file(tmp_path):
    with pytest.raises(PacerayError, match="no such spec file"):
        load(tmp_path / "absent.yaml")


def test_flatten_uses_dots():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_shipped_specs_are_valid():
    for p in sorted((REPO / "search_spaces").glob("*.yaml")):
        load(p)


# ----------------------------------------------------------------- the CLI


def run(*args, check=True):
    r = subprocess.run([*PACERAY, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize(
    "cmd",
    [[], ["tune"], ["train"], ["report"], ["ui"], ["curriculum", "preview"], ["data", "prepare"], ["fid-net", "train"]],
)
def test_every_command_answers_help(cmd):
    r = run(*cmd, "--help")
    assert "Usage:" in r.stdout


def test_help_imports_no_torch_ray_or_mlflow():
    code = (
        "import sys; from paceray.cli.main import main; "
        "bad = [m for m in ('torch', 'ray', 'mlflow', 'diffusers') if m in sys.modules]; print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


def test_cli_bad_spec_is_one_line_non_zero_no_traceback(tmp_path):
    p = write(tmp_path, "name: t\ntrainable: denoiser\nbase: {curriculum: {num_clusters: 0}}\n")
    r = run("train", str(p), check=False)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "base.curriculum.num_clusters" in r.stderr and str(p) in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,args,needle", [
    # A search over an integer field that only its ends pass: it once failed on every trial's workers.
    ("name: t\ntrainable: denoiser\nsearch: {curriculum.num_clusters: {uniform: [2, 8]}}\n", [],
     "use randint [low, high)"),
    # Its probes (100, 137.0, 200) are whole numbers: it once started every trial, each failing on
    # its workers with a traceback, and left a run behind for each.
    ("name: t\ntrainable: denoiser\nsearch: {train.steps: {uniform: [100, 200]}}\n", [],
     "search.train.steps: uniform [100.0, 200.0] draws fractional values over an integer field"),
    ("name: t\ntrainable: denoiser\nsearch: {train.batch_size: {grid: [64, 64.0]}}\n", [],
     "search.train.batch_size: grid [64, 64.0] gives 64.0 to an integer field"),
    ("name: t\ntrainable: denoiser\nsearch: {curriculum.num_clusters: {choice: [2, '2']}}\n", [],
     "search.curriculum.num_clusters: choice [2, '2'] mixes int, str values"),
    ("name: t\ntrainable: denoiser\nsearch: {train.steps: {randint: [0, 50]}}\n", [],
     "search: train.steps: Input should be greater than or equal to 1 (search point train.steps=0)"),  # steps ≥ 1
    # A tracking URI without a scheme: it once reached MLflow's store registry and its traceback.
    ("name: t\ntrainable: denoiser\n", ["--tracking-uri", "localhost:5000"], "tracking URI 'localhost:5000'"),
    ("name: t\ntrainable: denoiser\ntracking: {uri: 'localhost:5000'}\n", [], "tracking URI 'localhost:5000'"),
])
def test_cli_bad_search_or_uri_is_one_line_before_anything_starts(tmp_path, text, args, needle):
    p = write(tmp_path, text)
    r = run("tune", str(p), "--run-dir", str(tmp_path / "runs"), *args, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["tune", "train"])
def test_a_run_dir_that_is_a_file_is_one_line_before_anything_starts(tmp_path, command):
    p = write(tmp_path, "name: t\ntrainable: denoiser\n")
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    for run_dir, says in ((taken, f"--run-dir {taken}: is a file, not a directory"),
                          (taken / "runs", f"--run-dir {taken / 'runs'}: lies under the file {taken}")):
        r = run(command, str(p), "--run-dir", str(run_dir), check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert taken.read_text() == "not a directory" and sorted(tmp_path.iterdir()) == sorted([p, taken])


def test_preview_json_matches_the_sampler():
    r = run("curriculum", "preview", "--timesteps", "1000", "--clusters", "4", "--order", "easy-to-hard",
            "--stage-steps", "50", "--sample", "4000", "--json")
    p = json.loads(r.stdout)
    assert p["clusters"] == [[0, 250], [250, 500], [500, 750], [750, 1000]]
    stages = p["stages"]
    # cumulative: stage N is already every timestep, and it is the final phase (no stage N+1)
    assert [s["clusters"] for s in stages] == [[4], [3, 4], [2, 3, 4], [1, 2, 3, 4]]
    assert [s["ranges"] for s in stages[:2]] == [[[750, 1000]], [[500, 1000]]]
    assert [(s["start_step"], s["end_step"]) for s in stages] == [(0, 50), (50, 100), (100, 150), (150, None)]
    assert stages[-1]["final"] and not stages[0]["final"]
    assert p["full_from_step"] == 151 and p["warning"] is None
    first = stages[0]["sampled_counts"]
    assert first[:3] == [0, 0, 0] and first[3] == 4000
    assert all(c > 800 for c in stages[-1]["sampled_counts"])


def test_preview_shows_speed_draws_per_cluster():
    """SpeeD's sampling in the final phase: C4 (t ≥ 750, past τ = 700) is drawn least, per its
    probabilities (tests/test_distributions.py checks them against the repository's)."""
    r = run("curriculum", "preview", "-T", "1000", "-N", "4", "--order", "none", "--distribution", "speed",
            "--sample", "20000", "--json")
    p = json.loads(r.stdout)
    assert p["distribution"] == "speed" and "meaningful step" in p["distribution_note"]
    counts = p["stages"][-1]["sampled_counts"]
    assert sum(counts) == 20000 and counts[3] == min(counts) and counts[3] < 0.15 * 20000


def test_preview_table_patience_exclusive_cosine_log_snr():
    r = run("curriculum", "preview", "-T", "100", "-N", "3", "--order", "random", "--seed", "2",
            "--clustering", "log-snr", "--schedule", "cosine", "--pacing", "patience", "--patience", "50",
            "--no-cumulative")
    assert "patience τ=50" in r.stdout and "exclusive" in r.stdout and "C1" in r.stdout
    assert "stages uncapped" in r.stdout


def test_preview_patience_cap_gives_the_latest_full_from_step_and_warns_of_narrow_clusters():
    r = run("curriculum", "preview", "-N", "20", "--clustering", "log-snr", "--schedule", "cosine",
            "--pacing", "patience", "--max-stage-steps", "30", "--json")
    p = json.loads(r.stdout)
    assert p["full_from_step"] is None and p["latest_full_from_step"] == 19 * 30 + 1
    assert "degenerate clustering: log-snr on the cosine schedule with N=20" in p["warning"]
    table = run("curriculum", "preview", "-N", "5", "--clustering", "quantile")
    assert "EDM's continuous training distribution" in table.stdout


def test_preview_shuffled_shows_the_allocation_and_needs_a_reference_under_patience(tmp_path):
    p = json.loads(run("curriculum", "preview", "-T", "900", "-N", "3", "--order", "shuffled", "--stage-steps", "10",
                       "--json").stdout)
    assert [s["stage"] for s in p["stages"]] == [1, 2] and p["full_from_step"] == 21
    assert p["stages"][0]["shares"] == pytest.approx([0, 0.25, 0.75])
    r = run("curriculum", "preview", "--order", "shuffled", "--pacing", "patience", check=False)
    assert r.returncode != 0 and "--reference" in r.stderr and "Traceback" not in r.stderr
    ref = tmp_path / "schedule.json"
    ref.write_text(json.dumps({"realised_stage_lengths": [5, 15]}))
    p = json.loads(run("curriculum", "preview", "-T", "900", "-N", "3", "--order", "shuffled", "--pacing", "patience",
                       "--reference", str(ref), "--json").stdout)
    assert p["full_from_step"] == 21 and p["stages"][0]["shares"] == pytest.approx([0, 0.375, 0.625])


def test_preview_rejects_more_clusters_than_timesteps():
    r = run("curriculum", "preview", "-T", "10", "-N", "11", check=False)
    assert r.returncode != 0 and "--clusters" in r.stderr and "Traceback" not in r.stderr
