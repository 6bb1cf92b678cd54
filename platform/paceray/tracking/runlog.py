"""What a trial's rank 0 writes to its MLflow run: metrics by step, images, figures, tags.

The run is created by the platform (one per trial, its id kept across restarts); the trainable
only logs into it. Every write goes through a spool on disk (paceray.tracking.spool), so a tracking server
that goes away stalls nothing and loses nothing. A restarted worker re-trains the steps after its
last checkpoint: steps already queued or in the run are not logged a second time.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from paceray.base.atomic import write_text_atomic
from paceray.base.paths import RunDir
from paceray.tracking import spool

# A write must fail fast when the server is away (the spool retries it), not block training
# through MLflow's default of 7 retries with exponential backoff.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def spool_dir(run_dir: str | Path, run_id: str) -> Path:
    return RunDir(run_dir).queue(run_id)


def replay_command(folder: Path, tracking_uri: Optional[str]) -> str:
    uri = f" --tracking-uri {tracking_uri}" if tracking_uri else ""
    return f"paceray replay-tracking {folder}{uri}"


class RunLogger:
    def __init__(self, run_id: str, tracking_uri: Optional[str], run_dir: str | Path, system_metrics: bool = False):
        for k, v in FAST_FAIL_ENV.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient

        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.folder = spool_dir(run_dir, run_id)
        self._marker = self.folder.with_suffix(".queued.json")
        # Per metric, the last step the run already has (on the server or queued before a crash).
        self.floor = self._server_steps()
        self.queued = self._queued_steps()  # what this run's processes queued so far, kept on disk too
        for key, step in self.queued.items():
            self.floor[key] = max(step, self.floor.get(key, -1))
        self.spool = spool.Spool(self.folder, spool.mlflow_deliverer(tracking_uri))
        self.on_delivered: Optional[Callable[[], None]] = None  # called once close() emptied the queue
        self._lock = threading.Lock()  # the system-metrics thread logs too
        self.system = None
        if system_metrics:
            from paceray.tracking import system_metrics as sm

            if sm.interval() > 0:
                first = 1 + max((s for k, s in self.floor.items() if k.startswith(sm.PREFIX)), default=-1)
                self.system = sm.SystemSampler(self.log_metrics, first)

    def _server_steps(self) -> dict[str, int]:
        try:
            run = self.client.get_run(self.run_id)
            return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                    for key in run.data.metrics}
        except Exception:  # server away: the local marker still knows what was queued
            return {}

    def _queued_steps(self) -> dict[str, int]:
        """Per metric, the last step queued by this run's processes: the marker, and the spool's
        undelivered entries themselves (a kill between queueing a row and updating the marker
        leaves the row in the spool only; re-logging its step would log it twice)."""
        try:
            steps = {k: int(v) for k, v in json.loads(self._marker.read_text()).items()}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            steps = {}
        for entry in spool.waiting(self.folder):
            if entry.get("kind") == "metrics" and isinstance(entry.get("step"), int):
                for key in entry.get("metrics") or {}:
                    steps[key] = max(entry["step"], steps.get(key, -1))
        return steps

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Queue the metrics at `step` the run does not have yet; False if it had them all."""
        with self._lock:
            fresh = {k: float(v) for k, v in metrics.items() if step > self.floor.get(k, -1)}
            if not fresh:
                return False
            self.spool.put({"kind": "metrics", "run_id": self.run_id, "step": step, "timestamp": spool.now_ms(),
                            "metrics": fresh})
            self.queued.update({k: step for k in fresh})
            self._marker.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self._marker, json.dumps(self.queued))  # never a torn marker
            return True

    def already_logged(self, key: str, step: int) -> bool:
        return step <= self.floor.get(key, -1)

    def log_image(self, image, key: str, step: int, belongs_to: Optional[str] = None) -> None:
        """A step-indexed image (the UI's image grid); `image` is an HxWxC uint8 array or PIL image.
        `belongs_to`: a metric logged with it; a restarted worker that had logged that metric at
        `step` already logged the image too, and skips it."""
        from PIL import Image

        if belongs_to and self.already_logged(belongs_to, step):
            return
        img = Image.fromarray(image) if not isinstance(image, Image.Image) else image
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{key}-{step}.png"
            img.save(path)
            self.spool.put({"kind": "image", "run_id": self.run_id, "key": key, "step": step,
                            "timestamp": spool.now_ms()}, files={path.name: path})

    def _artifact(self, write, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            write(path)
            parent = str(Path(artifact_file).parent)
            self.spool.put({"kind": "artifact", "run_id": self.run_id,
                            "artifact_path": None if parent == "." else parent}, files={path.name: path})

    def log_figure(self, figure, artifact_file: str) -> None:
        self._artifact(lambda p: figure.savefig(p, dpi=120), artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._artifact(lambda p: p.write_text(json.dumps(data, indent=2)), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.spool.put({"kind": "tags", "run_id": self.run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """This run's history of `key` as delivered so far (for end-of-trial plots)."""
        try:
            return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
        except Exception:
            return []

    def close(self, timeout: Optional[float] = None) -> Optional[str]:
        """Deliver what is queued; if the server stays away, the replay command for what is left."""
        if self.system is not None:
            self.system.stop()  # its last sample is queued before the flush
            self.system = None
        if timeout is None:
            timeout = float(os.environ.get("PACERAY_TRACKING_FLUSH_TIMEOUT", "60"))
        if self.spool.close(timeout):
            self._marker.unlink(missing_ok=True)
            if self.on_delivered is not None:
                self.on_delivered()
            return None
        return (f"MLflow at {self.tracking_uri} did not take {self.spool.pending()} queued write(s) "
                f"({self.spool.last_error}); they wait in {self.folder}: {replay_command(self.folder, self.tracking_uri)}")


def open_for_trial(context) -> RunLogger:
    """A trial's run logger (`TrialContext.open_run_log`): the run the context names, with that
    node's system metrics sampled until it is closed."""
    return RunLogger(context.run_id, context.tracking_uri, context.run_dir, system_metrics=True)
