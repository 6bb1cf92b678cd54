"""One command per search and per `paceray train` run (paceray.base.locks): a second is refused
in one line naming the holder; a lock whose holder died is taken over; folders made for the
lock alone do not outlive it. The end-to-end case (a second `paceray tune` on a live search) is
in tests/test_tune_e2e.py::test_killed_search_resumes_without_rerunning_finished_trials."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paceray.base import locks as command_lock
from paceray.base.errors import PacerayError


def test_a_second_holder_is_refused_in_one_line_naming_the_holder(tmp_path):
    folder = tmp_path / "runs" / "searches" / "quick"
    with command_lock.held(folder, "the search 'quick'"):
        with pytest.raises(PacerayError) as e:
            with command_lock.held(folder, "the search 'quick'"):
                pytest.fail("a second holder got in")
    msg = str(e.value)
    assert "the search 'quick' is already running" in msg and str(folder / "command.lock") in msg
    assert "\n" not in msg


def test_a_lock_whose_holder_died_is_taken_over(tmp_path):
    folder = tmp_path / "train" / "crash"
    # A command killed while it held the lock: its process is gone, the lock file stays.
    code = ("import os, sys; from pathlib import Path; from paceray.base import locks as command_lock; "
            "cm = command_lock.held(Path(sys.argv[1]), 'x'); cm.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    assert (folder / "command.lock").is_file()
    with command_lock.held(folder, "`paceray train` of 'crash'"):
        pass
    assert not (folder / "command.lock").exists()


def test_folders_made_for_the_lock_alone_go_with_it(tmp_path):
    with command_lock.held(tmp_path / "runs" / "searches" / "a", "a"):
        pass
    assert list(tmp_path.iterdir()) == []
    with command_lock.held(tmp_path / "runs" / "searches" / "b", "b"):
        (tmp_path / "runs" / "searches" / "b" / "search.json").write_text("{}")
    assert (tmp_path / "runs" / "searches" / "b" / "search.json").is_file()
