"""FID-vs-step plots of a curriculum comparison (`study_report.Report`): by arm (the mean over
seeds with a ±std band where an arm has two or more finished seeds, single trials as lines) or
one line per trial coloured by cluster count, the baseline's final FID as a reference line,
the feature extractor in the title (in red when trials used different ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from paceray.protocol import html_report
from trainables.denoiser.study_model import ENDED_BADLY, ORDERS, Report, finite_mask

ORDER_COLORS = {"none": "#4d4d4d", "easy-to-hard": "#1f77b4", "hard-to-easy": "#d62728", "random": "#2ca02c",
                "shuffled": "#9467bd", "measured": "#ff7f0e"}


def _short_features(rep: Report) -> str:
    if not rep.feature_groups:
        return "no FIDs yet"
    if rep.comparable:
        return f"FID: {rep.feature_groups[0]}"
    return "MIXED FID EXTRACTORS: curves of different line styles are NOT comparable"


STYLES = ["-", "--", ":", "-."]  # one line style per feature extractor, when trials used several


def plot_fid(rep: Report, by: str, histories: dict | None = None, metric: str = "FID (eval/fid)"):
    """FID vs step (or another metric's `histories`, e.g. KID), coloured by `by` ("order": by
    arm, with bands; or "N")."""
    own = histories is None
    histories = rep.histories if own else histories
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colouring = _by_arm(rep) if by == "order" else _by_cluster_count(rep)
    fig = Figure(figsize=(9.5, 5.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    dashed_baseline = by == "N" and rep.comparable
    banded = _arm_bands(rep, histories) if by == "order" else {}
    for (features, key), (steps, mean, std) in banded.items():
        ax.plot(steps, mean, _style(rep, features), color=colouring.color(key), linewidth=2, marker="o",
                markersize=2.5)
        ax.fill_between(steps, mean - std, mean + std, color=colouring.color(key), alpha=0.18, linewidth=0)
    counts = _plot_trials(ax, rep, histories, colouring, banded, dashed_baseline)
    handles = _legend_handles(rep, colouring, counts, dashed_baseline, own, bool(banded))
    for g, b in (rep.baselines.items() if own else ()):
        ax.axhline(b.fid, color=ORDER_COLORS["none"], linestyle=":", linewidth=1)
    if own and rep.user_target is not None:  # what `paceray report --target` times the arms to
        ax.axhline(rep.user_target, color="black", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"target {rep.user_target:g}"))
    elif own and rep.baselines:
        handles.append(Line2D([], [], color=ORDER_COLORS["none"], linestyle=":",
                              label="baseline final FID (the seeds' targets)"))
    _scale_and_label(ax, histories, metric)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best", title="curriculum arm (trials)" if by == "order" else
                  "clusters N", title_fontsize=8)
    what = "curriculum arm" if by == "order" else "number of clusters N"
    fig.suptitle(f"{rep.experiment}: {metric.split(' ')[0]} vs step by {what}", fontsize=12)
    ax.set_title(_short_features(rep), fontsize=8.5, color="black" if rep.comparable else "red")
    return fig


@dataclass(frozen=True)
class _Colouring:
    """The legend's keys in order, their colours, a trial's key (from its table row) and a key's label."""

    keys: list
    colors: dict
    key_of: Callable[[pd.Series], Any]
    label_of: Callable[[Any], str]

    def color(self, key) -> Any:
        return self.colors.get(key, "black")


def _by_arm(rep: Report) -> _Colouring:
    from matplotlib import colormaps

    t = rep.table
    orders = dict(zip(t["arm"], t["order"]))
    rank = {o: i for i, o in enumerate(ORDERS)}
    keys = sorted(orders, key=lambda a: (rank.get(orders[a], len(ORDERS)), str(a)))
    extra = colormaps["tab10"]
    colors, used = {}, set()
    for i, k in enumerate(keys):  # an order's colour for its first arm, then distinct ones
        colour = ORDER_COLORS.get(orders[k])
        colors[k] = colour if colour and colour not in used else extra((i + 3) % 10)
        used.add(colors[k])
    return _Colouring(keys, colors, lambda row: row["arm"], lambda k: str(k))


def _by_cluster_count(rep: Report) -> _Colouring:
    from matplotlib import colormaps

    t = rep.table
    ns = sorted({int(n) for n, o in zip(t["N"], t["order"]) if o != "none" and n is not pd.NA})
    cmap = colormaps["viridis"]
    colors = {n: cmap(0.9 * i / max(len(ns) - 1, 1)) for i, n in enumerate(ns)}
    colors["baseline"] = ORDER_COLORS["none"]

    def key_of(row) -> Any:
        return "baseline" if row["order"] == "none" else (None if row["N"] is pd.NA else int(row["N"]))

    return _Colouring(ns + ["baseline"], colors, key_of,
                      lambda k: "baseline (order=none)" if k == "baseline" else f"N={k}")


def _style(rep: Report, features) -> str:
    return STYLES[rep.feature_groups.index(features) % 4] if features in rep.feature_groups else "-"


def _plot_trials(ax, rep: Report, histories: dict, colouring: _Colouring, banded: dict, dashed_baseline: bool) -> dict:
    """One line per trial not drawn within its arm's band (the best and the failed always are);
    returns how many trials of each key have a history."""
    counts: dict = {}
    for _, row in rep.table.iterrows():
        h = histories.get(row["run_id"])
        if h is None or h.empty:
            continue
        key = colouring.key_of(row)
        counts[key] = counts.get(key, 0) + 1
        if (row["features"], key) in banded and not row["best"] and row["status"] not in ENDED_BADLY:
            continue  # drawn as its arm's mean and band
        style = _style(rep, row["features"])
        if dashed_baseline and key == "baseline":
            style = "--"
        ax.plot(h.index, h.values, style, color=colouring.color(key), marker="o", markersize=2.5,
                linewidth=2.6 if row["best"] else 1.2, alpha=0.95 if row["best"] else 0.7)
        if row["status"] in ENDED_BADLY:
            ax.plot(h.index[-1], h.values[-1], "x", color=colouring.color(key), markersize=9, markeredgewidth=2)
        if row["best"]:
            ax.annotate(f"best: {row['trial']} ({row['best_fid']:.2f})", (row["best_step"], row["best_fid"]),
                        xytext=(-4, -12), textcoords="offset points", fontsize=8, ha="right")
    return counts


def _legend_handles(rep: Report, colouring: _Colouring, counts: dict, dashed_baseline: bool, own: bool,
                    banded: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=colouring.colors[k], linewidth=2, label=f"{colouring.label_of(k)} ({counts[k]})",
                      linestyle="--" if dashed_baseline and k == "baseline" else "-")
               for k in colouring.keys if k in counts]
    if not rep.comparable:
        handles += [Line2D([], [], color="black", linestyle=STYLES[i % 4], label=f"F{i + 1}: {g[:60]}")
                    for i, g in enumerate(rep.feature_groups)]
    if rep.baselines and own:
        handles.append(Line2D([], [], color=ORDER_COLORS["none"], linestyle=":", label="baseline final FID (mean)"))
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label="mean ± std over seeds (finished trials)"))
    if any(rep.table["status"].isin(ENDED_BADLY)):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="failed / killed"))
    return handles


def _scale_and_label(ax, histories: dict, metric: str) -> None:
    """A log y axis when the values span more than a factor of 5; a note when there are none."""
    values = pd.concat([h for h in histories.values() if not h.empty] or [pd.Series(dtype=float)])
    values = values[finite_mask(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 5:
        html_report.plain_log_scale(ax, "y")
    if not len(values):
        ax.text(0.5, 0.5, f"no {metric} logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric}, lower is better")
    ax.grid(True, which="both", alpha=0.3)


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
