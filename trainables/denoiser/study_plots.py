"""FID-vs-step plots of a curriculum comparison (`study_report.Report`): one line per trial,
coloured by curriculum order or by cluster count, the baseline's final FID as a reference line,
the feature extractor in the title (in red when trials used different ones)."""

from __future__ import annotations

import pandas as pd

from trainables.denoiser.study_report import ENDED_BADLY, ORDERS, Report, _finite

ORDER_COLORS = {"none": "#4d4d4d", "easy-to-hard": "#1f77b4", "hard-to-easy": "#d62728", "random": "#2ca02c"}


def _short_features(rep: Report) -> str:
    if not rep.feature_groups:
        return "no FIDs yet"
    if rep.comparable:
        return f"FID: {rep.feature_groups[0]}"
    return "MIXED FID EXTRACTORS: curves of different line styles are NOT comparable"


def plot_fid(rep: Report, by: str):
    """FID vs step, one line per trial, coloured by `by` ("order" or "N")."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    t = rep.table
    if by == "order":
        keys = [o for o in ORDERS if o in set(t["order"])] + sorted(set(t["order"].dropna()) - set(ORDERS))
        extra = colormaps["tab10"]
        colors = {k: ORDER_COLORS.get(k, extra(i % 10)) for i, k in enumerate(keys)}
        key_of, label_of = (lambda row: row["order"]), (lambda k: str(k))
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
    for _, row in t.iterrows():
        h = rep.histories.get(row["run_id"])
        if h is None or h.empty:
            continue
        key = key_of(row)
        counts[key] = counts.get(key, 0) + 1
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
    for g, b in rep.baselines.items():
        ax.axhline(b.fid, color=ORDER_COLORS["none"], linestyle=":", linewidth=1)
    if rep.baselines:
        handles.append(Line2D([], [], color=ORDER_COLORS["none"], linestyle=":", label="baseline final FID (mean)"))
    if any(t["status"].isin(ENDED_BADLY)):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="failed / killed"))
    values = pd.concat([h for h in rep.histories.values() if not h.empty] or [pd.Series(dtype=float)])
    values = values[_finite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 5:
        ax.set_yscale("log")
    if not len(values):
        ax.text(0.5, 0.5, "no eval/fid logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (eval/fid, lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best", title="curriculum order" if by == "order" else
                  "clusters N", title_fontsize=8)
    what = "curriculum order" if by == "order" else "number of clusters N"
    fig.suptitle(f"{rep.experiment}: FID vs step by {what}", fontsize=12)
    ax.set_title(_short_features(rep), fontsize=8.5, color="black" if rep.comparable else "red")
    return fig
