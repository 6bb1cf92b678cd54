"""What `paceray train` and `paceray tune` share before anything is written: the trainable's
one-off preparation, and the checkpoint a resume starts from."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir
from paceray.protocol import CheckpointFallback, PrepareContext
from paceray.spec.specfile import LoadedSpec
from paceray.tracking import client
from paceray.trial import trainer as trial


def readable_store(external: Optional[str], run_dir: Path) -> Optional[str]:
    """The tracking store `prepare` may read before the command's own session starts: the server
    the user named, else the embedded SQLite file if one exists (reading it directly is safe)."""
    if external:
        return external
    return RunDir(run_dir).store_uri if RunDir(run_dir).store_db.is_file() else None


def check_same_store(previous: dict, external: Optional[str], what: str, state: Path, or_else: str = "") -> None:
    """A resume goes to the tracking store its run or search began in (recorded in its state
    file `state`; older state files did not record it and are not checked): one line if not."""
    if "tracking_uri" not in previous or previous["tracking_uri"] == external:
        return

    def name(uri: Optional[str]) -> str:
        return uri or "the embedded store"

    hint = f"--tracking-uri {previous['tracking_uri']}" if previous["tracking_uri"] else "no --tracking-uri"
    raise PacerayError(f"--resume: {what} is tracked in {name(previous['tracking_uri'])}, not {name(external)} "
                       f"({state}): resume with {hint}{or_else}")


def prepare_context(storage: Path, tracking_uri: Optional[str]) -> PrepareContext:
    """What a trainable's `prepare` is given: the storage root, and the tracking store with a way
    to read an earlier run's artifact from it."""
    fetch = functools.partial(client.fetch_artifact, tracking_uri) if tracking_uri else None
    return PrepareContext(storage=str(storage), tracking_uri=tracking_uri, fetch_artifact=fetch)


def prepare_assets(loaded: LoadedSpec, storage: Path, tracking_uri: Optional[str]) -> None:
    """The trainable's one-off preparation (datasets, feature nets, references), before any run
    exists; the config it returns (references resolved) is what every trial gets."""
    prepare = loaded.trainable.prepare
    if prepare is None:
        return
    where = str(loaded.spec.path)
    try:
        config = prepare(loaded.base, prepare_context(storage, tracking_uri))
    except PacerayError as e:
        raise PacerayError(f"{where}: {e}") from None
    except ValueError as e:  # a trainable's own check, raised as ValueError from its pure code
        raise PacerayError(f"{where}: {e}") from None
    if config is not None:
        loaded.base = config


def resume_point(loaded: LoadedSpec, trial_dir: Path) -> Optional[CheckpointFallback]:
    """Where a resume starts: None for Ray's latest checkpoint; when that one does not load, the
    newest earlier one that does (said on the console); one line when none does."""
    fallback = trial.resume_point(trial_dir, loaded.trainable.check_checkpoint)
    if fallback is not None:
        print(f"paceray: {fallback.message()}", flush=True)
    return fallback
