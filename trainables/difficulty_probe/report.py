"""The probe's report hook: one row per cluster — its timesteps, how many steps its held-out loss
took to converge, how far it fell, and its summed KL between consecutive marginals — ranked, as
`difficulty.json` (what the denoiser's `curriculum.order: measured` reads) and a plot against t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from paceray.protocol import ERROR_TAG, TRIAL_TAG, html_report
from trainables.diffusion.difficulty import DIFFICULTY_FILE, FORMAT, MEASURES

METRICS = {"convergence_steps": "probe/convergence_steps", "relative_final_loss": "probe/relative_final_loss",
           "kl": "probe/kl", "t_lo": "probe/t_lo", "t_hi": "probe/t_hi"}


def _param(run, key, cast=str):
    value = run.data.params.get(key)
    try:
        return cast(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class ProbeReport:
    experiment: str
    source: str
    table: pd.DataFrame  # one row per cluster probed (latest finished trial of each)
    setting: dict  # timesteps, num_clusters, clustering, schedule, dataset, ridge, tolerance
    failed: list

    @classmethod
    def build(cls, search) -> "ProbeReport":
        rows, failed, settings = {}, [], set()
        for run in search.runs:  # oldest first: a later trial of a cluster replaces an earlier one
            name = run.data.tags.get(TRIAL_TAG) or run.info.run_name
            if run.info.status != "FINISHED":
                failed.append((name, run.info.status, run.data.tags.get(ERROR_TAG)))
                continue
            m = run.data.metrics
            if METRICS["convergence_steps"] not in m:
                continue
            settings.add((_param(run, "diffusion.timesteps", int), _param(run, "probe.num_clusters", int),
                          _param(run, "probe.clustering"), _param(run, "diffusion.schedule"),
                          _param(run, "data.dataset"), _param(run, "data.image_size", int),
                          _param(run, "probe.kl_ridge", float), _param(run, "probe.tolerance", float)))
            k = _param(run, "probe.cluster", int)
            rows[k] = {"cluster": k, "t_lo": int(m[METRICS["t_lo"]]), "t_hi": int(m[METRICS["t_hi"]]),
                       "convergence_steps": int(m[METRICS["convergence_steps"]]),
                       "relative_final_loss": m[METRICS["relative_final_loss"]], "kl": m[METRICS["kl"]],
                       "trial": name, "run_id": run.info.run_id}
        table = pd.DataFrame(sorted(rows.values(), key=lambda r: r["cluster"]),
                             columns=["cluster", "t_lo", "t_hi", "convergence_steps", "relative_final_loss", "kl",
                                      "trial", "run_id"])
        for measure in MEASURES:  # rank 1 = easiest
            table[f"rank_{measure}"] = table[measure].rank(method="min").astype("Int64")
        keys = ("timesteps", "num_clusters", "clustering", "schedule", "dataset", "image_size", "kl_ridge", "tolerance")
        setting = dict(zip(keys, next(iter(settings)))) if len(settings) == 1 else {}
        return cls(search.experiment, search.source, table, setting, failed)

    @property
    def complete(self) -> bool:
        n = self.setting.get("num_clusters")
        return bool(n) and sorted(self.table["cluster"]) == list(range(1, n + 1))

    def difficulty(self) -> dict:
        return {"format": FORMAT, **self.setting, "measures": list(MEASURES),
                "kl_note": f"KL of a Gaussian fitted to the data, ridge {self.setting.get('kl_ridge')} on its covariance",
                "clusters": [{"cluster": int(r.cluster), "bounds": [int(r.t_lo), int(r.t_hi)],
                              "convergence_steps": int(r.convergence_steps),
                              "relative_final_loss": float(r.relative_final_loss), "kl": float(r.kl)}
                             for r in self.table.itertuples()]}

    @property
    def text(self) -> str:
        s = self.setting
        lines = [f"paceray report {self.experiment}: {self.source}; difficulty probe of {len(self.table)} cluster(s)"]
        if s:
            lines.append(f"setting: {s['dataset']} {s['image_size']}px, T={s['timesteps']} {s['schedule']}, "
                         f"N={s['num_clusters']} {s['clustering']} clusters (C1 = lowest noise); convergence within "
                         f"{s['tolerance']:.0%} of the final smoothed held-out loss; KL of a Gaussian fit with ridge "
                         f"{s['kl_ridge']:g} on its covariance")
        elif len(self.table):
            lines.append("!!! WARNING: the trials were run with different settings; the ranking mixes them")
        lines.append("")
        if self.table.empty:
            lines.append("(no finished probe trials yet)")
        else:
            shown = pd.DataFrame({
                "cluster": [f"C{k}" for k in self.table["cluster"]],
                "t": [f"[{a}, {b})" for a, b in zip(self.table["t_lo"], self.table["t_hi"])],
                "convergence steps": self.table["convergence_steps"],
                "final/first loss": self.table["relative_final_loss"].map(lambda v: f"{v:.3f}"),
                "KL (sum over t)": self.table["kl"].map(lambda v: f"{v:.4g}"),
                "rank (conv.)": self.table["rank_convergence_steps"], "rank (KL)": self.table["rank_kl"]})
            lines += shown.to_string(index=False).splitlines()
            for measure in MEASURES:
                order = self.table.sort_values([measure, "cluster"])["cluster"]
                lines.append(f"easiest → hardest by {measure}: {' '.join(f'C{k}' for k in order)}")
            if not self.complete:
                lines.append("(incomplete: not every cluster has a finished trial; difficulty.json covers those that do)")
        for name, status, error in self.failed:
            lines.append(f"{name}: {status}{': ' + error[:100] if error else ''}")
        return "\n".join(lines)

    def files(self) -> dict:
        return {"probe.csv": lambda p: self.table.to_csv(p, index=False),
                DIFFICULTY_FILE: lambda p: Path(p).write_text(json.dumps(self.difficulty(), indent=2)),
                "difficulty.png": lambda p: self.figure().savefig(p, format="png")}

    def parent_tags(self) -> dict:
        return {"paceray.probe_clusters": str(len(self.table))}

    def figure(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.6), layout="constrained")
        axes = fig.subplots(1, 3)
        mid = (self.table["t_lo"] + self.table["t_hi"]) / 2
        for ax, (col, label) in zip(axes, [("convergence_steps", "steps to converge"),
                                           ("relative_final_loss", "final / first held-out loss"),
                                           ("kl", "Σ KL(p_{t−1} ‖ p_t) in the cluster")]):
            ax.bar(mid, self.table[col], width=(self.table["t_hi"] - self.table["t_lo"]) * 0.9, color="#1f77b4")
            ax.set_xlabel("timestep t (cluster)")
            ax.set_title(label, fontsize=9)
            if col == "kl" and len(self.table) and (self.table["kl"] > 0).all():
                html_report.plain_log_scale(ax, "y")
        fig.suptitle(f"{self.experiment}: denoising difficulty per timestep cluster", fontsize=11)
        return fig


class ProbeReportHook:
    def build(self, search) -> ProbeReport:
        return ProbeReport.build(search)
