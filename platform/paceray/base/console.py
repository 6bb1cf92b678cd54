"""Progress bars for the long one-off steps of a command (preparing a dataset, training a FID
network): rich's, on stderr, only where stderr is a terminal. In a Ray worker, a pipe or CI they
print nothing, so logs hold no bar fragments."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(description: str, total: float, unit: str = "") -> Iterator[Callable[[float], None]]:
    """`with progress_bar("training", 500, "steps") as advance: ... advance(1)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as bars:
        task = bars.add_task(description, total=total)
        yield lambda n=1: bars.advance(task, n)
