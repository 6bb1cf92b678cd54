"""Shared fixtures: one storage root per test session (datasets, FID nets, reference statistics
are made once), one CPU thread per test process (2 cores; oversubscription slows torch 10×)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACERAY = str(Path(sys.executable).parent / "paceray")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    """The session's storage root, exported for the `paceray` subprocesses the tests start."""
    root = tmp_path_factory.mktemp("storage")
    os.environ["PACERAY_STORAGE"] = str(root)
    return root


def run_paceray(*args, cwd=None, timeout=900, check=True, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([PACERAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"paceray {' '.join(map(str, args))} exited {r.returncode}\n"
                             f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}")
    return r


class Started(subprocess.Popen):
    """A `paceray` running in its own session, its stdout and stderr in a file (a pipe nobody
    reads while the test waits would fill and stall it)."""

    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 900) -> str:
        """Wait for it to end; its whole output."""
        self.wait(timeout=timeout)
        return self.output()


def start_paceray(*args, log: Path, env=None) -> Started:
    proc = Started([PACERAY, *map(str, args)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                   start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
    proc.log = log
    return proc


def write_spec(path: Path, name: str, base: dict, search: dict | None = None, resources: dict | None = None,
               tune: dict | None = None) -> Path:
    import yaml

    spec = {"name": name, "trainable": "denoiser", "base": base, "search": search or {},
            "resources": resources or {"workers": 1, "cpus_per_worker": 1}, "tune": tune or {}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_base(**sections) -> dict:
    """A digits trial small enough for CPU tests; sections override the defaults given here."""
    base = {
        "data": {"dataset": "digits", "image_size": 8},
        "model": {"preset": "tiny"},
        "diffusion": {"timesteps": 1000, "schedule": "linear"},
        "curriculum": {"order": "easy-to-hard", "num_clusters": 4, "pacing": "fixed", "stage_steps": 10},
        "train": {"steps": 40, "batch_size": 32, "lr": 0.002, "log_every": 5},
        "eval": {"every": 20, "fid_samples": 64, "sampler_steps": 5, "batch_size": 64, "sample_grid": 16},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return base


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def experiment_runs(run_dir: Path, experiment: str):
    """(client, every run of `experiment`) in the embedded store of `run_dir`."""
    client = mlflow_client(run_dir)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of the trials under `run_dir`, oldest step first."""
    return sorted((run_dir / "ray").glob("*/checkpoint_step*"))


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint_step"))


def registered_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train registered for a `paceray train` run (what a
    restart resumes from), or None. A checkpoint folder on disk is not enough: the controller
    registers it a moment after the worker wrote it, later still on a loaded machine."""
    from paceray.commands.train import latest_checkpoint

    steps = []
    for trial_dir in (run_dir / "ray").glob("*"):
        ckpt = latest_checkpoint(trial_dir)
        if ckpt is not None:
            steps.append(checkpoint_step(ckpt))
    return max(steps) if steps else None


def kill_session(leader: int, timeout: float = 60) -> None:
    """SIGKILL every process of the session `leader` started (a Popen with start_new_session=True),
    and wait until none is left. Killing its process group is not enough: Ray gives each worker
    a process group of its own, and a worker outlives its driver by seconds, long enough to train
    on and register another checkpoint."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getsid(p.pid) == leader and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes of session {leader} survive SIGKILL: {alive}"
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.1)


@pytest.fixture
def fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST folder. Without it the test is skipped on a developer's
    machine (nothing downloads here), but fails where it must run: `.ci/run` installs the package
    and sets PACERAY_REQUIRE_FASHION_MNIST, so CI never passes by skipping."""
    from trainables.denoiser.datasets_sources import FASHION_MNIST_DIR

    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    message = f"{FASHION_MNIST_DIR} holds no Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    if os.environ.get("PACERAY_REQUIRE_FASHION_MNIST"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for_checkpoint(run_dir: Path, proc: Started, timeout: float = 600) -> int:
    """The step of the first checkpoint Ray Train registers for the `paceray train` in `run_dir`."""
    deadline = time.monotonic() + timeout
    while (step := registered_checkpoint_step(run_dir)) is None:
        assert proc.poll() is None, proc.output()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.2)
    return step

