"""The denoiser's report hook: the curriculum comparison (study_model) with its files — the
trial table and per-arm summary as CSV, the FID-vs-step plots (study_plots) and report.html
(study_html). The platform's `paceray report` (and the end of `paceray tune`) calls it through
`Trainable.report` with the search's runs (paceray.protocol.report_hook.SearchRuns)."""

from __future__ import annotations

from trainables.denoiser.study_html import render_html
from trainables.denoiser.study_model import FILES, Report, build
from trainables.denoiser.study_plots import plot_fid


def files(rep: Report) -> dict:
    """trials.csv, summary.csv, fid_by_order.png, fid_by_clusters.png: file name -> writer(path)."""
    return {
        FILES[0]: lambda p: rep.table.to_csv(p, index=False),
        FILES[1]: lambda p: rep.summary.to_csv(p, index=False),
        FILES[2]: lambda p: plot_fid(rep, "order").savefig(p, format="png"),
        FILES[3]: lambda p: plot_fid(rep, "N").savefig(p, format="png"),
        FILES[4]: lambda p: p.write_text(render_html(rep)),
    }


class StudyReportHook:
    """`Trainable.report` of the denoiser."""

    def build(self, search) -> Report:
        return build(search, files)
