"""How far a search is, as it runs: one view the driver keeps up to date from Tune's own events.

On a terminal it is one live panel (rich): trials finished, running, stopped by the scheduler,
failed and pending; per running trial the columns the trainable's `progress` hook names (the
denoiser: step, stage, last FID); the best so far; an ETA. Elsewhere (CI, `ray job logs`, a pipe)
it is one plain line per trial event. Ray's worker output goes to a log file the view names
(ray_internals.divert_worker_logs) unless the command runs with --verbose.

Tune pickles its callbacks with the tuner, so the callback keeps no state of its own: it hands
each event to the view the command made active (`SearchView.__enter__`). A search restored from
a tuner pickled without it runs without a view.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from ray import tune

from paceray.protocol import STEP_KEY, packing

_active: Optional["SearchView"] = None
LAG_SHOWN_S = 30.0  # "tracking N s behind" once the oldest undelivered write is older than this
LAG_CHECK_S = 5.0


@dataclass
class TrialState:
    name: str
    steps: Optional[int]  # the trial's horizon, when its config says it
    status: str = "pending"  # running, finished, stopped, failed
    step: Optional[int] = None
    values: dict[str, Any] = field(default_factory=dict)  # the trainable's columns, last reported
    note: str = ""

    @property
    def fraction(self) -> float:
        if self.status in ("finished", "stopped", "failed"):
            return 1.0
        if self.status != "running" or not self.steps or self.step is None:
            return 0.0
        return min(self.step / self.steps, 1.0)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass(frozen=True)
class SearchShape:
    """What the view shows of one search: its name and trial count (None: unknown), `columns`
    ((header, result key) pairs from the trainable's `progress` hook), the metric and its mode,
    `steps_of(config)` a trial's step budget, `name_of(config, trial_id)` its name and
    `arms_of(config)` its arms' labels (Trainable.arm_label; a packed trial's in order a0, a1, ...)."""

    search: str
    total: Optional[int]
    columns: Sequence[tuple[str, str]]
    metric: str
    mode: str
    steps_of: Callable[[dict], int]
    name_of: Callable[[dict, str], str]
    arms_of: Callable[[dict], list[str]] = lambda config: []


class SearchView:
    """The view of one search (`shape`); Ray's worker output goes to `worker_log`."""

    def __init__(self, shape: SearchShape, worker_log: Optional[Path], live: Optional[bool] = None,
                 out: Optional[TextIO] = None):
        self.search, self.total, self.columns = shape.search, shape.total, list(shape.columns)
        self.metric, self.mode = shape.metric, shape.mode
        self.steps_of, self.name_of, self.arms_of = shape.steps_of, shape.name_of, shape.arms_of
        self.worker_log = worker_log
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.trials: dict[str, TrialState] = {}
        self.best: Optional[tuple[float, str]] = None
        self.start = time.monotonic()
        self._live = None
        # The run directory's tracking queues (RunDir.queue's folder): the view says when their
        # oldest undelivered entry is older than LAG_SHOWN_S (queues on other nodes' disks it
        # cannot see). Checked at most every LAG_CHECK_S.
        self.queues: Optional[Path] = None
        self._started_wall = time.time()
        self._lag: tuple[float, Optional[float]] = (-math.inf, None)

    # ------------------------------------------------------------------ events (from the callback)
    def _trial(self, trial) -> TrialState:
        state = self.trials.get(trial.trial_id)
        if state is None:
            config = trial.config or {}
            try:
                name, steps = self.name_of(config, trial.trial_id), self.steps_of(config)
            except Exception:  # a config the hooks cannot read still gets a row
                name, steps = trial.trial_id, None
            state = self.trials[trial.trial_id] = TrialState(name=name, steps=steps)
        return state

    def started(self, trial) -> None:
        state = self._trial(trial)
        state.status = "running"
        config = trial.config or {}
        try:
            arms = self.arms_of(config)
        except Exception:  # a config the hooks cannot read: no legend
            arms = []
        if packing.is_packed(config):
            legend = ", ".join(f"{packing.arm_key(k)} {label}" for k, label in enumerate(arms))
        else:
            legend = f"arm {arms[0]}" if arms else ""
        self._event(f"trial {state.name} started" + (f" · {legend}" if legend else ""))

    def result(self, trial, result: dict) -> None:
        state = self._trial(trial)
        state.status = "running"
        if isinstance(result.get(STEP_KEY), (int, float)):
            state.step = int(result[STEP_KEY])
        state.values.update({header: result[key] for header, key in self.columns if key in result})
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return
        better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
        best_arm = result.get(packing.BEST_ARM_KEY)  # a pack's metric is its best arm's: name the arm
        if better:
            self.best = (float(value), f"{trial.trial_id}-{best_arm}" if best_arm else state.name)
        shown = " · ".join(f"{h} {_fmt(state.values.get(h))}" for h, key in self.columns if key != STEP_KEY)
        self._event(f"trial {state.name} at step {self._step(state)}: {shown}{self._arms(result)}")

    def _arms(self, result: dict) -> str:
        """A pack's line also gives each arm's own metric (`a0 12.3, a1 14.1`), and which failed."""
        if packing.BEST_ARM_KEY not in result:
            return ""
        arms, k = [], 0
        while any(packing.arm_metric(packing.arm_key(k), key) in result
                  for key in (self.metric, packing.ARM_FAILED_METRIC)):
            arm = packing.arm_key(k)
            failed = result.get(packing.arm_metric(arm, packing.ARM_FAILED_METRIC))
            arms.append(f"{arm} {'failed' if failed else _fmt(result.get(packing.arm_metric(arm, self.metric)))}")
            k += 1
        return f" · arms: {', '.join(arms)}" if arms else ""

    def completed(self, trial) -> None:
        state = self._trial(trial)
        last = (trial.last_result or {}).get(STEP_KEY)
        if isinstance(last, (int, float)):
            state.step = int(last)
        stopped = state.steps is not None and isinstance(last, (int, float)) and last < state.steps
        state.status = "stopped" if stopped else "finished"
        self._event(f"trial {state.name} {'stopped by the scheduler' if stopped else 'finished'} "
                    f"at step {self._step(state)}")

    def errored(self, trial) -> None:
        state = self._trial(trial)
        state.status, state.note = "failed", _error_line(trial)
        self._event(f"trial {state.name} failed: {state.note}")

    def step(self, trials) -> None:
        if self.total is None or len(trials) > self.total:
            self.total = len(trials)
        if self._live is not None:
            self._live.update(self.render())

    # ------------------------------------------------------------------ what is shown
    def _step(self, state: TrialState) -> str:
        return f"{_fmt(state.step)}/{state.steps}" if state.steps else _fmt(state.step)

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in ("finished", "running", "stopped", "failed")}
        for state in self.trials.values():
            if state.status in counts:
                counts[state.status] += 1
        counts["pending"] = max((self.total or 0) - sum(counts.values()), 0)
        return counts

    def eta(self) -> Optional[float]:
        total = max(self.total or 0, len(self.trials))
        if not total:
            return None
        done = sum(s.fraction for s in self.trials.values()) / total
        if done <= 0 or done >= 1:
            return None
        return (time.monotonic() - self.start) * (1 - done) / done

    def tracking_lag(self) -> Optional[float]:
        """Seconds since the oldest entry still waiting in a queue this search wrote to (a queue
        touched since it started), or None when none waits."""
        checked, lag = self._lag
        if self.queues is None or time.monotonic() - checked < LAG_CHECK_S:
            return lag
        from paceray.tracking.spool import ENTRIES, oldest_waiting_ms

        oldest = []
        for entries in self.queues.glob(f"*/{ENTRIES}"):
            try:
                if entries.stat().st_mtime >= self._started_wall and (t := oldest_waiting_ms(entries.parent)):
                    oldest.append(t)
            except OSError:  # delivered and removed meanwhile
                continue
        lag = time.time() - min(oldest) / 1000 if oldest else None
        self._lag = (time.monotonic(), lag)
        return lag

    def _behind(self) -> str:
        lag = self.tracking_lag()
        return f" · tracking {lag:.0f} s behind" if lag is not None and lag > LAG_SHOWN_S else ""

    def summary(self) -> tuple[str, str]:
        """Two lines: the trial counts; the best so far, the time taken and the ETA (and how far
        behind tracking is, when it is)."""
        c = self.counts()
        counts = ", ".join(f"{c[s]} {s}" for s in ("finished", "running", "stopped", "failed", "pending"))
        best = f"best {self.metric} {_fmt(self.best[0])} ({self.best[1]})" if self.best is not None else "no result yet"
        timing = f"elapsed {_duration(time.monotonic() - self.start)}"
        eta = self.eta()
        if eta is not None:
            timing += f", ETA {_duration(eta)}"
        return counts, f"{best} · {timing}{self._behind()}"

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("running trial")
        table.add_column("step", justify="right")
        for header, key in self.columns:
            if key != STEP_KEY:
                table.add_column(header, justify="right")
        for state in self.trials.values():
            if state.status == "running":
                table.add_row(state.name, self._step(state),
                              *(_fmt(state.values.get(h)) for h, key in self.columns if key != STEP_KEY))
        failed = [f"{s.name}: {s.note}" for s in self.trials.values() if s.status == "failed"]
        counts, best = self.summary()
        parts = [Text(f"search {self.search}: {counts}", style="bold"), Text(best), table]
        parts += [Text(f"failed {line}", style="red") for line in failed]
        if self.worker_log is not None:
            parts.append(Text(f"worker logs: {self.worker_log}", style="dim"))
        return Group(*parts)

    def _event(self, text: str) -> None:
        if self._live is not None:
            self._live.update(self.render())
            return
        if text:
            c = self.counts()
            print(f"[{_clock(time.monotonic() - self.start)}] {text} · {c['finished'] + c['stopped'] + c['failed']}"
                  f"/{max(self.total or 0, len(self.trials))} done{self._behind()}", file=self.out, flush=True)

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "SearchView":
        global _active
        _active = self
        if self.worker_log is not None and not self.live:
            print(f"search {self.search}: Ray's worker output goes to {self.worker_log} (--verbose shows it here)",
                  file=self.out, flush=True)
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.render(), console=Console(file=self.out), refresh_per_second=2,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
            self._live = None
        else:
            print(f"search {self.search}: {' · '.join(self.summary())}", file=self.out, flush=True)


def _error_line(trial) -> str:
    """The last line of the trial's error file (the exception and its message), shortened."""
    try:
        lines = [ln.strip() for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "failed"
    except Exception:
        return "see the trial's error file"


class ProgressCallback(tune.Callback):
    """Tune's events, handed to the active SearchView (see the module docstring)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _active is not None:
            _active.started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _active is not None:
            _active.result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _active is not None:
            _active.completed(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if _active is not None:
            _active.errored(trial)

    def on_step_end(self, iteration, trials, **info):
        if _active is not None:
            _active.step(trials)
