"""What a `paceray train` or `paceray tune` was asked for, from its command line: the spec and its
--set overrides, where Ray and MLflow are, whether to resume, the run directory, how verbose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


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
        """--run-dir, absolute, or the spec's default."""
        return Path(self.run_dir).expanduser().resolve() if self.run_dir else default
