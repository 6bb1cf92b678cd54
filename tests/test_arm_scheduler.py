"""ASHA over arms (paceray.cluster.arm_scheduler.ArmAsha), the pure part: rungs, the cutoff, a
pack recorded before it is judged, one decision per arm and rung, state that survives a restart."""

from __future__ import annotations

import math

from paceray.cluster.arm_scheduler import ArmAsha


def test_rungs_lie_at_grace_times_powers_of_rf_below_the_last_step():
    assert ArmAsha(grace=10, reduction_factor=2, max_t=100).rungs == [80, 40, 20, 10]
    assert ArmAsha(grace=10, reduction_factor=3, max_t=90).rungs == [30, 10]
    assert ArmAsha(grace=100, reduction_factor=2, max_t=100).rungs == []


def test_before_the_first_rung_nothing_stops():
    asha = ArmAsha(grace=10, reduction_factor=2, max_t=100)
    assert asha.judge(5, {"p-a0": 99.0, "p-a1": 1.0}) == {"p-a0": False, "p-a1": False}
    assert asha.recorded == {}


def test_a_pack_is_recorded_before_any_arm_is_judged():
    # Three arms of one pack reach rung 10 together: the median of the three is the cutoff (rf 2),
    # so the worst stops, whatever order they are listed in.
    asha = ArmAsha(grace=10, reduction_factor=2, max_t=100)
    assert asha.judge(10, {"p-a0": 30.0, "p-a1": 10.0, "p-a2": 20.0}) == {"p-a0": True, "p-a1": False,
                                                                          "p-a2": False}
    # A later pack is judged against everything recorded at the rung (10, 20, 30, and its own).
    assert asha.judge(10, {"q-a0": 25.0, "q-a1": 5.0}) == {"q-a0": True, "q-a1": False}


def test_max_mode_keeps_the_top_and_a_non_finite_arm_stops():
    asha = ArmAsha(grace=10, reduction_factor=2, max_t=100, mode="max")
    assert asha.judge(10, {"a": 1.0, "b": 3.0, "c": math.nan}) == {"a": True, "b": False, "c": True}


def test_a_decision_is_given_once_and_survives_a_restart(tmp_path):
    asha = ArmAsha(grace=10, reduction_factor=2, max_t=100)
    first = asha.judge(12, {"p-a0": 3.0, "p-a1": 1.0})
    path = tmp_path / "arm_scheduler.json"
    path.write_text(asha.to_json())
    again = ArmAsha.load(path, grace=10, reduction_factor=2, max_t=100)
    # A pack restarted from an earlier checkpoint asks again with other values: the same answer.
    assert again.judge(12, {"p-a0": 0.5, "p-a1": 9.0}) == first == {"p-a0": True, "p-a1": False}
    assert ArmAsha.load(tmp_path / "missing.json", grace=1, reduction_factor=2, max_t=5).recorded == {}
