"""One URL that opens MLflow's UI on a search's comparison, without a click.

MLflow 3.17's runs page restores a *shared view* named in its URL (`viewStateShareKey=KEY`) from
the experiment tag `mlflow.sharedViewState.KEY`: a JSON envelope `{name, createdAt, state}` whose
`state` is the page's state, zlib-deflated and base64-encoded behind `deflate;` (the UI's own
"Save view" writes the same). paceray writes one per search:
- the search's child runs only (`tags.mlflow.parentRunId = ...`), sorted by the metric: a sort
  other than start time lists them flat (sorted by start time they fold under their parent, and
  which runs are unfolded is not part of a shared view);
- the metric and the searched parameters as columns;
- chart mode (a URL parameter, not part of the state) with one section: the metric against step,
  one line per trial, and MLflow's difference table of the trials' parameters and metrics.
- a search with replicates (`tune.seeds`) groups its runs by their arm tag (`paceray.arm`):
  MLflow's own run grouping, one line per arm in the chart, the metric's mean over its seeds with
  the min–max band, so 25 trials of 5 arms read as 5 lines.
  Every other metric the trials logged gets a deleted placeholder chart, or the UI would add a
  chart per metric around them.
The view is written when the search starts (its trials show up as they run) and again at its end
(with the placeholders for every metric logged by then). Checked in a real browser:
tests/test_browser.py.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

from paceray.protocol.keys import ARM_TAG, VIEW_TAG

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
SECTION = "paceray-comparison"
MAX_TAG_VALUE = 20_000  # MLflow's limit on an experiment tag's value


def view_key(parent_run_id: str) -> str:
    return f"paceray-{parent_run_id}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column key format


def comparison_state(parent_run_id: str, metric: str, mode: str, params: Iterable[str],
                     other_metrics: Iterable[str] = (), group_by_tag: Optional[str] = None) -> dict:
    line = {"uuid": "paceray-metric", "type": "LINE", "metricKey": metric, "selectedMetricKeys": [metric],
            "metricSectionId": SECTION, "deleted": False, "isGenerated": False, "runsCountToCompare": 100,
            "xAxisKey": "step", "useGlobalXaxisKey": False, "scaleType": "linear", "xAxisScaleType": "linear",
            "lineSmoothness": 0, "useGlobalLineSmoothing": False, "selectedXAxisMetricKey": "", "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False}
    table = {"uuid": "paceray-trials", "type": "DIFFERENCE", "compareGroups": ["Parameters", "Model metrics"],
             "chartName": "trials", "showChangeFromBaseline": False, "showDifferencesOnly": True,
             "baselineColumnUuid": "", "metricSectionId": SECTION, "deleted": False, "isGenerated": False,
             "runsCountToCompare": 100}
    hidden = [{"uuid": f"paceray-hidden-{i}", "type": "LINE", "metricKey": key, "metricSectionId": SECTION,
               "deleted": True, "isGenerated": True}
              for i, key in enumerate(sorted(set(other_metrics) - {metric}))]
    grouping = {}
    if group_by_tag:  # the UI's run grouping (its state `groupBy`): the mean line, the min–max band
        grouping = {"groupBy": {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}]},
                    "groupsExpanded": {}, "useGroupedValuesInCharts": True}
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
        "orderByKey": _column("metrics", metric), "orderByAsc": mode == "min",
        "selectedColumns": [_column("metrics", metric), *(_column("params", p) for p in params),
                            *([_column("tags", ARM_TAG)] if group_by_tag else [])],
        **grouping,
        "runsHiddenMode": "SHOW_ALL",  # the default shows only the first 10 runs in charts
        "compareRunCharts": [line, table, *hidden],
        "compareRunSections": [{"uuid": SECTION, "name": f"{metric} by trial", "display": True, "isReordered": False,
                                "columns": 2, "cardHeight": 520}],
        "isAccordionReordered": False,
    }


def encode(name: str, state: dict) -> str:
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    return json.dumps({"name": name, "createdAt": int(time.time() * 1000), "state": packed})


@dataclass(frozen=True)
class Comparison:
    """What a search's view compares: its trials' metric (and its mode), the searched params as
    columns, and the other metrics they logged (charted too, so the UI adds none of its own)."""

    search: str
    metric: str
    mode: str
    params: tuple[str, ...]
    other_metrics: tuple[str, ...] = ()
    group_by_tag: Optional[str] = None  # a tag whose runs read as one line (the arm, over seeds)


def save_comparison(client, experiment_id: str, parent_run_id: str, view: Comparison) -> str:
    """Write the search's shared view (and its key on the parent run); returns the key."""
    params, other = list(view.params), list(view.other_metrics)
    name = f"paceray search {view.search}"
    value = encode(name, comparison_state(parent_run_id, view.metric, view.mode, params, other, view.group_by_tag))
    if len(value) > MAX_TAG_VALUE:  # thousands of metric keys: let the UI add their charts instead
        value = encode(name, comparison_state(parent_run_id, view.metric, view.mode, params,
                                              group_by_tag=view.group_by_tag))
    key = view_key(parent_run_id)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, value)
    client.set_tag(parent_run_id, VIEW_TAG, key)
    return key


def comparison_url(base: str, experiment_id: str, key: Optional[str]) -> str:
    """The runs page of the experiment in the search's shared view (chart mode, "Model training"
    workflow), or its plain runs page when the search has no view. The URL must name the runs
    tab: the bare experiment route redirects and drops the view's key."""
    query = {"workflowType": "machine_learning"}
    if key:
        query = {"viewStateShareKey": key, "compareRunsMode": "CHART", **query}
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def latest_search(client, experiment: Optional[str]):
    """The newest search's parent run in `experiment` (or in any experiment), or None; its view
    key is the run's tag VIEW_TAG."""
    if experiment:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string="tags.`paceray.kind` = 'search'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None
