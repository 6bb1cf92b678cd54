"""A packed Optuna search (paceray.search.packed_searcher): Optuna asked for K points per Tune
trial, each arm's result told to its own Optuna trial, points of another kind kept for later."""

from __future__ import annotations

from conftest import tiny_base, write_spec
from paceray.protocol import packing
from paceray.search.tuner import packed_optuna
from paceray.spec.specfile import load


def _searcher(tmp_path, search: dict, pack, num_samples: int, concurrent: int = 1):
    spec = write_spec(tmp_path / "o.yaml", "o", tiny_base(), search=search,
                      tune={"algorithm": "optuna", "pack": pack, "num_samples": num_samples, "seed": 3})
    loaded = load(spec)
    searcher = packed_optuna(loaded, concurrent)
    searcher.set_search_properties(loaded.metric, loaded.mode, {})
    return searcher


def test_a_trial_is_a_pack_of_k_points_and_num_samples_counts_arms(tmp_path):
    s = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]},
                             "curriculum.order": {"choice": ["easy-to-hard", "hard-to-easy"]}}, 3, 7)
    sizes = []
    for i in range(5):
        config = s.suggest(f"t{i}")
        if config == "FINISHED":
            break
        arms = packing.arms_of(config)
        sizes.append(len(arms))
        assert all(2 <= a["curriculum"]["num_clusters"] < 9 for a in arms)
        assert all(a["train"] == arms[0]["train"] for a in arms)  # full configs: the base's train settings
        s.on_trial_complete(f"t{i}", {**{f"a{k}/eval/fid": 10.0 + k for k in range(len(arms))}, "eval/fid": 10.0})
    assert sizes == [3, 3, 1]
    study = s.inner._ot_study
    assert len(study.trials) == 7
    assert sorted(t.value for t in study.trials) == [10.0, 10.0, 10.0, 11.0, 11.0, 12.0, 12.0]


def test_an_arm_without_a_finite_result_is_a_failed_optuna_trial(tmp_path):
    s = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, 2, 2)
    arms = packing.arms_of(s.suggest("t0"))
    assert len(arms) == 2
    s.on_trial_result("t0", {"a0/eval/fid": 5.0, "a1/eval/fid": 6.0, "eval/fid": 5.0})
    s.on_trial_complete("t0", {"a0/eval/fid": 4.0, "eval/fid": 4.0})  # a1 failed at its last eval: NaN
    # a0 is told its last value (4.0); a1 its last before the end (6.0): an arm's own, not the pack's
    assert sorted(t.value for t in s.inner._ot_study.trials) == [4.0, 6.0]
    s2 = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, 2, 2)
    s2.suggest("t0")
    s2.on_trial_complete("t0", {"a0/eval/fid": float("nan")}, error=False)  # a1 never reported; a0 non-finite
    assert sorted(t.state.name for t in s2.inner._ot_study.trials) == ["FAIL", "FAIL"]


def test_points_of_another_kind_wait_for_a_pack_of_their_own(tmp_path):
    s = _searcher(tmp_path, {"curriculum.order": {"choice": ["easy-to-hard", "hard-to-easy"]},
                             "train.lr": {"choice": [0.001, 0.002]}}, 4, 8)
    seen = 0
    for i in range(20):
        config = s.suggest(f"t{i}")
        if config == "FINISHED":
            break
        arms = packing.arms_of(config)
        assert len({a["train"]["lr"] for a in arms}) == 1  # never two learning rates in one pack
        seen += len(arms)
        s.on_trial_complete(f"t{i}", {f"a{k}/eval/fid": 1.0 for k in range(len(arms))})
    assert seen == 8


def test_pack_auto_fills_the_slots(tmp_path):
    s = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, "auto", 8, concurrent=2)
    assert s.pack == 4  # 8 arms over 2 slots (the tiny preset allows 16)


def test_an_arm_flagged_failed_is_a_failure_whatever_its_last_value(tmp_path):
    s = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, 2, 2)
    s.suggest("t0")
    s.on_trial_result("t0", {"a0/eval/fid": 5.0, "a1/eval/fid": 1.0, "eval/fid": 1.0})
    s.on_trial_complete("t0", {"a0/eval/fid": 4.0, "a1/paceray_failed": 1, "eval/fid": 4.0})
    trials = sorted(s.inner._ot_study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"] and trials[0].value == 4.0


def test_the_searcher_saves_and_restores_as_tune_checkpoints_it(tmp_path):
    """Tune pickles its searcher at every checkpoint of the search: the define-by-run space is an
    object, not a closure (an Optuna search of main crashed on its first checkpoint)."""
    import pickle

    from paceray.spec import space

    s = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, 2, 4)
    s.suggest("t0")
    pickle.dumps(space.define_by_run(load(tmp_path / "o.yaml")))
    s.save(str(tmp_path / "searcher.pkl"))
    again = _searcher(tmp_path, {"curriculum.num_clusters": {"randint": [2, 9]}}, 2, 4)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.asked == 2 and list(again.packs) == ["t0"]
    again.on_trial_complete("t0", {"a0/eval/fid": 3.0, "a1/eval/fid": 4.0})
    assert sorted(t.value for t in again.inner._ot_study.trials) == [3.0, 4.0]
