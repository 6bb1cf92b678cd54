"""`paceray report`: the trial table, summary and plots read back from a real (embedded SQLite)
MLflow store laid out the way `paceray tune` writes it."""

import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from conftest import PACERAY
from paceray.report import search as report
from paceray.report.command import run_report
from paceray.base.errors import PacerayError
from trainables.denoiser import study_report

FEATURES = "classifier:digits@8px(d=128); 256 samples vs 1438 reference images"
INCEPTION = "inception:pool3(d=2048); 1000 samples vs 10000 reference images"
STEPS = [100, 200, 300, 400]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB; " + "x" * 200

SEARCH = {"paceray.kind": "search", "paceray.trainable": "denoiser", "paceray.metric": "eval/fid"}
# trial -> (order, N, pacing, seed, status, FIDs at STEPS, error)
TRIALS = {
    "base-s0": ("none", 1, "fixed", 0, "FINISHED", [80, 60, 50, 40], None),
    "base-s1": ("none", 1, "fixed", 1, "FINISHED", [82, 62, 48, 44], None),  # baseline mean final FID: 42
    "e2h-n4": ("easy-to-hard", 4, "fixed", 0, "FINISHED", [70, 41, 35, 30], None),
    "h2e-n4": ("hard-to-easy", 4, "patience", 0, "FINISHED", [90, 70, 55, 45], None),
    "rnd-n8": ("random", 8, "fixed", 0, "FINISHED", [75, 50, 42, 33], None),  # reaches 42 exactly at 300
    "e2h-n8": ("easy-to-hard", 8, "fixed", 1, "RUNNING", [65, 39], None),
    "e2h-n2": ("easy-to-hard", 2, "fixed", 0, "FAILED", [95], OOM),
    "fresh": ("easy-to-hard", 2, "fixed", 1, "RUNNING", [], None),  # no eval yet
}


def add_trial(c, exp, parent, trial_id, order, n, pacing, seed, status, fids, error, features=FEATURES,
              distribution=None, weighting=None, arm=None):
    tags = {"paceray.kind": "trial", "paceray.trial_id": trial_id, "paceray.trainable": "denoiser"}
    if arm:  # as a search labels its trials (trainables/denoiser/search_hooks.arm_label)
        tags["paceray.arm"] = arm
    if parent:
        tags["mlflow.parentRunId"] = parent
    if fids and features:
        tags["paceray.fid_features"] = features
    if error:
        tags["paceray.error"] = error
    run_id = c.create_run(exp, run_name=f"{order}-N{n}-{trial_id}", tags=tags).info.run_id
    params = {"curriculum.order": order, "curriculum.num_clusters": n, "curriculum.clustering": "uniform",
              "curriculum.pacing": pacing, "curriculum.stage_steps": 50, "curriculum.patience": 200,
              "curriculum.cumulative": True, "train.seed": seed, "train.steps": 400, "eval.fid_samples": 256}
    if distribution:  # runs logged before curriculum.distribution existed have no such param: uniform
        params["curriculum.distribution"] = distribution
    if weighting:
        params["loss.weighting"] = weighting
    metrics = [Metric("eval/fid", float(v), 1000 + i, s) for i, (s, v) in enumerate(zip(STEPS, fids))]
    metrics += [Metric("train/loss", 1.0 / (i + 1), 1000 + i, s) for i, s in enumerate(STEPS)]
    c.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    if status != "RUNNING":
        c.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("quick", artifact_location=str(run_dir / "mlartifacts"))
    # An older search of the same experiment: the report must read the latest one.
    old = c.create_run(exp, run_name="search-old", start_time=1, tags=SEARCH).info.run_id
    add_trial(c, exp, old, "old-trial", "easy-to-hard", 4, "fixed", 0, "FINISHED", [1, 1, 1, 1], None)
    parent = c.create_run(exp, run_name="search-quick", tags=SEARCH).info.run_id
    for trial_id, spec in TRIALS.items():
        add_trial(c, exp, parent, trial_id, *spec)

    mixed = c.create_experiment("mixed", artifact_location=str(run_dir / "mlartifacts-mixed"))
    mparent = c.create_run(mixed, run_name="search-mixed", tags=SEARCH).info.run_id
    add_trial(c, mixed, mparent, "cls-base", "none", 1, "fixed", 0, "FINISHED", [50, 40], None)
    add_trial(c, mixed, mparent, "cls-e2h", "easy-to-hard", 4, "fixed", 0, "FINISHED", [45, 30], None)
    add_trial(c, mixed, mparent, "inc-e2h", "easy-to-hard", 4, "fixed", 0, "FINISHED", [20, 10], None,
              features=INCEPTION)

    single = c.create_experiment("single", artifact_location=str(run_dir / "mlartifacts-single"))
    add_trial(c, single, None, "single-20260101", "easy-to-hard", 4, "fixed", 0, "FINISHED", [60, 50], None)
    empty = c.create_experiment("empty", artifact_location=str(run_dir / "mlartifacts-empty"))
    c.create_run(empty, run_name="search-empty", tags=SEARCH)

    fair = c.create_experiment("paired", artifact_location=str(run_dir / "mlartifacts-paired"))
    fparent = c.create_run(fair, run_name="search-paired", tags=SEARCH).info.run_id
    c.log_param(fparent, "search.curriculum.order", "grid['none', 'easy-to-hard', 'hard-to-easy', 'random']")
    for order, histories in PAIRED.items():
        for seed, fids in enumerate(histories):
            run_id = add_trial(c, fair, fparent, f"{order}-s{seed}", order, 4, "fixed", seed, "FINISHED", fids, None)
            if order == "easy-to-hard" and seed == 0:  # what a real trial logs for report.html
                c.log_dict(run_id, E2H_SCHEDULE, "curriculum/schedule.json")
                for step in (200, 400):
                    c.log_image(run_id, np.full((9, 9, 3), step // 2, np.uint8), key="samples", step=step)
    # a timestep-sampling baseline: order none with logit-normal t, 1 better than uniform at every seed
    for seed, fids in enumerate(PAIRED["none"]):
        add_trial(c, fair, fparent, f"lognorm-s{seed}", "none", 4, "fixed", seed, "FINISHED", [f - 1 for f in fids],
                  None, distribution="logit-normal")
    # order none with min-SNR weighting: an arm of its own, not the baseline; one tagged by its
    # search, one run from before the tag (its label is read from its params)
    for seed, fids in enumerate(PAIRED["none"][:2]):
        add_trial(c, fair, fparent, f"minsnr-s{seed}", "none", 4, "fixed", seed, "FINISHED", [f + 2 for f in fids],
                  None, weighting="min-snr", arm="none min-snr weighting" if seed == 0 else None)
    # stopped early: its final FID is from another step, so it pairs with nothing
    add_trial(c, fair, fparent, "random-s0", "random", 4, "fixed", 0, "FINISHED", [70, 50], None)

    timing = c.create_experiment("timing", artifact_location=str(run_dir / "mlartifacts-timing"))
    tparent = c.create_run(timing, run_name="search-timing", tags=SEARCH).info.run_id
    for order, histories in TIMING.items():
        for seed, fids in enumerate(histories):
            add_trial(c, timing, tparent, f"{order}-s{seed}", order, 4, "fixed", seed, "FINISHED", fids, None)
    return {"uri": uri, "run_dir": run_dir, "parent": parent, "mixed_parent": mparent}


E2H_SCHEDULE = {"order": "easy-to-hard", "clusters": [[0, 250], [250, 500], [500, 750], [750, 1000]],
                "stages": [{"stage": 1, "final": False, "clusters": [4], "ranges": [[750, 1000]], "shares": None},
                           {"stage": 4, "final": True, "clusters": [1, 2, 3, 4], "ranges": [[0, 1000]],
                            "shares": None}],
                "full_from_step": 151, "realised_stage_lengths": [50, 50, 50]}

# order -> per seed 0..4, FIDs at STEPS
PAIRED = {
    "none": [[80, 60, 50, 40], [84, 62, 49, 43], [78, 57, 47, 38], [90, 66, 52, 45], [81, 59, 51, 41]],
    # better at every seed by 2–5 at the end, and all along
    "easy-to-hard": [[76, 55, 46, 37], [80, 58, 45, 38], [75, 52, 44, 36], [85, 61, 49, 40], [79, 55, 47, 39]],
    # worse at some seeds, better at others
    "hard-to-easy": [[82, 61, 50, 42], [83, 61, 48, 41], [79, 58, 48, 40], [88, 65, 50, 43], [82, 60, 52, 42]],
}


# order -> per seed 0..2, FIDs at STEPS: easy-to-hard reaches each seed's baseline final FID early,
# hard-to-easy never does at seeds 0 and 2 (censored at its last step)
TIMING = {
    "none": [[80, 60, 50, 40], [82, 62, 50, 42], [84, 64, 52, 44]],
    "easy-to-hard": [[60, 40, 35, 30], [70, 50, 42, 35], [60, 44, 40, 38]],
    "hard-to-easy": [[90, 70, 55, 45], [85, 60, 45, 41], [95, 80, 60, 50]],
}


@pytest.fixture(scope="module")
def quick(store):
    return report.report_for_experiment(store["uri"], "quick")


def test_reads_latest_search_sorted_by_best_fid_missing_last(quick, store):
    assert quick.parent_run_id == store["parent"]
    assert list(quick.table["trial"]) == ["e2h-n4", "rnd-n8", "e2h-n8", "base-s0", "base-s1", "h2e-n4",
                                          "e2h-n2", "fresh"]
    assert math.isnan(quick.table["best_fid"].iloc[-1])
    assert quick.best_trial == "e2h-n4" and quick.best_fid == 30.0
    assert list(quick.table["best"]) == [True] + [False] * 7
    row = quick.table.set_index("trial").loc["e2h-n4"]
    assert (row["best_step"], row["final_fid"], row["N"], row["seed"]) == (400, 30.0, 4, 0)
    assert quick.table.set_index("trial").loc["h2e-n4", "stage_or_tau"] == "τ=200"
    assert quick.table.set_index("trial").loc["rnd-n8", "stage_or_tau"] == "50"


def test_steps_to_baseline_final_fid(quick):
    assert quick.baselines[FEATURES].fid == pytest.approx(42.0)  # mean of 40 and 44
    steps = quick.table.set_index("trial")["steps_to_baseline"]
    got = {t: (None if s is None or s is pd.NA else int(s)) for t, s in steps.items()}
    assert got == {"e2h-n4": 200, "rnd-n8": 300, "e2h-n8": 200, "base-s0": 400, "base-s1": None,
                   "h2e-n4": None, "e2h-n2": None, "fresh": None}


def test_text_has_extractor_line_failure_reason_and_summary(quick):
    text = quick.text
    lines = text.splitlines()
    assert f"FID features: {FEATURES}" in lines[1]
    assert "WARNING" not in text
    failed = next(line for line in lines if " e2h-n2 " in line)
    assert "FAILED" in failed and "error: CUDA out of memory. Tried to allocate 2.00 GiB" in failed
    assert "x" * 100 not in failed  # the reason is truncated
    best = next(line for line in lines if " e2h-n4 " in line)
    assert best.lstrip().startswith("*")
    h2e = next(line for line in lines if " h2e-n4 " in line)
    assert "τ=200" in h2e and "—" in h2e  # never reaches the baseline
    assert "* best trial: e2h-n4, FID 30.00 at step 400" in text
    summary = quick.summary.set_index("arm")
    assert summary.loc["none", "n"] == 2
    assert summary.loc["none", "final_fid_mean"] == pytest.approx(42.0)
    assert summary.loc["none", "final_fid_std"] == pytest.approx(math.sqrt(8))
    # arms are curricula without the seed, named by the settings the search varies
    assert set(summary.index) == {"none", "easy-to-hard N=4 fixed 50 steps/stage", "easy-to-hard N=8 fixed 50 steps/stage",
                                  "easy-to-hard N=2 fixed 50 steps/stage", "hard-to-easy N=4 patience τ=200",
                                  "random N=8 fixed 50 steps/stage"}
    assert summary.loc["easy-to-hard N=2 fixed 50 steps/stage", "failed"] == 1
    assert summary.loc["easy-to-hard N=4 fixed 50 steps/stage", "n_pairs"] == 1  # one seed in common
    assert "42.00 ± 2.83" in text and "1 pair(s), too few to tell" in text


def test_paired_intervals_against_bounds_computed_here(store):
    """ΔFID per seed, its mean and a 95% percentile-bootstrap interval (scipy's, independent of
    the report's resampling), the same for the mean FID over training; verdicts in words."""
    import numpy as np
    from scipy.stats import bootstrap

    rep = report.report_for_experiment(store["uri"], "paired")
    summary = rep.summary.set_index("arm")
    base = np.array(PAIRED["none"], dtype=float)
    steps = np.array(STEPS, dtype=float)

    def over_training(h):
        return np.trapezoid(h, steps, axis=-1) / (steps[-1] - steps[0])

    for arm in ("easy-to-hard", "hard-to-easy"):
        mine = np.array(PAIRED[arm], dtype=float)
        for kind, delta in (("fid", mine[:, -1] - base[:, -1]), ("auc", over_training(mine) - over_training(base))):
            ci = bootstrap((delta,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                           random_state=np.random.default_rng(1)).confidence_interval
            row = summary.loc[arm]
            tolerance = 0.03 * (delta.max() - delta.min())  # Monte Carlo error of two different resamplings
            assert row["n_pairs"] == 5 and row["paired_seeds"] == "0;1;2;3;4"
            assert row[f"delta_{kind}_mean"] == pytest.approx(delta.mean())
            assert row[f"delta_{kind}_ci_low"] == pytest.approx(ci.low, abs=tolerance), (arm, kind)
            assert row[f"delta_{kind}_ci_high"] == pytest.approx(ci.high, abs=tolerance), (arm, kind)
    assert summary.loc["easy-to-hard", "verdict"] == "better than the baseline"
    assert summary.loc["hard-to-easy", "verdict"] == "indistinguishable from the baseline"
    assert summary.loc["random", "n_pairs"] == 0  # stopped at step 200: not paired with 400-step baselines
    # a none arm with another timestep distribution is an arm of its own, paired with the uniform none
    assert summary.loc["none", "final_fid_mean"] == pytest.approx(base[:, -1].mean())
    assert summary.loc["none logit-normal timesteps", "n_pairs"] == 5
    assert summary.loc["none logit-normal timesteps", "delta_fid_mean"] == pytest.approx(-1.0)
    # min-SNR weighting with order none is not the baseline: an arm paired against it
    assert summary.loc["none min-snr weighting", "n_pairs"] == 2
    assert summary.loc["none min-snr weighting", "delta_fid_mean"] == pytest.approx(2.0)
    assert summary.loc["none", "n"] == 5
    text = rep.text
    assert "easy-to-hard: better than the baseline at 95% — final FID -3.40 [" in text
    assert "hard-to-easy: indistinguishable from the baseline at 95%" in text
    assert "random: 0 pair(s), too few to tell" in text


def test_mixed_extractors_warn_and_name_no_overall_best(store):
    rep = report.report_for_parent(store["uri"], store["mixed_parent"])
    assert not rep.comparable and rep.best_trial is None
    text = rep.text
    assert "WARNING" in text and "NOT comparable" in text and FEATURES in text and INCEPTION in text
    # Ranked within each extractor group: the inception trial's lower number does not win.
    assert list(rep.table["trial"]) == ["cls-e2h", "cls-base", "inc-e2h"]
    assert list(rep.table["best"]) == [True, False, True]
    assert "features" in rep.summary.columns


def test_trains_without_a_search_are_reported(store):
    rep = report.report_for_experiment(store["uri"], "single")
    assert rep.parent_run_id is None and list(rep.table["trial"]) == ["single-20260101"]


def test_search_without_trials_yet(store, tmp_path):
    rep = report.report_for_experiment(store["uri"], "empty")
    assert rep.table.empty and rep.best_trial is None
    assert "(no trials yet)" in rep.text and "none yet" in rep.text
    assert [p.name for p in report.write_outputs(rep, tmp_path)] == list(study_report.FILES)


def test_out_writes_files(store, tmp_path, capsys):
    out = tmp_path / "out"
    run_report("quick", run_dir=str(store["run_dir"]), out=str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(study_report.FILES)  # no temp files left
    trials = pd.read_csv(out / "trials.csv")
    assert trials["trial"].iloc[0] == "e2h-n4" and "steps_to_baseline" in trials
    assert (out / "fid_by_order.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fid_by_clusters.png").stat().st_size > 10_000
    assert "wrote trials.csv" in capsys.readouterr().out


def test_log_to_parent(store):
    rep = report.log_to_parent(store["uri"], store["parent"])
    c = MlflowClient(store["uri"])
    names = {Path(a.path).name for a in c.list_artifacts(store["parent"], "report")}
    assert set(study_report.FILES) <= names
    tags = c.get_run(store["parent"]).data.tags
    assert tags["paceray.best_trial"] == rep.best_trial == "e2h-n4"
    assert float(tags["paceray.best_fid"]) == 30.0
    page = report.html_location(store["uri"], store["parent"])
    assert page.endswith("/report/report.html") and Path(page).is_file()


def test_missing_store_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PacerayError, match="no embedded MLflow store"):
        run_report("quick", run_dir=str(tmp_path))


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([PACERAY, "report", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_table(store):
    r = _cli("quick", "--run-dir", str(store["run_dir"]))
    assert r.returncode == 0, r.stderr
    assert f"FID features: {FEATURES}" in r.stdout
    assert "e2h-n4" in r.stdout and "best FID" in r.stdout and "→baseline" in r.stdout


def test_cli_unknown_experiment_is_one_line(store):
    r = _cli("nope", "--run-dir", str(store["run_dir"]))
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nope' not found" in lines[0] and "quick" in lines[0]


def _sections(page: str) -> list:
    return re.findall(r'<section id="([a-z]+)">', page)


def test_report_html_is_one_self_contained_page_with_every_section(store, tmp_path):
    rep = report.report_for_experiment(store["uri"], "paired")
    page = study_report.files(rep)  # the writers; report.html among them
    out = tmp_path / "report.html"
    page["report.html"](out)
    text = out.read_text()
    assert _sections(text) == ["summary", "arms", "curves", "schedules", "samples", "importance", "trials"]
    # self-contained: every image inline, nothing fetched or linked
    assert re.findall(r'src="([a-z]+):', text) and set(re.findall(r'src="([a-z]+):', text)) == {"data"}
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert FEATURES in text  # the extractor and the sample count
    assert "better than the baseline at 95%" in text and "[-4.60, -2.20]" in text  # the paired interval
    assert "Best trial:</b> easy-to-hard-s2" in text
    # the arm's curriculum and its last sample grid (step 400 of two), side by side with the others
    assert "every timestep from step 151" in text and "stages lasted 50, 50, 50 steps" in text
    assert "easy-to-hard-s0, seed 0, step 400" in text and "no sample grid logged" in text
    # 21 finished trials: the searched parameter's importance (one parameter: all of it)
    importance = text[text.index('<section id="importance">'):text.index('<section id="trials">')]
    assert "fANOVA" in importance and "curriculum.order" in importance and "1.0" in importance


def test_report_html_has_no_importance_below_eight_finished_trials(quick, tmp_path):
    out = tmp_path / "report.html"
    study_report.files(quick)["report.html"](out)
    text = out.read_text()
    assert _sections(text)[-2:] == ["importance", "trials"]
    assert "fANOVA" not in text and "at least 8 finished trials" in text


def test_a_schedule_plot_that_fails_does_not_fail_the_finished_trial(monkeypatch, capsys):
    """The five-kills test once failed a trial that had trained to its end on the plot alone."""
    from trainables.denoiser import reporting

    class Run:
        logged, closed = [], False

        def log_dict(self, data, name):
            self.logged.append(name)

        def log_figure(self, fig, name):
            self.logged.append(name)

        def close(self):
            Run.closed = True

    def broken(history, sampler):
        raise ValueError("'x' has size 9, but 'y2' has an unequal size of 10")

    monkeypatch.setattr(reporting, "schedule_figure", broken)
    monkeypatch.setattr(reporting, "schedule_json", lambda sampler: {})
    log = object.__new__(reporting.TrialLog)
    log.run, log.trial, log.sampler, log.console = Run(), "t1", None, False
    log.finish()
    assert Run.logged == ["curriculum/schedule.json"] and Run.closed
    assert "[t1] warning: curriculum/schedule.png skipped: ValueError: 'x' has size 9" in capsys.readouterr().err


def _first_step(fids, target):
    """The first of STEPS whose FID is at or below `target`, or None: computed here, apart from the report."""
    return next((step for step, f in zip(STEPS, fids) if f <= target), None)


@pytest.mark.parametrize("target", [None, 50.0])
def test_steps_to_target_ratios_against_values_computed_here(store, target):
    """Per seed, the first eval step at or below the target (each seed's baseline final FID, or
    `--target`), over the baseline's own; per arm the geometric mean of the ratios and a 95%
    percentile-bootstrap interval of their logs (scipy's, independent of the report's). An arm
    that never reaches it counts at its last step, and the report says '≥' with how many seeds."""
    from scipy.stats import bootstrap

    rep = report.report_for_experiment(store["uri"], "timing", target)
    summary = rep.summary.set_index("arm")
    for arm in ("easy-to-hard", "hard-to-easy"):
        logs, censored = [], 0
        for base, mine in zip(TIMING["none"], TIMING[arm]):
            goal = base[-1] if target is None else target
            reached = _first_step(mine, goal)
            censored += reached is None
            logs.append(np.log((reached or STEPS[-1]) / _first_step(base, goal)))
        logs = np.array(logs)
        row = summary.loc[arm]
        assert row["steps_ratio_pairs"] == 3 and row["steps_ratio_censored"] == censored
        assert row["steps_ratio"] == pytest.approx(np.exp(logs.mean()))
        if logs.max() > logs.min():
            ci = bootstrap((logs,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                           random_state=np.random.default_rng(1)).confidence_interval
            tolerance = 0.03 * (logs.max() - logs.min())
            assert np.log(row["steps_ratio_ci_low"]) == pytest.approx(ci.low, abs=tolerance)
            assert np.log(row["steps_ratio_ci_high"]) == pytest.approx(ci.high, abs=tolerance)
    text = rep.text
    if target is None:
        assert summary.loc["easy-to-hard", "steps_ratio"] == pytest.approx((0.5 * 0.75 * 0.5) ** (1 / 3))
        assert "≥1.00× [≥1.00, ≥1.00], 2 of 3 never reached it" in text  # hard-to-easy, censored at 0 and 2
        assert "at or below its seed's baseline final FID" in text
    else:
        assert summary.loc["hard-to-easy", "steps_ratio_censored"] == 0
        assert "at or below FID 50 (--target)" in text
    trials = rep.table.set_index("trial")
    assert bool(trials.loc["hard-to-easy-s0", "target_censored"]) is (target is None)
    assert trials.loc["hard-to-easy-s0", "target_steps"] == 400  # reached at its last step, or counted there


def test_a_target_the_baseline_never_reaches_pairs_nothing(store):
    rep = report.report_for_experiment(store["uri"], "timing", 10.0)
    summary = rep.summary.set_index("arm")
    assert summary.loc["easy-to-hard", "steps_ratio_pairs"] == 0 and math.isnan(summary.loc["easy-to-hard", "steps_ratio"])


def test_report_target_from_the_cli_and_its_plot(store, tmp_path, capsys):
    run_report("timing", tracking_uri=store["uri"], out=str(tmp_path / "out"), target=50.0)
    out = capsys.readouterr().out
    assert "steps to target ÷ baseline's [95%]" in out and "FID 50 (--target)" in out
    assert (tmp_path / "out" / "fid_by_order.png").stat().st_size > 0 and (tmp_path / "out" / "summary.csv").exists()
    assert "steps_ratio" in pd.read_csv(tmp_path / "out" / "summary.csv").columns
    with pytest.raises(PacerayError, match="--target: a finite value"):
        run_report("timing", tracking_uri=store["uri"], target=float("nan"))


def test_log_axes_label_their_ticks_plainly():
    """10, 20, 50 on a log axis, never 2×10^1."""
    from matplotlib.figure import Figure

    from paceray.protocol import html_report

    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [6, 60, 300])
    html_report.plain_log_scale(ax, "y")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    lo, hi = ax.get_ylim()
    shown = [float(x) for x in labels if lo <= float(x) <= hi]
    assert {10.0, 20.0, 50.0, 100.0, 200.0} <= set(shown), labels
    assert all(re.fullmatch(r"[0-9.]+", x) for x in labels), labels
    assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
