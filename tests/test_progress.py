"""The live view of a search (paceray.search.live_view) fed Tune-like events: its plain lines off a
terminal, and the panel it renders on one. The real search's lines are checked in test_tune_e2e."""

from __future__ import annotations

import io
from types import SimpleNamespace

from paceray.search.live_view import SearchShape, SearchView


def _trial(tid: str, order: str, error_file=None):
    return SimpleNamespace(trial_id=tid, config={"order": order, "steps": 30}, last_result={}, error_file=error_file)


def _pack(tid: str, orders: list[str]):
    """A packed trial's config (paceray.protocol.packing) of arms with these orders."""
    from paceray.protocol.packing import ARMS_KEY

    arms = [{"order": o, "steps": 30} for o in orders]
    return SimpleNamespace(trial_id=tid, config={ARMS_KEY: arms}, last_result={}, error_file=None)


def _view(out, live=False, total=3):
    from paceray.protocol.packing import arms_of

    shape = SearchShape("quick", total, [("step", "step"), ("stage", "curriculum/stage"), ("FID", "eval/fid")],
                        "eval/fid", "min", lambda c: arms_of(c)[0]["steps"],
                        lambda c, tid: f"{arms_of(c)[0]['order'] if len(arms_of(c)) == 1 else 'pack'}-{tid}",
                        lambda c: [arm["order"] for arm in arms_of(c)])
    return SearchView(shape, worker_log=None, live=live, out=out)


def test_plain_lines_one_per_event_with_best_stopped_and_failed(tmp_path):
    out = io.StringIO()
    a, b, c = _trial("t0", "none"), _trial("t1", "easy-to-hard"), _trial("t2", "random", tmp_path / "error.txt")
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nTrialFailed: non-finite loss\n")
    with _view(out) as view:
        for t in (a, b, c):
            view.started(t)
        view.result(a, {"step": 15, "curriculum/stage": 1, "eval/fid": 60.0})
        view.result(b, {"step": 15, "curriculum/stage": 3, "eval/fid": 55.5})
        view.result(b, {"step": 20, "train/loss": 0.3})  # no metric: no line
        assert "ETA" in view.summary()[1]  # a third of the work done
        a.last_result, b.last_result = {"step": 15}, {"step": 30}
        view.completed(a)
        view.completed(b)
        view.errored(c)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 + 2 + 3 + 1, lines
    assert lines[0].endswith("trial none-t0 started · arm none · 0/3 done")
    assert "trial easy-to-hard-t1 at step 15/30: stage 3 · FID 55.5 · 0/3 done" in lines[4]
    assert "trial none-t0 stopped by the scheduler at step 15/30" in lines[5]
    assert "trial easy-to-hard-t1 finished at step 30/30 · 2/3 done" in lines[6]
    assert "trial random-t2 failed: TrialFailed: non-finite loss · 3/3 done" in lines[7]
    assert lines[8] == ("search quick: 1 finished, 0 running, 1 stopped, 1 failed, 0 pending · best eval/fid 55.5 "
                        f"(easy-to-hard-t1) · elapsed {lines[8].rsplit('elapsed ', 1)[1]}")


def test_the_live_panel_shows_running_trials_their_columns_and_the_best(tmp_path):
    from rich.console import Console

    view = _view(io.StringIO(), live=False, total=4)
    view.worker_log = tmp_path / "workers.log"
    a, b = _trial("t0", "none"), _trial("t1", "hard-to-easy")
    view.started(a), view.started(b)
    view.result(b, {"step": 15, "curriculum/stage": 2, "eval/fid": 71.25})
    console = Console(record=True, width=100)
    console.print(view.render())
    text = console.export_text()
    assert "search quick: 0 finished, 2 running, 0 stopped, 0 failed, 2 pending" in text
    assert "best eval/fid 71.25 (hard-to-easy-t1)" in text
    row = next(line for line in text.splitlines() if line.startswith("hard-to-easy-t1"))
    assert row.split() == ["hard-to-easy-t1", "15/30", "2", "71.25"]
    assert f"worker logs: {tmp_path / 'workers.log'}" in text


def test_a_packs_line_gives_each_arms_metric_and_the_best_is_an_arm():
    out = io.StringIO()
    pack = _pack("p0", ["none", "none min-snr weighting", "easy-to-hard"])
    with _view(out, total=1) as view:
        view.started(pack)
        view.result(pack, {"step": 15, "curriculum/stage": 2, "eval/fid": 12.5, "paceray_best_arm": "a1",
                           "a0/eval/fid": 20.0, "a1/eval/fid": 12.5, "a2/paceray_failed": 1})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("trial pack-p0 started · a0 none, a1 none min-snr weighting, a2 easy-to-hard · 0/1 done")
    assert "trial pack-p0 at step 15/30: stage 2 · FID 12.5 · arms: a0 20, a1 12.5, a2 failed · 0/1 done" in lines[1]
    assert "best eval/fid 12.5 (p0-a1)" in lines[-1]


def test_the_view_says_when_tracking_falls_behind(tmp_path, monkeypatch):
    """A queue of this search whose oldest undelivered row is 45 s old: "tracking 45 s behind";
    rows a few seconds old, or a queue left from before the search started, say nothing."""
    import os
    import time

    from paceray.search import live_view
    from paceray.tracking import spool

    monkeypatch.setattr(live_view, "LAG_CHECK_S", 0.0)  # look at every event
    queues = tmp_path / "mlflow-spool"
    old = queues / "left-from-before"
    spool.append(old, {"kind": "metrics", "run_id": "x", "step": 1, "timestamp": spool.now_ms() - 3_600_000,
                       "metrics": {"a": 1.0}})
    os.utime(old / spool.ENTRIES, (time.time() - 7200, time.time() - 7200))
    out = io.StringIO()
    with _view(out) as view:
        view.queues = queues
        spool.append(queues / "run-a", {"kind": "tags", "run_id": "a", "tags": {"k": "v"}})  # untimed
        spool.append(queues / "run-a", {"kind": "metrics", "run_id": "a", "step": 5,
                                        "timestamp": spool.now_ms() - 4_000, "metrics": {"a": 1.0}})
        view.started(_trial("t0", "none"))
        assert "behind" not in out.getvalue()
        spool.append(queues / "run-b", {"kind": "metrics", "run_id": "b", "step": 5,
                                        "timestamp": spool.now_ms() - 45_000, "metrics": {"a": 1.0}})
        view.started(_trial("t1", "easy-to-hard"))
        assert out.getvalue().splitlines()[-1].endswith("· tracking 45 s behind"), out.getvalue()
        (queues / "run-b" / spool.DELIVERED).write_text(f"1 {(queues / 'run-b' / spool.ENTRIES).stat().st_size}\n")
        assert view.tracking_lag() < 10  # run-a's row, 4 s old
