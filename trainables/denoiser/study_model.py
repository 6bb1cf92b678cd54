"""The denoiser's curriculum comparison read back from MLflow, as data and text: the trial table
sorted by best FID, the per-arm summary (order -> final FID over seeds), steps-to-baseline, and
the tags of the search's parent run. Its files (tables, plots, report.html) are study_report's,
which builds it as the report hook (`Trainable.report`, with paceray's `SearchRuns`).

FIDs measured with different feature extractors or sample counts are different quantities.
Trials are grouped by their `paceray.fid_features` tag; when there is more than one group the
report says so loudly, ranks and compares against the baseline only within a group, and names
no overall best trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd

from paceray.protocol import ARM_TAG, BEST_TRIAL_TAG, ERROR_TAG, TRIAL_TAG, one_line
from trainables.denoiser.search_hooks import drawn_parts

FID_METRIC = "eval/fid"
KID_METRIC = "eval/kid"
FEATURES_TAG = "paceray.fid_features"
UNKNOWN_FEATURES = "unknown (trial has FIDs but no paceray.fid_features tag)"
ORDERS = ("none", "easy-to-hard", "hard-to-easy", "random", "shuffled", "measured")
BASELINE_ARM = "none"  # order none, t and weighting uniform: what every other arm is paired against
ENDED_BADLY = ("FAILED", "KILLED")
FILES = ("trials.csv", "summary.csv", "fid_by_order.png", "fid_by_clusters.png", "report.html")
DASH = "—"
COLUMNS = ["trial", "status", "order", "N", "clustering", "pacing", "stage_or_tau", "cumulative", "distribution",
           "weighting", "arm_tag", "seed",
           "best_fid", "best_step", "final_fid", "final_step", "steps_to_baseline", "target", "target_steps",
           "target_censored", "features", "error", "run_id"]


@dataclass(frozen=True)
class Baseline:
    fid: float  # mean final FID of the order=none trials (seeds) in one feature group
    n: int
    provisional: bool  # no baseline has finished yet: the mean is over running ones


@dataclass
class Report:
    experiment: str
    source: str  # what the trials were read from, for the header
    parent_run_id: Optional[str]
    table: pd.DataFrame  # one row per trial, sorted (grouped by features, then best FID)
    summary: pd.DataFrame  # per arm: order -> final FID mean/std over seeds
    histories: dict  # run id -> pd.Series of eval/fid indexed by step
    feature_groups: list  # the distinct `paceray.fid_features` values, first = F1
    baselines: dict  # feature group -> Baseline
    best_trial: Optional[str]  # None when FIDs are not comparable across trials
    best_fid: Optional[float]
    search: object = None  # the SearchRuns it was built from (KID histories, artifacts for report.html)
    user_target: Optional[float] = None  # `paceray report --target`: else each seed's baseline final FID
    # file name -> writer(path), given the report: study_report's (tables, plots, report.html)
    file_writers: Optional[Callable[["Report"], dict]] = None

    @property
    def comparable(self) -> bool:
        return len(self.feature_groups) <= 1

    def group_label(self, features) -> str:
        """F1, F2, ... for the feature groups of a mixed report."""
        return f"F{self.feature_groups.index(features) + 1}" if features in self.feature_groups else DASH

    @property
    def text(self) -> str:
        return render(self)

    def files(self) -> dict:
        return self.file_writers(self) if self.file_writers is not None else {}

    def parent_tags(self) -> dict:
        return parent_tags(self)


# ---------------------------------------------------------------- the table

def finite_mask(values: pd.Series) -> pd.Series:
    # bool dtype even when empty: an empty object Series used as a mask would select columns
    return pd.to_numeric(values, errors="coerce").map(math.isfinite).astype(bool)


def _int(value) -> Optional[int]:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def steps_to_reach(history: pd.Series, threshold: float) -> Optional[int]:
    """The first eval step whose FID is at or below `threshold` (None if never)."""
    hit = history[history <= threshold * (1 + 1e-12)]
    return int(hit.index[0]) if len(hit) else None


def _row(run, history: pd.Series) -> dict:
    p, tags = run.data.params, run.data.tags
    finite = history[finite_mask(history)]
    pacing = p.get("curriculum.pacing")
    stage = {"fixed": p.get("curriculum.stage_steps"), "patience": f"τ={p.get('curriculum.patience')}"}.get(pacing)
    return {
        "trial": tags.get(TRIAL_TAG) or run.info.run_name or run.info.run_id,
        "status": run.info.status,
        "order": p.get("curriculum.order"),
        "N": _int(p.get("curriculum.num_clusters")),
        "clustering": p.get("curriculum.clustering"),
        "pacing": pacing,
        "stage_or_tau": stage,
        "cumulative": p.get("curriculum.cumulative"),
        "distribution": p.get("curriculum.distribution", "uniform"),  # runs from before it existed: uniform
        "weighting": p.get("loss.weighting", "uniform"),
        "arm_tag": tags.get(ARM_TAG),  # the arm as its search labelled it (search_hooks.arm_label)
        "seed": _int(p.get("train.seed")),
        "best_fid": finite.min() if len(finite) else math.nan,
        "best_step": int(finite.idxmin()) if len(finite) else None,
        "final_fid": history.iloc[-1] if len(history) else math.nan,
        "final_step": int(history.index[-1]) if len(history) else None,
        "steps_to_baseline": None,
        "target": math.nan,
        "target_steps": None,
        "target_censored": False,
        "features": tags.get(FEATURES_TAG) or (UNKNOWN_FEATURES if len(finite) else None),
        "error": one_line(tags[ERROR_TAG]) if tags.get(ERROR_TAG) else None,
        "run_id": run.info.run_id,
    }


def _time_to_target(table: pd.DataFrame, histories: dict, user_target: Optional[float]) -> None:
    """Per trial, the FID it is timed to reach (`user_target`, or the final FID of its seed's
    baseline trials in its feature group: the mean if a seed has several), the first eval step at
    or below it, and whether it never got there (then counted at its last step: censored)."""
    base = table[(table["arm"] == BASELINE_ARM) & ~table["status"].isin(ENDED_BADLY) & finite_mask(table["final_fid"])]
    per_seed = base.groupby(["features", "seed"])["final_fid"].mean().to_dict()
    targets, steps, censored = [], [], []
    for _, row in table.iterrows():
        history = histories[row["run_id"]]
        target = user_target if user_target is not None else per_seed.get((row["features"], row["seed"]), math.nan)
        reached = steps_to_reach(history, target) if math.isfinite(target) and len(history) else None
        targets.append(target)
        steps.append(reached if reached is not None else row["final_step"] if math.isfinite(target) else None)
        censored.append(reached is None and math.isfinite(target) and row["final_step"] is not None)
    table["target"], table["target_steps"], table["target_censored"] = targets, steps, censored


def _baselines(table: pd.DataFrame) -> dict:
    out = {}
    for group, sub in table[table["arm"] == BASELINE_ARM].groupby("features"):
        usable = sub[finite_mask(sub["final_fid"])]
        finished = usable[usable["status"] == "FINISHED"]
        provisional = finished.empty
        chosen = usable[~usable["status"].isin(ENDED_BADLY)] if provisional else finished
        if not chosen.empty:
            out[group] = Baseline(float(chosen["final_fid"].mean()), len(chosen), provisional)
    return out


ARM_FIELDS = ("N", "clustering", "pacing", "stage_or_tau", "cumulative")


def _arm_part(field: str, value) -> str:
    if field == "N":
        return f"N={value}"
    if field == "stage_or_tau":
        return str(value) if str(value).startswith("τ") else f"{value} steps/stage"
    if field == "cumulative":
        return "cumulative" if str(value).lower() == "true" else "exclusive"
    return str(value)


def arm_labels(table: pd.DataFrame) -> list:
    """Each trial's arm: the `paceray.arm` tag its search gave it (search_hooks.arm_label), or for
    a run without one, its curriculum without the seed: `none` is one arm whatever its other
    settings (they mean nothing to it), one per timestep distribution and loss weighting (`none`
    with both uniform is the baseline); other arms name the settings that vary among the runs,
    and a distribution or weighting other than uniform."""
    untagged = table[table["arm_tag"].isna()]
    curriculum = untagged[untagged["order"] != "none"]
    varying = [f for f in ARM_FIELDS if curriculum[f].astype(str).nunique() > 1]

    def label(row) -> str:
        if isinstance(row["arm_tag"], str) and row["arm_tag"]:
            return row["arm_tag"]
        drawn = drawn_parts(row["distribution"], row["weighting"])
        if row["order"] == "none":
            return " ".join([BASELINE_ARM, *drawn])
        return " ".join([str(row["order"]), *(_arm_part(f, row[f]) for f in varying), *drawn])

    return [label(row) for _, row in table.iterrows()]


def _summary(table: pd.DataFrame, histories: dict, by_features: bool) -> pd.DataFrame:
    from trainables.denoiser import paired

    keys = ["features", "arm"] if by_features else ["arm"]
    finished = table[(table["status"] == "FINISHED") & finite_mask(table["final_fid"])]
    rows = []
    for key, sub in table.groupby(keys, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        counted = sub[~sub["status"].isin(ENDED_BADLY) & finite_mask(sub["final_fid"])]
        fids = counted["final_fid"]
        row = {**dict(zip(keys, key)), "order": sub["order"].iloc[0], "n": len(fids),
               "final_fid_mean": fids.mean() if len(fids) else math.nan,
               "final_fid_std": fids.std(ddof=1) if len(fids) > 1 else math.nan,
               "best_fid_mean": counted["best_fid"].mean() if len(fids) else math.nan,
               "failed": int(sub["status"].isin(ENDED_BADLY).sum()),
               "steps_to_baseline": paired.steps_to_baseline(counted), **paired.EMPTY, **paired.RATIO_EMPTY}
        group = finished[finished["features"] == sub["features"].iloc[0]] if by_features else finished
        if row["arm"] == BASELINE_ARM:
            row["verdict"] = "the baseline"
        else:
            mine, theirs = group[group["arm"] == row["arm"]], group[group["arm"] == BASELINE_ARM]
            row.update(paired.compare(mine, theirs, histories))
            row.update(paired.steps_ratio(mine, theirs))
        rows.append(row)
    columns = keys + ["order", "n", "final_fid_mean", "final_fid_std", "best_fid_mean", "failed",
                      "steps_to_baseline", *paired.COLUMNS, *paired.RATIO_EMPTY]
    summary = pd.DataFrame(rows, columns=columns)
    rank = {o: i for i, o in enumerate(ORDERS)}
    summary["_rank"] = summary["order"].map(lambda o: rank.get(o, len(ORDERS)))
    return summary.sort_values(keys[:-1] + ["_rank", "arm"]).drop(columns="_rank").reset_index(drop=True)


def build(search, file_writers: Optional[Callable[[Report], dict]] = None) -> Report:
    """The report of `search` (paceray.protocol.report_hook.SearchRuns): its runs' FID histories and params."""
    experiment, source, parent_run_id = search.experiment, search.source, search.parent_run_id
    histories, rows = {}, []
    for run in search.runs:
        history = search.history(run.info.run_id, FID_METRIC)
        row = _row(run, history)
        histories[run.info.run_id] = history
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table[["best_fid", "final_fid"]] = table[["best_fid", "final_fid"]].astype(float)
    groups = list(dict.fromkeys(g for g in table["features"] if isinstance(g, str)))
    table["arm"] = arm_labels(table)
    baselines = _baselines(table)
    table["steps_to_baseline"] = [
        steps_to_reach(histories[t], baselines[g].fid) if g in baselines else None
        for t, g in zip(table["run_id"], table["features"])]
    user_target = getattr(search, "target", None)
    _time_to_target(table, histories, user_target)
    for col in ("N", "seed", "best_step", "final_step", "steps_to_baseline", "target_steps"):
        table[col] = table[col].astype("Int64")
    table["group"] = table["features"].map(lambda g: groups.index(g) if g in groups else len(groups))
    table = table.sort_values(["group", "best_fid", "trial"], na_position="last").reset_index(drop=True)
    # The best trial of each feature group; one overall best only when all FIDs are comparable.
    ranked = table[finite_mask(table["best_fid"])]
    table["best"] = table.index.isin(ranked.groupby("group").head(1).index)
    table = table.drop(columns="group")
    best_trial = best_fid = None
    if len(groups) <= 1 and not ranked.empty:
        best_trial, best_fid = str(ranked.iloc[0]["trial"]), float(ranked.iloc[0]["best_fid"])
    return Report(experiment, source, parent_run_id, table, _summary(table, histories, len(groups) > 1), histories,
                  groups, baselines, best_trial, best_fid, search, user_target, file_writers)


# ---------------------------------------------------------------- text

def _fmt(x, digits: int = 2) -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def feature_lines(rep: Report) -> list:
    counts = rep.table["features"].value_counts()
    if not rep.feature_groups:
        return ["FID features: none yet (no trial has logged eval/fid)"]
    if rep.comparable:
        return [f"FID features: {rep.feature_groups[0]} (all {counts.iloc[0]} trials with FIDs)"]
    lines = [f"!!! WARNING: these FIDs come from {len(rep.feature_groups)} DIFFERENT feature extractors / sample "
             f"counts and are NOT comparable across groups:"]
    lines += [f"!!!   F{i + 1}: {g} ({counts.get(g, 0)} trials)" for i, g in enumerate(rep.feature_groups)]
    lines.append("!!! Rows are grouped by extractor; best trial and steps-to-baseline are per group; no overall best.")
    return lines


def _target_line(rep: Report) -> str:
    target = (f"FID {rep.user_target:g} (--target)" if rep.user_target is not None
              else "its seed's baseline final FID")
    return (f"steps to target: per seed, the first eval step at or below {target}, over the baseline's own; "
            f"geometric mean over seeds, 95% percentile bootstrap; '≥': some seeds never reached it "
            f"(counted at their last step)")


def _baseline_lines(rep: Report) -> list:
    if not rep.baselines:
        return ["baseline: no order=none trial with a FID yet, so no steps-to-baseline"]
    lines = [_target_line(rep)]
    for i, g in enumerate(rep.feature_groups):
        b = rep.baselines.get(g)
        if b is None:
            continue
        where = f" (F{i + 1})" if not rep.comparable else ""
        note = ", provisional: no baseline has finished" if b.provisional else ""
        lines.append(f"baseline{where}: final FID {b.fid:.2f}, mean of {b.n} order=none trial(s){note}; "
                     f"'→baseline' = first eval step at or below it")
    return lines


def display_table(rep: Report) -> pd.DataFrame:
    t = rep.table
    curriculum_off = t["order"] == "none"  # clusters and pacing mean nothing to the uniform baseline

    def cur(col):
        return [DASH if off else _fmt(v) for v, off in zip(t[col], curriculum_off)]

    shown = pd.DataFrame({
        "trial": [f"{'*' if b else ' '} {name}" for b, name in zip(t["best"], t["trial"])],
        "status": t["status"], "order": t["order"].map(_fmt),
        "N": cur("N"), "clustering": cur("clustering"), "pacing": cur("pacing"), "stage/τ": cur("stage_or_tau"),
        "cumul.": cur("cumulative"), "seed": t["seed"].map(_fmt),
        "best FID": t["best_fid"].map(_fmt), "@step": t["best_step"].map(_fmt),
        "final FID": t["final_fid"].map(_fmt), "→baseline": t["steps_to_baseline"].map(_fmt),
    })
    if not rep.comparable:
        shown.insert(2, "FID", t["features"].map(rep.group_label))
    notes = [f"error: {e[:70]}{'…' if len(e) > 70 else ''}" if isinstance(e, str) else "" for e in t["error"]]
    if any(notes):
        shown["note"] = notes
    return shown


def _interval(mean, low, high) -> str:
    if not (isinstance(mean, float) and math.isfinite(mean)):
        return DASH
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _ratio(arm, ratio, low, high, censored, pairs) -> str:
    """'0.80× [0.62, 1.05]'; '≥1.20× [1.10, 1.40], 2 of 5 never reached it' when some seeds'
    steps are lower bounds (the whole mean and interval are then lower bounds too)."""
    if arm == BASELINE_ARM or not (isinstance(ratio, float) and math.isfinite(ratio)):
        return DASH
    bound = "≥" if censored else ""
    text = f"{bound}{ratio:.2f}×"
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{bound}{low:.2f}, {bound}{high:.2f}]"
    return text + (f", {censored} of {pairs} never reached it" if censored else "")


def display_summary(rep: Report) -> pd.DataFrame:
    s = rep.summary
    out = pd.DataFrame({"arm": s["arm"].map(_fmt), "n": s["n"],
                        "final FID mean ± std": [f"{_fmt(m)} ± {_fmt(d)}" if n > 1 else _fmt(m)
                                                 for m, d, n in zip(s["final_fid_mean"], s["final_fid_std"], s["n"])],
                        "best FID mean": s["best_fid_mean"].map(_fmt),
                        "pairs": [DASH if a == BASELINE_ARM else str(n) for a, n in zip(s["arm"], s["n_pairs"])],
                        "ΔFID final [95%]": [_interval(*v) for v in zip(s["delta_fid_mean"], s["delta_fid_ci_low"],
                                                                           s["delta_fid_ci_high"])],
                        "ΔFID over training [95%]": [_interval(*v) for v in zip(s["delta_auc_mean"],
                                                                                  s["delta_auc_ci_low"],
                                                                                  s["delta_auc_ci_high"])],
                        "steps to target ÷ baseline's [95%]": [_ratio(*v) for v in zip(
                            s["arm"], s["steps_ratio"], s["steps_ratio_ci_low"], s["steps_ratio_ci_high"],
                            s["steps_ratio_censored"], s["steps_ratio_pairs"])],
                        "→baseline by seed": s["steps_to_baseline"].map(_fmt),
                        "failed": s["failed"]})
    if "features" in s:
        out.insert(0, "FID", s["features"].map(rep.group_label))
    return out


def _left_aligned(frame: pd.DataFrame, columns) -> str:
    """`to_string` with text columns flush left (headers included: padded names stay put)."""
    widths = {c: max(frame[c].map(len).max(), len(c)) for c in columns if c in frame}
    frame = frame.assign(**{c: frame[c].map(lambda v, w=w: f"{v:<{w}}") for c, w in widths.items()})
    return frame.rename(columns={c: c.ljust(w) for c, w in widths.items()}).to_string(index=False)


def render(rep: Report) -> str:
    status = rep.table["status"].value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in status.items())
    lines = [f"paceray report {rep.experiment}: {rep.source}; {len(rep.table)} trials ({counts or 'none yet'})"]
    lines += feature_lines(rep) + _baseline_lines(rep) + [""]
    if rep.table.empty:
        return "\n".join(lines + ["(no trials yet)"])
    lines += [line.rstrip() for line in _left_aligned(display_table(rep), ("trial", "note")).splitlines()]
    lines.append("")
    if rep.best_trial is not None:
        row = rep.table[rep.table["trial"] == rep.best_trial].iloc[0]
        lines.append(f"* best trial: {rep.best_trial}, FID {rep.best_fid:.2f} at step {row['best_step']} "
                     f"(order={_fmt(row['order'])}, N={_fmt(row['N'])})")
    elif not rep.comparable:
        lines.append("* best trial of each FID group (not comparable across groups)")
    lines += ["", "per arm (final FID over seeds; failed trials not counted):",
              _left_aligned(display_summary(rep), ("arm",))]
    lines += verdict_lines(rep)
    return "\n".join(lines)


def verdict_lines(rep: Report) -> list:
    """In words, each arm against the baseline, from the paired intervals."""
    s = rep.summary[rep.summary["arm"] != BASELINE_ARM]
    if s.empty or not (rep.summary["arm"] == BASELINE_ARM).any():
        return []
    lines = ["", "paired by seed against order=none (Δ = arm − baseline, negative = better; "
                 "95% percentile bootstrap over the pairs, 10,000 resamples; finished trials of equal length):"]
    for _, row in s.iterrows():
        where = f"[{rep.group_label(row['features'])}] " if "features" in s and not rep.comparable else ""
        if row["n_pairs"] < 2:
            lines.append(f"  {where}{row['arm']}: {row['n_pairs']} pair(s), too few to tell")
            continue
        lines.append(f"  {where}{row['arm']}: {row['verdict']} at 95% — final FID "
                     f"{_interval(row['delta_fid_mean'], row['delta_fid_ci_low'], row['delta_fid_ci_high'])}, "
                     f"mean FID over training "
                     f"{_interval(row['delta_auc_mean'], row['delta_auc_ci_low'], row['delta_auc_ci_high'])}"
                     f"{_steps_clause(row)} ({row['n_pairs']} seeds: {row['paired_seeds']})")
    return lines


def _steps_clause(row) -> str:
    ratio = _ratio(row["arm"], row["steps_ratio"], row["steps_ratio_ci_low"], row["steps_ratio_ci_high"],
                   row["steps_ratio_censored"], row["steps_ratio_pairs"])
    return "" if ratio == DASH else f", steps to target {ratio} the baseline's"


# ---------------------------------------------------------------- the parent run

def parent_tags(rep: Report) -> dict:
    """The best trial and its FID, or a warning when FIDs are not comparable."""
    tags = {}
    if rep.best_trial is not None:
        tags.update({BEST_TRIAL_TAG: rep.best_trial, "paceray.best_fid": f"{rep.best_fid:.6g}"})
    if not rep.comparable:
        tags["paceray.report_warning"] = (f"trials used {len(rep.feature_groups)} different FID feature extractors: "
                                          f"not comparable")
    return tags
