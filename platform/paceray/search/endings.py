"""How a search's trials ended, as only the search's driver can know it: from Tune's own results
(a trial a scheduler stopped before its last step, one stopped just after it) and from the trials'
records (one whose process died with the search). Each goes to the trial's runner's `end`, the
one place a trial's status is decided (paceray.trial.runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

from paceray.protocol import STEP_KEY
from paceray.search.tuner import trial_id_of
from paceray.trial.runner import INTERRUPTED_REASON, Ending, Outcome, TrialRunner


def end_stopped_trials(results, records: Path, uri: str, run_dir: Path, scheduler: str,
                       horizon: Callable[[dict], object]) -> None:
    """A trial Tune ended without error was stopped by the scheduler if it had not reached its
    last step (its runs become KILLED, tagged with who stopped them), else it finished. Tune's
    result decides, not the runs' status: depending on how fast the trial's process went down,
    the stop left them RUNNING or (its Train controller dying first, its error path running)
    FAILED. A trial Tune saw fail was ended by its own process, with the error it saw."""
    for result in results:
        trial_id = trial_id_of(result)
        if trial_id is None or result.error is not None:
            continue
        runner = TrialRunner.from_record(records / f"{trial_id}.json", uri, run_dir)
        if runner is None:
            continue
        last = (result.metrics or {}).get(STEP_KEY, -1)
        if result.config is None or last >= horizon(result.config).steps:
            runner.end(Ending(Outcome.FINISHED))  # stopped only after its last report
        else:
            runner.end(Ending(Outcome.STOPPED, stopped_by=scheduler))


def recorded_runners(records: Path, uri: str = "", run_dir: Optional[Path] = None) -> Iterator[TrialRunner]:
    """The runner of every trial the search's records name (paceray.trial.runner); `uri` and
    `run_dir` only for a runner that will end its runs."""
    for record in sorted(records.glob("*.json")) if records.is_dir() else []:
        runner = TrialRunner.from_record(record, uri, run_dir or record.parent)
        if runner is not None:
            yield runner


def close_interrupted_trials(records: Path, uri: str, run_dir: Path) -> None:
    """The runs of trials whose process died with the search (none ended them) end FAILED, after
    what their processes had queued is delivered."""
    for runner in recorded_runners(records, uri, run_dir):
        runner.end(Ending(Outcome.INTERRUPTED, INTERRUPTED_REASON))


def failed_arms(records: Path) -> tuple[int, int]:
    """How many arms (runs) of a search's trials ended FAILED, and how many there are."""
    failed = total = 0
    for runner in recorded_runners(records):
        ended = runner.ended()
        total += len(runner.runs)
        failed += sum(1 for arm in runner.runs if ended.get(arm) == "FAILED")
    return failed, total
