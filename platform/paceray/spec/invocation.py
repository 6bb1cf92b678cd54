"""What a `paceray train` or `paceray tune` was asked for, from its command line: the spec and its
--set overrides, where Ray and MLflow are, whether to resume, the run directory, how verbose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from paceray.base.errors import PacerayError


@dataclass(frozen=True)
class Invocation:
    spec_path: str
    overrides: tuple[str, ...] = ()
    address: Optional[str] = None
    tracking_uri: Optional[str] = None
    resume: bool = False
    run_dir: Optional[str] = None
    verbose: bool = False

    def run_dir_or(self, default: Path) -> Path:
        """--run-dir, absolute, or the spec's default (its run_dir, PACERAY_RUN_DIR or ./runs); a
        path that is, or lies under, an existing file fails here in one line, before anything starts."""
        path = Path(self.run_dir).expanduser().resolve() if self.run_dir else default
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            named = f"--run-dir {self.run_dir}" if self.run_dir else f"run directory {path}"
            where = "is a file" if blocker == path else f"lies under the file {blocker}"
            raise PacerayError(f"{named}: {where}, not a directory; name a directory (it is made if missing)")
        return path
