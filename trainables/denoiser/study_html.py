"""The denoiser's sections of `report.html` (paceray.protocol.html builds the page): what the FIDs
are, the arms with their paired intervals, FID and KID by arm with bands over seeds, each arm's
curriculum as it ran, the last sample grid of each arm side by side, the best trial, and the
searched parameters' importance (the platform's fANOVA) for searches of ≥ 8 finished trials."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd

from paceray.protocol import html_report as H
from trainables.denoiser.study_model import (
    FID_METRIC,
    KID_METRIC,
    Report,
    feature_lines,
    verdict_lines,
    display_summary,
    display_table,
)

GRID = re.compile(r"^samples[+%]step[+%](\d+)[+%]timestamp[+%]\d+[+%][0-9a-f-]+\.png$")


def _representatives(rep: Report) -> list[tuple[str, pd.Series]]:
    """(arm, one trial of it): the finished trial of the lowest seed (else any), arms in the
    summary's order."""
    out = []
    for arm in rep.summary["arm"].drop_duplicates():
        rows = rep.table[rep.table["arm"] == arm].copy()
        rows["_done"] = rows["status"] != "FINISHED"
        rows = rows.sort_values(["_done", "seed"], na_position="last")
        out.append((arm, rows.iloc[0]))
    return out


def _download(rep: Report, run_id: str, path: str) -> Optional[bytes]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files: no bars
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = rep.search.client.download_artifacts(run_id, path, tmp)
            return Path(local).read_bytes()
    except Exception:  # not logged (yet), or the store cannot serve it: the section says so
        return None


def _last_grid(rep: Report, run_id: str) -> Optional[tuple[int, bytes]]:
    try:
        names = [Path(a.path).name for a in rep.search.client.list_artifacts(run_id, "images")]
    except Exception:
        return None
    steps = [(int(m.group(1)), name) for name in names if (m := GRID.match(name))]
    if not steps:
        return None
    step, name = max(steps)
    data = _download(rep, run_id, f"images/{name}")
    return (step, data) if data else None


def _schedule_html(schedule: dict) -> str:
    rows = []
    for st in schedule["stages"]:
        where = (" ".join(f"C{k + 1} {v:.0%}" for k, v in enumerate(st["shares"])) if st.get("shares")
                 else " ∪ ".join(f"[{lo}, {hi})" for lo, hi in st["ranges"]))
        rows.append({"stage": f"{st['stage']}{' (all)' if st.get('final') else ''}",
                     "clusters": ", ".join(f"C{k}" for k in st["clusters"]), "timesteps drawn": where})
    lengths = schedule.get("realised_stage_lengths") or []
    full = schedule.get("full_from_step")
    return (H.table(pd.DataFrame(rows)) +
            f"<p class=\"note\">every timestep from step {full if full is not None else '—'}; stages lasted "
            f"{', '.join(map(str, lengths)) or '—'} steps</p>")


def render_html(rep: Report) -> str:
    status = rep.table["status"].value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in status.items()) or "none yet"
    sections = []

    what = [H.esc(line) for line in feature_lines(rep)]
    best = ""
    if rep.best_trial is not None:
        row = rep.table[rep.table["trial"] == rep.best_trial].iloc[0]
        best = (f"<p><b>Best trial:</b> {H.esc(rep.best_trial)} ({H.esc(row['arm'])}, seed {H.esc(row['seed'])}), "
                f"FID {rep.best_fid:.2f} at step {H.esc(row['best_step'])}.</p>")
    elif not rep.comparable:
        best = "<p class=\"warn\">No overall best: the FIDs come from different feature networks.</p>"
    sections.append(("summary", f"<h2>What was compared</h2><p>{len(rep.table)} trials ({H.esc(counts)}).</p>"
                                f"<p class=\"{'note' if rep.comparable else 'warn'}\">{'<br>'.join(what)}</p>{best}"))

    verdicts = "<br>".join(H.esc(line.strip()) for line in verdict_lines(rep) if line.strip())
    sections.append(("arms", "<h2>Arms against the baseline, paired by seed</h2>"
                             f"{H.table(display_summary(rep))}<p class=\"note\">{verdicts}</p>"))

    from trainables.denoiser.study_plots import plot_fid

    # Only the page plots KID: its histories are fetched here, not for every `paceray report`.
    kid = {run_id: rep.search.history(run_id, KID_METRIC) for run_id in rep.table["run_id"]}
    curves = (f"<img class=\"plot\" alt=\"FID vs step by arm\" src=\"{H.figure_uri(plot_fid(rep, 'order'))}\">"
              f"<img class=\"plot\" alt=\"KID vs step by arm\" "
              f"src=\"{H.figure_uri(plot_fid(rep, 'order', kid, 'KID (eval/kid)'))}\">")
    sections.append(("curves", "<h2>FID and KID over training, by arm (mean ± std over seeds)</h2>" + curves))

    representatives = _representatives(rep)
    schedules, grids = [], []
    for arm, row in representatives:
        raw = _download(rep, row["run_id"], "curriculum/schedule.json")
        body = _schedule_html(json.loads(raw)) if raw else "<p class=\"note\">no curriculum/schedule.json logged yet</p>"
        schedules.append(f"<h3>{H.esc(arm)} <span class=\"note\">({H.esc(row['trial'])})</span></h3>{body}")
        grid = _last_grid(rep, row["run_id"])
        caption = f"{H.esc(arm)}<br>{H.esc(row['trial'])}, seed {H.esc(row['seed'])}"
        if grid:
            step, data = grid
            grids.append(f"<figure><img class=\"grid\" alt=\"samples of {H.esc(arm)}\" src=\"{H.png_uri(data)}\">"
                         f"<figcaption>{caption}, step {step}</figcaption></figure>")
        else:
            grids.append(f"<figure><figcaption>{caption}: no sample grid logged</figcaption></figure>")
    sections.append(("schedules", "<h2>Each arm's curriculum, as it ran</h2>" + "".join(schedules)))
    sections.append(("samples", "<h2>The last sample grid of each arm</h2>" + "".join(grids)))

    finals = dict(zip(rep.table["run_id"], rep.table["final_fid"].astype(float)))
    sections.append(("importance", H.importance_section(rep.search, finals, FID_METRIC)))
    sections.append(("trials", f"<h2>Every trial</h2>{H.table(display_table(rep))}"))
    return H.page(f"paceray report: {rep.experiment}", sections, rep.source)
