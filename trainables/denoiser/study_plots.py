"""FID-vs-step plots of a curriculum comparison (`study_report.Report`): by arm (the mean over
seeds with a ±std band where an arm has two or more finished seeds, single trials as lines) or
one line per trial coloured by cluster count, the baseline's final FID as a reference line,
the feature extractor in the title (in red when trials used different ones)."""

from __future__ import annotations

import pandas as pd

from trainables.denoiser.study_report import ENDED_BADLY, ORDERS, Report, _finite

ORDER_COLORS = {"none": "#4d4d4d", "easy-to-hard": "#1f77b4", "hard-to-easy": "#d62728", "random": "#2ca02c",
                "shuffled": "#9467bd", "measured": "#ff7f0e"}


def _short_features(rep: Report) -> str:
    if not rep.feature_groups:
        return "no FIDs yet"
    if rep.comparable:
        return f"FID: {rep.feature_groups[0]}"
    return "MIXED FID EXTRACTORS: curves of different line styles are NOT comparable"


def plot_fid(rep: Report, by: str, histories: dict | None = None, metric: str = "FID (eval/fid)"):
    """FID vs step (or another metric's `histories`, e.g. KID), coloured by `by` ("order": by
    arm, with bands; or "N")."""
    own = histories is None
    histories = rep.histories if own else histories
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t = rep.table
    if by == "order":
        orders = dict(zip(t["arm"], t["order"]))
        rank = {o: i for i, o in enumerate(ORDERS)}
        keys = sorted(orders, key=lambda a: (rank.get(orders[a], len(ORDERS)), str(a)))
        extra = colormaps["tab10"]
        colors, used = {}, set()
        for i, k in enumerate(keys):  # an order's colour for its first arm, then distinct ones
            colour = ORDER_COLORS.get(orders[k])
            colors[k] = colour if colour and colour not in used else extra((i + 3) % 10)
            used.add(colors[k])
        key_of, label_of = (lambda row: row["arm"]), (lambda k: str(k))
    else:
        ns = sorted({int(n) for n, o in zip(t["N"], t["order"]) if o != "none" and n is not pd.NA})
        cmap = colormaps["viridis"]
        colors = {n: cmap(0.9 * i / max(len(ns) - 1, 1)) for i, n in enumerate(ns)}
        colors["baseline"] = ORDER_COLORS["none"]
        keys = ns + ["baseline"]
        key_of = lambda row: "baseline" if row["order"] == "none" else (None if row["N"] is pd.NA else int(row["N"]))
        label_of = lambda k: "baseline (order=none)" if k == "baseline" else f"N={k}"
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(9.5, 5.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    counts: dict = {}
    dashed_baseline = by == "N" and rep.comparable
    banded = _arm_bands(rep, histories) if by == "order" else {}
    for (features, key), (steps, mean, std) in banded.items():
        style = styles[rep.feature_groups.index(features) % 4] if features in rep.feature_groups else "-"
        ax.plot(steps, mean, style, color=colors.get(key, "black"), linewidth=2, marker="o", markersize=2.5)
        ax.fill_between(steps, mean - std, mean + std, color=colors.get(key, "black"), alpha=0.18, linewidth=0)
    for _, row in t.iterrows():
        h = histories.get(row["run_id"])
        if h is None or h.empty:
            continue
        key = key_of(row)
        counts[key] = counts.get(key, 0) + 1
        if (row["features"], key) in banded and not row["best"] and row["status"] not in ENDED_BADLY:
            continue  # drawn as its arm's mean and band
        style = styles[rep.feature_groups.index(row["features"]) % 4] if row["features"] in rep.feature_groups else "-"
        if dashed_baseline and key == "baseline":
            style = "--"
        ax.plot(h.index, h.values, style, color=colors.get(key, "black"), marker="o", markersize=2.5,
                linewidth=2.6 if row["best"] else 1.2, alpha=0.95 if row["best"] else 0.7)
        if row["status"] in ENDED_BADLY:
            ax.plot(h.index[-1], h.values[-1], "x", color=colors.get(key, "black"), markersize=9, markeredgewidth=2)
        if row["best"]:
            ax.annotate(f"best: {row['trial']} ({row['best_fid']:.2f})", (row["best_step"], row["best_fid"]),
                        xytext=(-4, -12), textcoords="offset points", fontsize=8, ha="right")
    handles = [Line2D([], [], color=colors[k], linewidth=2, label=f"{label_of(k)} ({counts[k]})",
                      linestyle="--" if dashed_baseline and k == "baseline" else "-")
               for k in keys if k in counts]
    if not rep.comparable:
        handles += [Line2D([], [], color="black", linestyle=styles[i % 4], label=f"F{i + 1}: {g[:60]}")
                    for i, g in enumerate(rep.feature_groups)]
    for g, b in (rep.baselines.items() if own else ()):
        ax.axhline(b.fid, color=ORDER_COLORS["none"], linestyle=":", linewidth=1)
    if rep.baselines and own:
        handles.append(Line2D([], [], color=ORDER_COLORS["none"], linestyle=":", label="baseline final FID (mean)"))
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label="mean ± std over seeds (finished trials)"))
    if any(t["status"].isin(ENDED_BADLY)):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="failed / killed"))
    values = pd.concat([h for h in histories.values() if not h.empty] or [pd.Series(dtype=float)])
    values = values[_finite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 5:
        ax.set_yscale("log")
    if not len(values):
        ax.text(0.5, 0.5, f"no {metric} logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric}, lower is better")
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best", title="curriculum arm (trials)" if by == "order" else
                  "clusters N", title_fontsize=8)
    what = "curriculum arm" if by == "order" else "number of clusters N"
    fig.suptitle(f"{rep.experiment}: {metric.split(' ')[0]} vs step by {what}", fontsize=12)
    ax.set_title(_short_features(rep), fontsize=8.5, color="black" if rep.comparable else "red")
    return fig


def _arm_bands(rep: Report, histories: dict) -> dict:
    """(features, arm) -> (steps, mean, std) over the arm's finished trials of ≥ 2 seeds, at the
    eval steps they all have."""
    import numpy as np

    t = rep.table
    out = {}
    finished = t[(t["status"] == "FINISHED")]
    for (features, arm), sub in finished.groupby(["features", "arm"]):
        hists = [histories[r] for r in sub["run_id"] if r in histories and not histories[r].empty]
        if len(hists) < 2:
            continue
        steps = sorted(set.intersection(*(set(h.index) for h in hists)))
        if not steps:
            continue
        values = np.array([h.loc[steps].to_numpy(dtype=float) for h in hists])
        out[(features, arm)] = (steps, values.mean(axis=0), values.std(axis=0, ddof=1))
    return out
