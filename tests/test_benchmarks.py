"""The benchmarks are code: each Python script runs here at its smoke size against the shared test
cluster, so an API change that breaks one fails a test. Their figures are printed, not asserted
(a smoke size measures nothing); `gpu.sh` needs a GPU and is covered by these parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PACERAY, REPO, prelaunched

pytestmark = pytest.mark.slow


def _script(shared, folder: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS` with the shared cluster's environment (its token), its
    storage root, its output kept for the assertion."""
    env = {**shared.base_env, **shared.env}
    argv = [sys.executable, str(REPO / "benchmarks" / script), *args]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@prelaunched
def throughput_smoke(shared, folder):
    storage = shared.base_env["PACERAY_STORAGE"]
    return _script(shared, folder, "throughput.py", "--smoke", "--address", shared.env["RAY_ADDRESS"],
                   "--storage", storage, "--json", str(folder / "throughput.json"))


@prelaunched
def search_efficiency_smoke(shared, folder):
    storage = shared.base_env["PACERAY_STORAGE"]
    # --pack: the side-by-side path and benchmarks/plain_search.py run too (the smoke pins one
    # arm, so its "pack" is a pack of one: the script's paths, not packing, are what this proves)
    return _script(shared, folder, "search_efficiency.py", "--smoke", "--pack", "2", "--address",
                   shared.env["RAY_ADDRESS"], "--tracking-uri", shared.uri, "--storage", storage,
                   "--json", str(folder / "efficiency.json"))


def _ran(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"{' '.join(r.args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_throughput_runs_every_part(throughput_smoke):
    out = _ran(throughput_smoke)
    for line in ("paceray throughput:", "bare  median", "ours  median", "ratio", "data path alone", "trial quick.yaml"):
        assert line in out, out


def test_search_efficiency_runs_unpacked_packed_and_the_plain_script(search_efficiency_smoke):
    out = _ran(search_efficiency_smoke)
    for line in ("repeat 1: unpacked", "packed    median wall", "the plain script's", "packed ÷ unpacked:"):
        assert line in out, out


def test_process_cpu_counts_a_command(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "process_cpu.py"), "--", PACERAY, "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "CPU seen" in r.stdout and "paceray" in r.stdout, r.stdout + r.stderr


def test_tracking_load_runs_its_loggers_against_a_server(tmp_path, shared):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tracking_load.py"), "--smoke", "--tracking-uri",
                        shared.uri, "--json", str(tmp_path / "load.json")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    out = _ran(r)
    assert "given    N=  2: delivered" in out and "drained in" in out and "MLflow holds" not in out, out


def test_packed_throughput_times_the_loop_and_the_stack(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "packed_throughput.py"), "--smoke"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = _ran(r)
    assert "K= 2: loop" in out and "stacked" in out and "× one arm" in out, out


def test_feature_pass_times_one_pass_against_one_per_arm(tmp_path, storage):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feature_pass.py"), "--repeats", "1",
                        "--images", "64", "--storage", str(storage)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert "together ÷ alone" in _ran(r), r.stdout
