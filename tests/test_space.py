"""The search space as trials: canonical grid points (`none` once per seed whatever N and
pacing), `tune.seeds` replicates, Optuna's conditional space, and ASHA's curriculum-aware grace."""

import optuna
import pytest

from conftest import tiny_base, write_spec
from paceray.spec import space
from paceray.base.errors import PacerayError
from paceray.spec.specfile import load
from paceray.search.tuner import grace_period

ORDER_X_N = {"curriculum.order": {"grid": ["none", "easy-to-hard", "random"]},
             "curriculum.num_clusters": {"grid": [2, 4, 8]},
             "curriculum.pacing": {"grid": ["fixed", "patience"]}}


def spec(tmp_path, search=ORDER_X_N, tune=None, **base):
    return load(write_spec(tmp_path / "s.yaml", "s", tiny_base(**base), search, tune=tune))


def test_a_grid_over_order_and_n_runs_none_once_per_seed(tmp_path):
    s = spec(tmp_path, tune={"seeds": [0, 1, 2]})
    points = space.grid_points(s)
    nones = [p for p in points if p["curriculum.order"] == "none"]
    # 2 curriculum orders × 3 N × 2 pacings + none, per seed
    assert len(points) == 3 * (2 * 3 * 2 + 1) == space.trial_count_preview(s) == space.trial_count(s)
    assert len(nones) == 3 and sorted(p["train.seed"] for p in nones) == [0, 1, 2]
    # the baseline's irrelevant settings take the base's values, whatever the grid said
    assert {(p["curriculum.num_clusters"], p["curriculum.pacing"]) for p in nones} == {(4, "fixed")}
    assert [p["train.seed"] for p in points[:13]] == [0] * 13  # seed-major: every arm of seed 0 first
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


def test_without_seeds_or_a_hook_the_grid_is_the_full_product(tmp_path):
    s = spec(tmp_path, search={"train.lr": {"grid": [0.001, 0.002]}, "curriculum.order": {"grid": ["none", "random"]}})
    assert len(space.grid_points(s)) == 4  # lr matters to every order
    assert space.trial_count_preview(s) == 4


def test_patience_settings_do_not_multiply_fixed_trials(tmp_path):
    s = spec(tmp_path, search={"curriculum.pacing": {"grid": ["fixed", "patience"]},
                               "curriculum.patience": {"grid": [3, 25]},
                               "curriculum.stage_steps": {"grid": [10, 20]}})
    points = space.grid_points(s)
    assert len(points) == 2 + 2  # fixed × 2 stage lengths, patience × 2 τ


@pytest.mark.parametrize("bad, message", [
    ({"seeds": [0, 0]}, "repeats a seed"),
    ({"seeds": [0, 1], "algorithm": "optuna"}, "replicates need algorithm grid or random"),
])
def test_bad_seeds_are_one_line(tmp_path, bad, message):
    with pytest.raises(PacerayError, match=message):
        spec(tmp_path, tune=bad)
    with pytest.raises(PacerayError, match="train.seed is also in search"):
        spec(tmp_path, search={"train.seed": {"grid": [0, 1]}}, tune={"seeds": [0, 1]})


def test_optuna_is_not_asked_for_what_the_order_makes_irrelevant(tmp_path):
    s = spec(tmp_path, search={"curriculum.num_clusters": {"choice": [2, 4, 8]},
                               "curriculum.stage_steps": {"randint": [5, 50]},
                               "curriculum.order": {"choice": ["none", "easy-to-hard"]}},
             tune={"algorithm": "optuna"})
    define = space.define_by_run(s)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        define(trial)
        seen.setdefault(trial.params["curriculum/order"], set()).add(frozenset(trial.params))
        study.tell(trial, 1.0)
    assert seen["none"] == {frozenset({"curriculum/order"})}  # suggested first, then nothing else
    assert seen["easy-to-hard"] == {frozenset({"curriculum/order", "curriculum/num_clusters",
                                               "curriculum/stage_steps"})}


def test_asha_grace_waits_for_the_latest_curriculum_to_show_every_timestep(tmp_path):
    search = {"curriculum.order": {"grid": ["none", "easy-to-hard"]},
              "curriculum.num_clusters": {"grid": [2, 4]}}
    base = dict(curriculum={"stage_steps": 30}, train={"steps": 400}, eval={"every": 50})
    s = spec(tmp_path, search=search, tune={"scheduler": "asha", "grace_evals": 2}, **base)
    assert grace_period(s) == (1 + 3 * 30) + 2 * 50  # N=4 cumulative: all timesteps from step 91
    warnings = []
    low = spec(tmp_path, search=search, tune={"scheduler": "asha", "grace_steps": 40}, **base)
    assert grace_period(low, warn=warnings.append) == 40
    assert len(warnings) == 1 and "before step 91" in warnings[0] and "\n" not in warnings[0]
    capped = spec(tmp_path, search={"curriculum.order": {"grid": ["easy-to-hard"]}}, tune={"scheduler": "asha"},
                  curriculum={"pacing": "patience", "max_stage_steps": 20, "num_clusters": 5},
                  train={"steps": 400}, eval={"every": 50})
    assert grace_period(capped) == (1 + 4 * 20) + 50  # patience: from the cap
