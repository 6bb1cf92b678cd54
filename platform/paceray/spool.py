"""A write-ahead queue on disk between a trial and its MLflow server.

Every write (a metrics row, an image, a figure, tags, the run's end) is first appended to a
spool folder, then delivered by a background thread in order. A server that goes away never
stalls training: writes wait on disk, and are delivered when it answers again. A server that
never returns leaves the spool behind, with the command that replays it:

    paceray replay-tracking SPOOL_DIR [--tracking-uri URI]
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

ENTRIES = "entries.jsonl"
DELIVERED = "delivered"  # the count of entries delivered so far, for resuming a replay


def append(folder: Path, entry: dict, files: Optional[dict[str, Path]] = None) -> None:
    """Queue one write durably. `files` (name -> local path) are copied into the spool with it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if files:
        blob_dir = folder / "files" / uuid.uuid4().hex
        blob_dir.mkdir(parents=True)
        copied = {}
        for name, src in files.items():
            dst = blob_dir / Path(name).name
            shutil.copy2(src, dst)
            copied[name] = str(dst)
        entry = {**entry, "files": copied}
    with open(folder / ENTRIES, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Spool:
    """The queue plus a thread delivering it in order, retrying every `retry_seconds`."""

    def __init__(self, folder: Path, deliver: Callable[[dict], None], retry_seconds: float = 2.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.deliver = deliver
        self.retry_seconds = retry_seconds
        self._wake = threading.Condition()
        self._closing_until: Optional[float] = None
        self.last_error: Optional[str] = None
        # Entries in the file, counted here: pending() must not parse the whole file on every call.
        done = _delivered(self.folder)
        self._count = done + len(_read_entries(self.folder, done))
        self._thread = threading.Thread(target=self._run, name="mlflow-spool", daemon=True)
        self._thread.start()

    def put(self, entry: dict, files: Optional[dict[str, Path]] = None) -> None:
        with self._wake:
            append(self.folder, entry, files)
            self._count += 1
            self._wake.notify_all()

    def pending(self) -> int:
        return self._count - _delivered(self.folder)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self.pending() == 0 and self._closing_until is None:
                    self._wake.wait(timeout=1.0)
            if self.pending() == 0 and self._closing_until is not None:
                return
            if not deliver_pending(self.folder, self.deliver, self._note_error):
                if self._closing_until is not None and time.monotonic() > self._closing_until:
                    return
                with self._wake:
                    self._wake.wait(timeout=self.retry_seconds)

    def _note_error(self, err: Exception) -> None:
        self.last_error = f"{type(err).__name__}: {err}"

    def close(self, timeout: float = 60.0) -> bool:
        """Deliver what is queued within `timeout`; True if nothing is left (the spool is removed)."""
        with self._wake:
            self._closing_until = time.monotonic() + timeout
            self._wake.notify_all()
        self._thread.join(timeout=timeout + 5)
        if self.pending() == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            return True
        return False


def _read_entries(folder: Path, start: int = 0) -> list[dict]:
    """The entries from the `start`-th on (only those are parsed)."""
    path = folder / ENTRIES
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines()[start:]:
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: the write was never acknowledged
                break
    return out


def _delivered(folder: Path) -> int:
    try:
        return int((folder / DELIVERED).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _mark_delivered(folder: Path, n: int) -> None:
    tmp = folder / (DELIVERED + ".tmp")
    tmp.write_text(str(n))
    os.replace(tmp, folder / DELIVERED)


def deliver_pending(folder: Path, deliver: Callable[[dict], None],
                    on_error: Callable[[Exception], None] = lambda e: None) -> bool:
    """Deliver undelivered entries in order; False at the first failure (to retry later)."""
    done = _delivered(folder)
    for i, entry in enumerate(_read_entries(folder, done), start=done):
        try:
            deliver(entry)
        except Exception as e:  # connection refused, timeouts, 5xx: try again later
            on_error(e)
            return False
        _mark_delivered(folder, i + 1)
    return True


def drain(folder: Path, deliver: Callable[[dict], None],
          on_error: Callable[[Exception], None] = lambda e: None) -> bool:
    """Deliver everything left in a spool nobody is writing to any more and remove it; False (the
    spool kept) at the first failure."""
    if not deliver_pending(folder, deliver, on_error):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


# ---------------------------------------------------------------------- MLflow delivery


def mlflow_deliverer(tracking_uri: Optional[str]) -> Callable[[dict], None]:
    """Turn spooled entries into MlflowClient calls (idempotent where MLflow allows it)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)

    def deliver(e: dict) -> None:
        run_id, kind = e["run_id"], e["kind"]
        if kind == "metrics":
            rows = [Metric(key=k, value=float(v), timestamp=e["timestamp"], step=e["step"])
                    for k, v in e["metrics"].items()]
            client.log_batch(run_id, metrics=rows)
        elif kind == "tags":
            for k, v in e["tags"].items():
                client.set_tag(run_id, k, v)
        elif kind == "artifact":
            (name, path), = e["files"].items()
            client.log_artifact(run_id, path, e.get("artifact_path"))
        elif kind == "image":
            from PIL import Image

            (name, path), = e["files"].items()
            with Image.open(path) as img:
                client.log_image(run_id, img.copy(), key=e["key"], step=e["step"], timestamp=e["timestamp"])
        elif kind == "terminate":
            client.set_terminated(run_id, status=e["status"])
        else:
            raise ValueError(f"unknown spool entry kind {kind!r}")

    return deliver


def replay(folder: Path, tracking_uri: Optional[str]) -> int:
    """Deliver a left-behind spool; returns how many entries were delivered."""
    before = _delivered(folder)
    waiting = len(_read_entries(folder, before))
    errors: list[Exception] = []
    if not drain(folder, mlflow_deliverer(tracking_uri), errors.append):
        from paceray.errors import PacerayError, one_line

        raise PacerayError(one_line(f"{folder}: delivered {_delivered(folder) - before}, "
                                    f"stopped at an error: {errors[-1]}"))
    return waiting


def now_ms() -> int:
    return int(time.time() * 1000)
