"""What a trainable's report hook gets and gives: a search's runs read back from MLflow
(`SearchRuns`), and the rendered report (`Rendered`: its table, text, files and parent tags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import pandas as pd


@dataclass
class SearchRuns:
    """What a report is built from: one search's child runs (or an experiment's `paceray train`
    runs), read from MLflow, with a way to fetch any metric's history."""

    client: Any  # MlflowClient
    experiment: str
    source: str  # what the trials were read from, for the header
    parent_run_id: Optional[str]
    metric: Optional[str]
    mode: str
    searched: list[str]  # the trial config paths the search varied
    runs: list = field(default_factory=list)  # mlflow Run objects, oldest first
    distributions: dict = field(default_factory=dict)  # searched path -> its spec distribution, e.g. "grid['a', 'b']"
    # `paceray report --target`: a value of the search metric the report times arms to reach
    # (what it does without one is the trainable's report's to say)
    target: Optional[float] = None

    def history(self, run_id: str, key: str) -> pd.Series:
        """`key` by step; a restarted trial may log a step twice: the later value wins."""
        points = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in points}
        return pd.Series(list(by_step.values()), index=list(by_step.keys()), dtype=float, name=key)


class Rendered(Protocol):
    """What a report hook returns (and the generic report is)."""

    table: pd.DataFrame

    @property
    def text(self) -> str: ...

    def files(self) -> dict[str, Callable[[Path], None]]:
        """File name -> writer of that file at a given path (CSV tables, PNG plots, JSON)."""

    def parent_tags(self) -> dict[str, str]:
        """Tags for the search's parent run (the best trial, warnings)."""


class ReportHook(Protocol):
    def build(self, runs: SearchRuns) -> Rendered: ...
