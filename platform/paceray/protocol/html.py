"""`report.html`: one self-contained page per search (images as data URIs, no network), written
beside the other report files and into the parent run. MLflow shows an HTML artifact in a
sandboxed iframe where relative links do not resolve, hence everything inline.

The platform owns the page and the parameter importance (Optuna's fANOVA over the finished
trials, with the spec's distributions); the trainable's report hook supplies the sections
(through `paceray.protocol.html_report`). Light to import: pandas and Optuna load when used.
"""

from __future__ import annotations

import ast
import base64
import html
import io
import math
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

IMPORTANCE_MIN_TRIALS = 8

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } .warn { color: #b00; font-weight: bold; }
figure { display: inline-block; margin: 0.4em 0.8em 0.4em 0; vertical-align: top; text-align: center; }
figcaption { font-size: 0.8em; color: #444; max-width: 260px; }
img.plot { max-width: 100%; } img.grid { image-rendering: pixelated; width: 220px; }
"""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return png_uri(buf.getvalue())


def plain_log_scale(ax, which: str = "y") -> None:
    """A log scale on a matplotlib Axes' `which` axis whose ticks read 10, 20, 50 (not 2×10^1):
    major ticks at 1, 2 and 5 of each decade, minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def esc(text) -> str:
    return html.escape(str(text))


def table(frame: "pd.DataFrame") -> str:
    return frame.to_html(index=False, escape=True, border=0, na_rep="—")


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """The whole document: `sections` are (id, html) in order; each html holds its own heading."""
    body = "\n".join(f'<section id="{esc(sid)}">\n{content}\n</section>' for sid, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"<p class=\"note\">{esc(subtitle)}</p>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------- parameter importance

def parse_distribution(text: str):
    """A spec distribution as the parent run records it (`grid['a', 'b']`, `uniform[0.1, 0.5]`)
    -> an Optuna distribution; None when it cannot be read."""
    import optuna

    kind, _, rest = text.partition("[")
    try:
        args = ast.literal_eval("[" + rest)
    except (ValueError, SyntaxError):
        return None
    if kind in ("grid", "choice"):
        return optuna.distributions.CategoricalDistribution(list(args))
    if kind == "uniform":
        return optuna.distributions.FloatDistribution(float(args[0]), float(args[1]))
    if kind == "loguniform":
        return optuna.distributions.FloatDistribution(float(args[0]), float(args[1]), log=True)
    if kind == "randint":
        return optuna.distributions.IntDistribution(int(args[0]), int(args[1]) - 1)
    return None


def _value(param: Optional[str], dist):
    """A run's logged param (a string) as a value of `dist`."""
    import optuna

    if param is None:
        return None
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == param), None)
    try:
        number = float(param)
    except ValueError:
        return None
    return int(number) if isinstance(dist, optuna.distributions.IntDistribution) else number


def importance(runs, finals: dict, minimum: int = IMPORTANCE_MIN_TRIALS) -> Optional["pd.DataFrame"]:
    """fANOVA importance of the searched parameters for the final metric, from the finished
    trials (`finals`: run id -> final metric value) and the spec's distributions; None below
    `minimum` finished trials or when no searched parameter varies among them."""
    import optuna
    import pandas as pd

    dists = {k: d for k, d in ((k, parse_distribution(v)) for k, v in runs.distributions.items()) if d is not None}
    done = [r for r in runs.runs if r.info.status == "FINISHED" and math.isfinite(finals.get(r.info.run_id, math.nan))]
    if len(done) < minimum or not dists:
        return None
    rows = []
    for r in done:
        params = {k: _value(r.data.params.get(k), d) for k, d in dists.items()}
        rows.append((params, finals[r.info.run_id]))
    varying = [k for k in dists if len({repr(p[k]) for p, _ in rows}) > 1 and all(p[k] is not None for p, _ in rows)]
    if not varying:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if runs.mode == "min" else "maximize")
    for params, value in rows:
        study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in varying},
                                                  distributions={k: dists[k] for k in varying}, value=value))
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    return pd.DataFrame({"parameter": list(scores), "importance": [round(v, 4) for v in scores.values()],
                         "trials": len(rows)})


def importance_section(runs, finals: dict, metric: str) -> str:
    frame = importance(runs, finals)
    head = "<h2>Which searched parameters matter</h2>"
    finished = sum(r.info.status == "FINISHED" for r in runs.runs)
    if frame is None:
        return (f"{head}<p class=\"note\">Shown for searches of at least {IMPORTANCE_MIN_TRIALS} finished trials "
                f"whose searched parameters vary ({finished} finished here).</p>")
    return (f"{head}<p class=\"note\">fANOVA importance (Optuna, seed 0) of each searched parameter for the final "
            f"{esc(metric)}, over {int(frame['trials'].iloc[0])} finished trials, with the spec's distributions; "
            f"the importances sum to 1.</p>{table(frame.drop(columns='trials'))}")
