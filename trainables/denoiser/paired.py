"""Paired comparisons of curriculum arms against the baseline arm, seed by seed.

Two trials of one seed share their initial weights, data order and FID sampling noise, so the
difference of their FIDs carries far less noise than either FID: the report compares arms by the
mean of these per-seed differences, with a percentile-bootstrap interval over the pairs (10,000
resamples, seed 0). Negative = better than the baseline.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def bootstrap_mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval at LEVEL
    (NaN bounds for fewer than two values: one pair says nothing about the spread)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = x[rng.integers(0, len(x), size=(RESAMPLES, len(x)))].mean(axis=1)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def mean_over_training(history: pd.Series, steps: Sequence[int]) -> float:
    """The FID averaged over training: trapezoid over `steps` divided by their span."""
    if len(steps) < 2:
        return math.nan
    values = history.loc[list(steps)].to_numpy(dtype=float)
    return float(np.trapezoid(values, np.asarray(steps, dtype=float)) / (steps[-1] - steps[0]))


def verdict(n_pairs: int, low: float, high: float) -> str:
    if n_pairs < 2 or not (math.isfinite(low) and math.isfinite(high)):
        return "too few pairs to tell"
    if high < 0:
        return "better than the baseline"
    if low > 0:
        return "worse than the baseline"
    return "indistinguishable from the baseline"


def _by_seed(trials: pd.DataFrame) -> dict:
    return {int(seed): sub for seed, sub in trials.groupby("seed")}


def compare(arm: pd.DataFrame, baseline: pd.DataFrame, histories: dict) -> dict:
    """The paired statistics of one arm's trials against the baseline's, both already limited to
    finished trials of one feature group. A pair is one seed present in both with the same final
    step (trials stopped early are not paired with full-length ones)."""
    fid_deltas, auc_deltas, seeds = [], [], []
    base = _by_seed(baseline)
    for seed, mine in _by_seed(arm).items():
        theirs = base.get(seed)
        if theirs is None:
            continue
        theirs = theirs[theirs["final_step"].isin(mine["final_step"])]
        if theirs.empty:
            continue
        seeds.append(seed)
        fid_deltas.append(float(mine["final_fid"].mean()) - float(theirs["final_fid"].mean()))
        hists = [histories[r] for r in [*mine["run_id"], *theirs["run_id"]]]
        shared = sorted(set.intersection(*(set(h.index) for h in hists)))
        mean_mine = np.mean([mean_over_training(histories[r], shared) for r in mine["run_id"]])
        mean_theirs = np.mean([mean_over_training(histories[r], shared) for r in theirs["run_id"]])
        auc_deltas.append(float(mean_mine - mean_theirs))
    fid = bootstrap_mean_ci(fid_deltas)
    auc = bootstrap_mean_ci([d for d in auc_deltas if math.isfinite(d)])
    return {"n_pairs": len(seeds), "paired_seeds": ";".join(map(str, sorted(seeds))),
            "delta_fid_mean": fid[0], "delta_fid_ci_low": fid[1], "delta_fid_ci_high": fid[2],
            "delta_auc_mean": auc[0], "delta_auc_ci_low": auc[1], "delta_auc_ci_high": auc[2],
            "verdict": verdict(len(seeds), fid[1], fid[2])}


def steps_ratio(arm: pd.DataFrame, baseline: pd.DataFrame) -> dict:
    """How many steps an arm takes to reach the target, over how many the baseline takes, seed by
    seed (the columns `target_steps` and `target_censored` of both, one feature group, finished
    trials): the geometric mean of the per-seed ratios with a percentile-bootstrap interval (on
    their logs, as for ΔFID). An arm that never reached the target counts at its last step: its
    ratio is a lower bound (`steps_ratio_censored` seeds). A seed whose baseline never reached it
    (a `--target` below the baseline's) has no ratio."""
    logs, censored = [], 0
    base = _by_seed(baseline)
    for seed, mine in _by_seed(arm).items():
        theirs = base.get(seed)
        if theirs is None:
            continue
        theirs = theirs[theirs["final_step"].isin(mine["final_step"]) & ~theirs["target_censored"].astype(bool)]
        mine = mine[mine["target_steps"].notna()]
        if theirs.empty or mine.empty or theirs["target_steps"].isna().all():
            continue
        ratio = float(mine["target_steps"].astype(float).mean()) / float(theirs["target_steps"].astype(float).mean())
        logs.append(math.log(ratio))
        censored += int(mine["target_censored"].astype(bool).any())
    mean, low, high = bootstrap_mean_ci(logs)
    return {"steps_ratio_pairs": len(logs), "steps_ratio": math.exp(mean) if logs else math.nan,
            "steps_ratio_ci_low": math.exp(low) if math.isfinite(low) else math.nan,
            "steps_ratio_ci_high": math.exp(high) if math.isfinite(high) else math.nan,
            "steps_ratio_censored": censored}


RATIO_EMPTY = {"steps_ratio_pairs": 0, "steps_ratio": math.nan, "steps_ratio_ci_low": math.nan,
               "steps_ratio_ci_high": math.nan, "steps_ratio_censored": 0}

EMPTY = {"n_pairs": 0, "paired_seeds": "", "delta_fid_mean": math.nan, "delta_fid_ci_low": math.nan,
         "delta_fid_ci_high": math.nan, "delta_auc_mean": math.nan, "delta_auc_ci_low": math.nan,
         "delta_auc_ci_high": math.nan, "verdict": None}
COLUMNS = list(EMPTY)


def steps_to_baseline(trials: pd.DataFrame) -> Optional[str]:
    """Per seed, the first eval step at or below the baseline's final FID ('—' never), in seed order."""
    rows = trials.sort_values("seed")
    if rows.empty:
        return None
    return ", ".join("—" if v is None or v is pd.NA else str(int(v)) for v in rows["steps_to_baseline"])
