"""The on-disk queue between a trial and MLflow: order, durability, retry, replay."""

from __future__ import annotations

import time
from pathlib import Path

from paceray import spool


class FlakyServer:
    """Refuses the first `down` deliveries, then takes them in order."""

    def __init__(self, down: int):
        self.down, self.got = down, []

    def __call__(self, entry):
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("server away")
        self.got.append(entry["n"])


def test_writes_wait_while_the_server_is_away_and_arrive_in_order(tmp_path):
    server = FlakyServer(down=3)
    s = spool.Spool(tmp_path / "q", server, retry_seconds=0.05)
    for n in range(20):
        s.put({"n": n})
    assert s.close(timeout=10)
    assert server.got == list(range(20))
    assert not (tmp_path / "q").exists()  # delivered: nothing left behind


def test_a_server_that_never_returns_leaves_the_queue_and_replay_delivers_it(tmp_path):
    s = spool.Spool(tmp_path / "q", FlakyServer(down=10**9), retry_seconds=0.05)
    for n in range(5):
        s.put({"n": n}, files={"a.txt": _file(tmp_path, f"a{n}.txt", str(n))})
    started = time.monotonic()
    assert not s.close(timeout=0.5)
    assert time.monotonic() - started < 10
    assert s.pending() == 5 and (tmp_path / "q" / "entries.jsonl").exists()
    for n in range(5):  # the spool holds its own copies: the trial's files may be gone by now
        (tmp_path / f"a{n}.txt").unlink()
    later, contents = FlakyServer(down=0), []

    def deliver(entry):
        contents.append(Path(entry["files"]["a.txt"]).read_text())
        later(entry)

    assert spool.drain(tmp_path / "q", deliver)
    assert later.got == list(range(5)) and contents == [str(n) for n in range(5)]
    assert not (tmp_path / "q").exists()


def test_partial_delivery_resumes_where_it_stopped(tmp_path):
    for n in range(4):
        spool.append(tmp_path / "q", {"n": n})
    first = FlakyServer(down=0)
    calls = []

    def two_then_fail(e):
        if len(calls) == 2:
            raise ConnectionError
        calls.append(e)
        first(e)

    assert not spool.deliver_pending(tmp_path / "q", two_then_fail)
    rest = FlakyServer(down=0)
    assert spool.deliver_pending(tmp_path / "q", rest)
    assert first.got + rest.got == [0, 1, 2, 3]


def test_a_line_cut_by_a_crash_is_not_delivered(tmp_path):
    spool.append(tmp_path / "q", {"n": 0})
    with open(tmp_path / "q" / "entries.jsonl", "a") as f:
        f.write('{"n": 1')  # the process died mid-write
    got = FlakyServer(down=0)
    assert spool.deliver_pending(tmp_path / "q", got)
    assert got.got == [0]


def _file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p
