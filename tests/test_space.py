"""The search space as trials: canonical grid points (`none` once per seed whatever N and
pacing), `tune.seeds` replicates, Optuna's conditional space, and ASHA's curriculum-aware grace."""

import json

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


def spec(tmp_path, search=ORDER_X_N, tune=None, arms=None, **base):
    return load(write_spec(tmp_path / "s.yaml", "s", tiny_base(**base), search, tune=tune, arms=arms))


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


# ----------------------------------------------------------------- packed arms (tune.pack)

def _packed_spec(tmp_path, tune: dict, search: dict | None = None):
    search = search or {"curriculum.order": {"grid": ["none", "easy-to-hard", "hard-to-easy"]},
                        "loss.weighting": {"grid": ["uniform", "min-snr"]}}
    return load(write_spec(tmp_path / "p.yaml", "p", tiny_base(), search=search, tune=tune))


def test_packs_group_arms_that_differ_only_in_curriculum_and_loss(tmp_path):
    from paceray.spec import packs

    loaded = _packed_spec(tmp_path, {"pack": 4, "seeds": [0, 1]})
    arms = packs.arm_configs(loaded)
    assert len(arms) == 12  # 3 orders × 2 weightings × 2 seeds
    grouped = packs.packs(loaded, arms)
    # Arms of different seeds never share a pack; each seed's 6 arms fill a pack of 4 and one of 2.
    assert [len(p) for p in grouped] == [4, 2, 4, 2]
    for pack in grouped:
        assert len({a["train"]["seed"] for a in pack}) == 1
    assert sorted(json.dumps(a, sort_keys=True) for p in grouped for a in p) == sorted(
        json.dumps(a, sort_keys=True) for a in arms)


def test_points_differing_outside_curriculum_and_loss_form_packs_of_their_own(tmp_path):
    from paceray.spec import packs

    loaded = _packed_spec(tmp_path, {"pack": 8}, {"curriculum.order": {"grid": ["none", "easy-to-hard"]},
                                                  "train.lr": {"grid": [0.001, 0.002]}})
    grouped = packs.packs(loaded, packs.arm_configs(loaded))
    assert sorted(len(p) for p in grouped) == [2, 2]
    for pack in grouped:
        assert len({a["train"]["lr"] for a in pack}) == 1


def test_pack_auto_asks_the_trainable_and_pack_one_is_unpacked(tmp_path):
    from paceray.spec import packs

    loaded = _packed_spec(tmp_path, {"pack": "auto"})
    assert packs.pack_size(loaded) == "auto"
    assert [len(p) for p in packs.packs(loaded, packs.arm_configs(loaded))] == [6]  # tiny: up to 16 per pack
    assert packs.pack_size(_packed_spec(tmp_path, {})) is None


def test_a_packed_random_search_draws_its_points_on_the_driver(tmp_path):
    from paceray.spec import packs

    search = {"curriculum.order": {"grid": ["none", "easy-to-hard"]}, "curriculum.num_clusters": {"randint": [2, 6]}}
    loaded = _packed_spec(tmp_path, {"pack": 2, "algorithm": "random", "num_samples": 3, "seed": 7}, search)
    arms = packs.arm_configs(loaded)
    assert len(arms) == 6
    again = packs.arm_configs(_packed_spec(tmp_path, {"pack": 2, "algorithm": "random", "num_samples": 3, "seed": 7},
                                           search))
    assert arms == again  # seeded by tune.seed
    assert all(2 <= a["curriculum"]["num_clusters"] < 6 for a in arms if a["curriculum"]["order"] != "none")


@pytest.mark.parametrize("tune, says", [
    ({"pack": 0}, "pack must be a whole number of at least 1 or 'auto'"),
    ({"pack": "some"}, "tune.pack"),
])
def test_what_a_packed_search_cannot_do_is_one_line(tmp_path, tune, says):
    with pytest.raises(PacerayError) as e:
        _packed_spec(tmp_path, tune)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_pack_auto_fills_the_trials_that_run_at_once(tmp_path):
    from paceray.spec import packs

    loaded = _packed_spec(tmp_path, {"pack": "auto"})
    arms = packs.arm_configs(loaded)
    assert [len(p) for p in packs.packs(loaded, arms, slots=2)] == [3, 3]
    assert [len(p) for p in packs.packs(loaded, arms, slots=4)] == [2, 2, 2]
    assert [len(p) for p in packs.packs(loaded, arms, slots=1)] == [6]
    # five arms of each of five seeds (the digits study) on 2 slots: 13 arms' time per slot in
    # packs of 3 and 2, where five packs of 5 would leave a slot idle for the last one (15)
    study = _packed_spec(tmp_path, {"pack": "auto", "seeds": [0, 1, 2, 3, 4]},
                         {"curriculum.order": {"grid": ["none", "easy-to-hard", "hard-to-easy", "random", "shuffled"]}})
    grouped = packs.packs(study, packs.arm_configs(study), slots=2)
    assert [len(p) for p in grouped] == [3, 2] * 5
    assert all(len({a["train"]["seed"] for a in pack}) == 1 for pack in grouped)
    assert [len(p) for p in packs.packs(study, packs.arm_configs(study), slots=5)] == [5] * 5


# ----------------------------------------------------------------- arms as a list

ARMS = [{"curriculum.order": "none"}, {"curriculum.order": "easy-to-hard"},
        {"curriculum": {"order": "none"}, "loss.weighting": "min-snr"},  # nested or dotted alike
        {"curriculum.order": "none", "curriculum.distribution": "logit-normal"}]


def _tune_trials(loaded) -> list[dict]:
    """The configs Tune's own generator makes of the search's param space and presets, as the
    grid search hands them to it (paceray.search.tuner)."""
    from ray.tune.search.variant_generator import _get_preset_variants

    from paceray.base.dotted import flatten
    from paceray.search import tuner

    points = space.grid_points(loaded)
    param_space = tuner.param_space(loaded, "grid", points)
    generator = tuner.search_alg(loaded, 1, points)
    configs = []
    for preset in generator._points_to_evaluate:
        variants = list(_get_preset_variants({"config": param_space}, preset))
        assert len(variants) == 1, "a preset left some grid path to Tune's crossing"
        configs.append(flatten(variants[0][1]["config"]))
    return configs


def test_arms_cross_the_search_and_the_seeds_each_arm_jointly(tmp_path):
    s = spec(tmp_path, search={"curriculum.num_clusters": {"grid": [2, 8]}}, tune={"seeds": [0, 1]}, arms=ARMS)
    points = space.grid_points(s)
    # per seed: none once (N means nothing to it), easy-to-hard × 2 N, min-snr and logit-normal once
    assert len(points) == 2 * (1 + 2 + 1 + 1) == space.trial_count(s) == space.trial_count_preview(s)
    assert [p["train.seed"] for p in points[:5]] == [0] * 5
    arms = {(p["curriculum.order"], p["curriculum.num_clusters"], p["loss.weighting"], p["curriculum.distribution"])
            for p in points}
    assert arms == {("none", 4, "uniform", "uniform"), ("easy-to-hard", 2, "uniform", "uniform"),
                    ("easy-to-hard", 8, "uniform", "uniform"), ("none", 4, "min-snr", "uniform"),
                    ("none", 4, "uniform", "logit-normal")}
    # Tune makes exactly these trials: an arm's settings are never crossed with another arm's.
    tune_trials = _tune_trials(s)
    keys = ("curriculum.order", "curriculum.num_clusters", "loss.weighting", "curriculum.distribution", "train.seed")
    assert sorted(tuple(c[k] for k in keys) for c in tune_trials) == sorted(tuple(p[k] for k in keys) for p in points)
    assert space.searched_paths(s) == ("curriculum.num_clusters", "curriculum.order", "loss.weighting",
                                       "curriculum.distribution")


def test_packed_arms_from_a_list_share_a_pack_per_seed(tmp_path):
    from paceray.spec import packs

    s = spec(tmp_path, search={}, tune={"seeds": [0, 1], "pack": 8}, arms=ARMS)
    grouped = packs.packs(s, packs.arm_configs(s))
    assert [len(p) for p in grouped] == [4, 4]
    assert [{a["train"]["seed"] for a in p} for p in grouped] == [{0}, {1}]
    random = spec(tmp_path, search={"train.lr": {"loguniform": [1e-3, 1e-2]}},
                  tune={"pack": 8, "algorithm": "random", "num_samples": 2}, arms=ARMS)
    configs = packs.arm_configs(random)
    assert len(configs) == 8 and len({c["train"]["lr"] for c in configs}) == 2  # a sample's arms share its draw
    assert [c["train"]["lr"] for c in configs[:4]] == [configs[0]["train"]["lr"]] * 4


@pytest.mark.parametrize("arms, tune, message", [
    ([], None, r"s\.yaml: arms: List should have at least 1 item"),
    ([{}], None, r"s\.yaml: arms: arms\[0\] sets nothing"),
    ("none", None, r"s\.yaml: arms: Input should be a valid list"),
    ([{"curriculum.ordr": "none"}], None, r"s\.yaml: arms\[0\]\.curriculum\.ordr: no such config field"),
    ([{"curriculum.order": "sideways"}], None, r"s\.yaml: arms\[0\]: curriculum\.order: Input should be"),
    ([{"curriculum.stage_steps": 4.0}], None, r"arms\[0\]\.curriculum\.stage_steps: 4\.0 given to an integer"),
    ([{"curriculum.num_clusters": 2}], None, r"arms\[0\]\.curriculum\.num_clusters: also in search"),
    ([{"train.seed": 3}], {"seeds": [0, 1]}, r"arms\[0\]\.train\.seed: tune\.seeds gives the seeds"),
    ([{"curriculum.order": "none"}], {"algorithm": "optuna"}, r"arms: algorithm optuna cannot cross a list of arms"),
    ([{"curriculum.order": "none"}], {"algorithm": "random"}, r"arms: algorithm random .*or random with tune\.pack"),
    # valid alone, not with the search: the shuffled order takes only the uniform distribution
    ([{"curriculum.order": "none"}, {"curriculum.order": "shuffled"}], None,
     r"search: curriculum: order 'shuffled' .*\(search point curriculum\.distribution='logit-normal' in arms\[1\]\)"),
])
def test_a_malformed_arm_list_is_one_line(tmp_path, arms, tune, message):
    search = {"curriculum.num_clusters": {"grid": [2, 4]}}
    if "shuffled" in str(arms):
        search = {"curriculum.distribution": {"grid": ["uniform", "logit-normal"]}}
    with pytest.raises(PacerayError, match=message) as caught:
        spec(tmp_path, search=search, tune=tune, arms=arms)
    assert "\n" not in str(caught.value)


def test_set_pins_a_path_the_arms_set(tmp_path):
    path = write_spec(tmp_path / "s.yaml", "s", tiny_base(), {}, arms=ARMS)
    pinned = load(path, {"curriculum.order": "random"})
    configs = [space.with_point(pinned.base, p) for p in space.grid_points(pinned)]
    assert {c["curriculum"]["order"] for c in configs} == {"random"}
    # the two arms that set only the order are one now: uniform, min-snr and logit-normal, all random
    assert sorted((c["loss"]["weighting"], c["curriculum"]["distribution"]) for c in configs) == [
        ("min-snr", "uniform"), ("uniform", "logit-normal"), ("uniform", "uniform")]


def test_arm_labels_name_what_differs_from_the_baseline(tmp_path):
    s = spec(tmp_path, search={"curriculum.num_clusters": {"grid": [2, 8]}}, tune={"seeds": [0, 1]}, arms=ARMS)
    label = s.trainable.arm_label
    searched = tuple(p for p in space.searched_paths(s) if p != "train.seed")
    labels = [label(space.with_point(s.base, p), searched) for p in space.grid_points(s)]
    assert labels[:5] == ["none", "easy-to-hard N=2", "none min-snr weighting", "none logit-normal timesteps",
                          "easy-to-hard N=8"]
    assert labels[5:] == labels[:5]  # the seed is no part of an arm
    # the platform's own label, for a trainable that names none: the searched paths' values
    from paceray.protocol.trainable import default_arm_label
    assert default_arm_label(s.base, ("curriculum.order", "train.lr")) == "curriculum.order=easy-to-hard, train.lr=0.002"
    assert default_arm_label(s.base, ()) == "base"
