"""A write-ahead queue on disk between a trial and its MLflow server.

Every write (a metrics row, an image, a figure, tags, the run's end) is first appended to a
spool folder, then delivered by a background thread in order. Consecutive metrics rows of a run
that wait together go in one call (up to MLflow's 1000 values): a server that falls behind gets
fewer, larger calls rather than a backlog that grows. A server that goes away never
stalls training: writes wait on disk, and are delivered when it answers again. A server that
never returns leaves the spool behind, with the command that replays it:

    paceray replay-tracking SPOOL_DIR [--tracking-uri URI]

The folder: `entries.jsonl` (one JSON object a line), `delivered` ("RECORDS OFFSET": how many
entries are done and the byte offset just past them), `files/` (copies of the files the
entries name), `deliver.lock` (whoever delivers now) and `dead-letter.jsonl` (entries no retry
can deliver, each with its reason). An entry is done once delivered or set aside; a line that
is not an entry (torn by a kill or a full disk) is set aside too, and never stops the reading.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from paceray.base import locks
from paceray.base.atomic import append_line, fsync_dir, fsync_path, write_text_atomic

ENTRIES = "entries.jsonl"
DELIVERED = "delivered"
DEAD_LETTER = "dead-letter.jsonl"
LOCK = "deliver.lock"
LOCK_MAX_AGE = 15 * 60.0  # s: another host's lock (its pid we cannot check) untouched this long is dead
LOCK_WAIT = 30.0  # s: how long drain/replay wait for another deliverer of the same queue to finish
MLFLOW_BATCH_METRICS = 1000  # values one log_batch call may carry (MLflow's limit)
# MLflow error codes that no retry fixes (a run that does not exist, a value it refuses, a run
# deleted): the entry is set aside. Not among them: auth (401/403) and 404 ENDPOINT_NOT_FOUND,
# which say the URI or credentials are wrong (fix them and replay), nor 429 and 5xx.
PERMANENT_CODES = frozenset({"BAD_REQUEST", "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                             "NOT_FOUND", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"})


class PermanentError(Exception):
    """An entry no retry can deliver (malformed, unknown kind, its file gone): it is set aside."""


class Busy(Exception):
    """Another deliverer holds the queue: it delivers these entries, we must not as well."""


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
            fsync_path(dst)  # the copy is on disk before the entry that names it
            copied[name] = str(dst)
        for d in (blob_dir, blob_dir.parent, folder):  # and so are the names leading to it
            fsync_dir(d)
        entry = {**entry, "files": copied}
    append_line(folder / ENTRIES, (json.dumps(entry) + "\n").encode())


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
        self.set_aside = 0  # entries this spool put in the dead-letter file (each also reported on stderr)
        # Entries in the file, counted here: pending() must not parse the whole file on every call.
        self._count = _queued(self.folder)
        self._thread = threading.Thread(target=self._run, name="mlflow-spool", daemon=True)
        self._thread.start()

    def put(self, entry: dict, files: Optional[dict[str, Path]] = None) -> None:
        with self._wake:
            try:
                append(self.folder, entry, files)
            except BaseException:  # maybe half a line on disk (it counts: it will be set aside)
                self._count = _queued(self.folder)
                raise
            self._count += 1
            self._wake.notify_all()

    def pending(self) -> int:
        done, offset = _progress(self.folder)
        if offset >= _size(self.folder):
            return 0
        return max(self._count - done, 1)  # another process may have appended too

    def _run(self) -> None:
        while True:
            with self._wake:
                while self.pending() == 0 and self._closing_until is None:
                    self._wake.wait(timeout=1.0)
            if self.pending() == 0 and self._closing_until is not None:
                return
            try:
                result = _deliver(self.folder, self.deliver, self._note_error)
            except Exception as e:  # a bug must not end the thread while the queue fills
                self._note_error(e)
                result = _Pass()
            self.set_aside += result.set_aside
            if result.done and (result.delivered or result.set_aside):
                continue
            # A failure, or a pass that found nothing to do although something is pending (a
            # line still being written): wait, never spin.
            if self._closing_until is not None and time.monotonic() > self._closing_until:
                return
            with self._wake:
                self._wake.wait(timeout=self.retry_seconds)

    def _note_error(self, err: Exception) -> None:
        self.last_error = f"{type(err).__name__}: {err}"

    def close(self, timeout: float = 60.0) -> bool:
        """Deliver what is queued within `timeout`; True if nothing is left (the spool is removed,
        all but its dead letters)."""
        with self._wake:
            self._closing_until = time.monotonic() + timeout
            self._wake.notify_all()
        self._thread.join(timeout=timeout + 5)
        if self.pending() == 0 and not self._thread.is_alive():
            return _deliver(self.folder, self.deliver, self._note_error, wait=5.0, finish=True).done
        return False


# ---------------------------------------------------------------------- reading and delivering


def _size(folder: Path) -> int:
    try:
        return (folder / ENTRIES).stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(folder: Path, offset: int) -> bytes:
    try:
        with open(folder / ENTRIES, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def _progress(folder: Path) -> tuple[int, int]:
    """(entries done, byte offset just past them)."""
    try:
        words = (folder / DELIVERED).read_text().split()
        done = int(words[0])
        offset = int(words[1]) if len(words) > 1 else None
    except (FileNotFoundError, ValueError, IndexError):
        return 0, 0
    if offset is None:  # a counter from before offsets were kept: it counted lines
        data = _read_from(folder, 0)
        offset = sum(len(line) + 1 for line in data.split(b"\n")[:done])
    if offset > _size(folder):  # a counter that outlived its entries: these are new ones
        return 0, 0
    return done, offset


def _queued(folder: Path) -> int:
    """Entries done plus those waiting (a last line without its newline included)."""
    done, offset = _progress(folder)
    return done + sum(1 for line in _read_from(folder, offset).split(b"\n") if line.strip())


def waiting(folder: Path) -> list[dict]:
    """The entries not delivered yet, in order (lines that are not whole entries left out): what
    a process that died before delivering them had queued."""
    done, offset = _progress(Path(folder))
    out = []
    for line in _read_from(Path(folder), offset).split(b"\n"):
        try:
            out.append(_parse(line))
        except PermanentError:
            continue
    return out


def oldest_waiting_ms(folder: Path) -> Optional[int]:
    """The time (ms since the epoch) of the oldest entry still waiting in the queue that carries
    one (metrics rows and images do), or None when nothing timed waits."""
    done, offset = _progress(Path(folder))
    with open(Path(folder) / ENTRIES, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                stamp = _parse(line).get("timestamp")
            except PermanentError:
                continue
            if isinstance(stamp, (int, float)):
                return int(stamp)
    return None


@dataclass
class _Pass:
    delivered: int = 0
    set_aside: int = 0
    reasons: list[str] = field(default_factory=list)
    done: bool = False  # nothing left that could be delivered now


def _deliver(folder: Path, deliver: Callable[[dict], None], on_error: Callable[[Exception], None],
             wait: float = 0.0, finish: bool = False) -> _Pass:
    """One delivery pass under the queue's lock: entries in order; a permanent failure sets the
    entry aside and goes on, a transient one (server away, 5xx, disk full) stops the pass for a
    retry. `finish`: remove the queue once all is done."""
    folder, out = Path(folder), _Pass()
    try:
        token = locks.lock(folder / LOCK, wait, LOCK_MAX_AGE)
    except FileNotFoundError:  # no queue (or removed meanwhile, by a deliverer that finished it)
        out.done = True
        return out
    except OSError as e:
        on_error(e)
        return out
    if token is None:
        on_error(Busy(f"another process delivers {folder}: {locks.lock_holder(folder / LOCK)}"))
        return out
    try:
        while True:
            append_line(folder / ENTRIES, b"")  # a torn last line becomes a whole (bad) line
            done, start = _progress(folder)
            data, pos, marked = _read_from(folder, start), 0, 0
            alone_until = 0  # after a batch refused as a whole: its entries one by one (see below)
            while (nl := data.find(b"\n", pos)) != -1:
                line, raw, pos = pos, data[pos:nl], nl + 1
                if not raw.strip():  # a fence's extra newline
                    continue
                if not locks.holds(folder / LOCK, token):  # taken over (we seemed dead): it goes on
                    on_error(Busy(f"{folder}: lost {LOCK}"))
                    return out
                entry, n, end = None, 1, pos
                try:
                    entry = _parse(raw)
                    group, end = ([entry], pos) if line < alone_until else _batch(data, pos, entry)
                    n = len(group)
                    deliver(_with_files(folder, entry) if n == 1 else _merged(group))
                    out.delivered += n
                except Exception as e:
                    if not is_permanent(e):
                        on_error(e)
                        return out
                    if n > 1:  # which entry it was, MLflow does not say: each alone, the bad set aside
                        alone_until, pos = end, line
                        continue
                    out.reasons.append(_set_aside(folder, done, entry, raw, e))
                    out.set_aside += 1
                    n, end = 1, pos
                done, marked, pos = done + n, end, end
                write_text_atomic(folder / DELIVERED, f"{done} {start + pos}\n")
            if pos > marked:  # blank lines after the last entry: skip them for good
                write_text_atomic(folder / DELIVERED, f"{done} {start + pos}\n")
            if not finish or _size(folder) == start + pos:
                break  # else something was appended meanwhile: deliver it before removing the queue
        out.done = True
        if finish:
            _remove(folder)
    except OSError as e:  # the spool's own disk (full, read-only): retry later
        on_error(e)
    finally:
        locks.unlock(folder / LOCK, token)
    return out


def _batch(data: bytes, pos: int, first: dict) -> tuple[list[dict], int]:
    """`first` and the metrics entries of the same run on the whole lines right after it (from
    `pos`), up to MLflow's log_batch limit of values, and the offset past the last: what a
    backlog delivers in one call. A server that falls behind gets fewer, larger calls, not a
    queue that grows. Anything else (another run, another kind, a torn line) ends the batch."""
    if first.get("kind") != "metrics" or not isinstance(first.get("metrics"), dict):
        return [first], pos
    group, values, end = [first], len(first["metrics"]), pos
    while (nl := data.find(b"\n", end)) != -1:
        raw = data[end:nl]
        if raw.strip():
            try:
                entry = _parse(raw)
            except PermanentError:
                break
            if (entry.get("kind") != "metrics" or entry.get("run_id") != first.get("run_id")
                    or not isinstance(entry.get("metrics"), dict)
                    or values + len(entry["metrics"]) > MLFLOW_BATCH_METRICS):
                break
            group.append(entry)
            values += len(entry["metrics"])
        end = nl + 1
    return group, end


def _merged(group: list[dict]) -> dict:
    """One metrics entry carrying every row of `group` (each with its own step and time)."""
    try:
        rows = [[k, v, e["timestamp"], e["step"]] for e in group for k, v in e["metrics"].items()]
    except (KeyError, TypeError) as bad:  # a malformed one among them: each alone, it set aside
        raise PermanentError(f"malformed metrics entry in a batch: {bad!r}") from None
    return {"kind": "metrics", "run_id": group[0]["run_id"], "rows": rows}


def _parse(raw: bytes) -> dict:
    try:
        entry = json.loads(raw)
    except ValueError:
        raise PermanentError("not a whole entry (a write cut short by a crash or a full disk)") from None
    if not isinstance(entry, dict):
        raise PermanentError("not an entry (not a JSON object)")
    return entry


def _with_files(folder: Path, entry: dict) -> dict:
    """The entry with its copied files checked readable (found in this folder if it was moved)."""
    if "files" not in entry:
        return entry
    if not isinstance(entry["files"], dict):
        raise PermanentError("malformed entry: 'files' is not a mapping")
    found = {}
    try:
        for name, path in entry["files"].items():
            path = Path(path)
            if not path.exists():
                path = folder / "files" / path.parent.name / path.name
            open(path, "rb").close()
            found[name] = str(path)
    except (OSError, TypeError) as e:
        raise PermanentError(f"copied file missing or unreadable: {e}") from None
    return {**entry, "files": found}


def is_permanent(err: Exception) -> bool:
    """True for errors no retry fixes: the entry is set aside; anything else is retried later."""
    if isinstance(err, PermanentError):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # not imported: not an MLflow error
    return (mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException)
            and getattr(err, "error_code", None) in PERMANENT_CODES)


def _set_aside(folder: Path, record: int, entry: Optional[dict], raw: bytes, err: Exception) -> str:
    """Keep the entry with its reason in the dead-letter file (before the counter moves past it:
    a crash in between sets it aside twice rather than losing it)."""
    code = getattr(err, "error_code", None)  # MLflow's: RESOURCE_DOES_NOT_EXIST, ...
    what = f"{type(err).__name__} {code}" if code else type(err).__name__
    reason = f"entry {record}: {what}: {' '.join(str(err).split())[:500]}"
    kept = {"entry": entry} if entry is not None else {"line": raw.decode(errors="replace")}
    record_line = json.dumps({"reason": reason, "at_ms": now_ms(), **kept}) + "\n"
    append_line(folder / DEAD_LETTER, record_line.encode())
    print(f"paceray: set aside a queued MLflow write of {folder} in {folder / DEAD_LETTER}: {reason}",
          file=sys.stderr, flush=True)
    return reason


def _remove(folder: Path) -> None:
    """Remove a finished queue, except its dead letters and the files they name."""
    (folder / DELIVERED).unlink(missing_ok=True)  # first: a counter must never outlive its entries
    dead = folder / DEAD_LETTER
    if not dead.exists():
        shutil.rmtree(folder, ignore_errors=True)
        return
    keep = set()
    for line in dead.read_bytes().splitlines():
        try:
            keep.update(Path(p).parent.name for p in json.loads(line)["entry"]["files"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    (folder / ENTRIES).unlink(missing_ok=True)
    for tmp in folder.glob(f".{DELIVERED}.*.tmp"):  # a counter's temp file left by a crash
        tmp.unlink(missing_ok=True)
    for blob in (folder / "files").glob("*"):
        if blob.name not in keep:
            shutil.rmtree(blob, ignore_errors=True)


# ---------------------------------------------------------------------- the public passes


def deliver_pending(folder: Path, deliver: Callable[[dict], None],
                    on_error: Callable[[Exception], None] = lambda e: None) -> bool:
    """Deliver undelivered entries in order (setting aside those no retry can deliver); False at
    the first transient failure, or while another process delivers them (to retry later)."""
    return _deliver(folder, deliver, on_error).done


def drain(folder: Path, deliver: Callable[[dict], None],
          on_error: Callable[[Exception], None] = lambda e: None, wait: float = LOCK_WAIT) -> bool:
    """Deliver everything left in a spool nobody is writing to any more and remove it (all but
    its dead letters); False (the spool kept) at the first transient failure."""
    return _deliver(folder, deliver, on_error, wait=wait, finish=True).done


# ---------------------------------------------------------------------- MLflow delivery


def mlflow_deliverer(tracking_uri: Optional[str]) -> Callable[[dict], None]:
    """Turn spooled entries into MlflowClient calls (idempotent where MLflow allows it)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)

    def deliver(e: dict) -> None:
        # The call is built first: an entry that cannot make one is malformed (permanent),
        # while errors from the call itself are classified by is_permanent.
        try:
            run_id, kind = e["run_id"], e["kind"]
            if kind == "metrics" and "rows" in e:  # a backlog's rows in one call (_merged)
                rows = [Metric(key=k, value=float(v), timestamp=ts, step=step) for k, v, ts, step in e["rows"]]
                send = lambda: client.log_batch(run_id, metrics=rows)  # noqa: E731
            elif kind == "metrics":
                rows = [Metric(key=k, value=float(v), timestamp=e["timestamp"], step=e["step"])
                        for k, v in e["metrics"].items()]
                send = lambda: client.log_batch(run_id, metrics=rows)  # noqa: E731
            elif kind == "tags":
                tags = {k: str(v) for k, v in e["tags"].items()}
                send = lambda: [client.set_tag(run_id, k, v) for k, v in tags.items()]  # noqa: E731
            elif kind == "artifact":
                (path,) = e["files"].values()  # exactly one file
                where = e.get("artifact_path")
                send = lambda: client.log_artifact(run_id, path, where)  # noqa: E731
            elif kind == "image":
                (path,) = e["files"].values()
                img, key, step, ts = _image(path), e["key"], e["step"], e["timestamp"]
                send = lambda: client.log_image(run_id, img, key=key, step=step, timestamp=ts)  # noqa: E731
            elif kind == "terminate":
                status = e["status"]
                send = lambda: client.set_terminated(run_id, status=status)  # noqa: E731
            else:
                raise PermanentError(f"unknown spool entry kind {kind!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as bad:
            raise PermanentError(f"malformed {e.get('kind')!r} entry: {bad!r}") from None
        send()

    return deliver


def _image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.copy()
    except OSError as e:  # PIL's "cannot identify image file" included
        raise PermanentError(f"copied image unreadable: {e}") from None


@dataclass(frozen=True)
class ReplayResult:
    delivered: int
    set_aside: int
    reasons: list[str]
    dead_letter: Optional[Path]  # where the set-aside entries are kept, if any ever were

    def __str__(self) -> str:
        text = f"delivered {self.delivered} queued write(s)"
        if self.set_aside:
            text += f", set aside {self.set_aside} in {self.dead_letter} ({'; '.join(self.reasons)})"
        return text


def replay(folder: Path, tracking_uri: Optional[str]) -> ReplayResult:
    """Deliver a left-behind spool; says how many entries were delivered and set aside, and why."""
    folder, errors = Path(folder), []
    result = _deliver(folder, mlflow_deliverer(tracking_uri), errors.append, wait=LOCK_WAIT, finish=True)
    dead = folder / DEAD_LETTER
    out = ReplayResult(result.delivered, result.set_aside, result.reasons, dead if dead.exists() else None)
    if not result.done:
        from paceray.base.errors import PacerayError, one_line

        raise PacerayError(one_line(f"{folder}: {out}; stopped at an error: {errors[-1]}"))
    return out


def now_ms() -> int:
    return int(time.time() * 1000)
