"""A trainable the platform has never heard of — tests/example_trainable.py, named by its dotted
path — searched by `paceray tune` with a real Ray and a real MLflow server: its report shows its
own parameters and metric, and a trial it fails in-band is FAILED in Tune, in MLflow and in the
exit code, while the search goes on."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from conftest import REPO, experiment_runs, prelaunched

pytestmark = pytest.mark.slow


ENV = {"PYTHONPATH": str(REPO / "tests")}  # the driver, Tune's trials and Ray's workers import it


@prelaunched
def toy_search(shared, tmp_path):
    spec = {"name": "toy", "trainable": "example_trainable:TRAINABLE", "base": {"length": 6, "rate": 1.0},
            "search": {"fail_at": {"grid": [0, 3]}},
            "tune": {"algorithm": "grid", "scheduler": "fifo"}, "resources": {"workers": 1, "cpus_per_worker": 1}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return shared.paceray("tune", path, "--run-dir", tmp_path / "runs", env=ENV, check=False)


def test_a_trainable_in_a_test_module_runs_through_paceray_tune(toy_search, shared):
    r = toy_search
    assert r.returncode != 0, r.stdout[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "paceray: error: 1 of 2 trial(s) failed (see the report above for why)"
    client, runs = experiment_runs(shared, "toy")
    parent = next(x for x in runs if x.data.tags.get("paceray.kind") == "search")
    assert parent.data.tags["paceray.trainable"] == "example_trainable:TRAINABLE"
    assert parent.data.tags["paceray.metric"] == "toy/error" and parent.info.status == "FINISHED"
    trials = {x.data.params["fail_at"]: x for x in runs if x.data.tags.get("paceray.kind") == "trial"}
    assert trials["0"].info.status == "FINISHED" and trials["0"].info.run_name.startswith("rate1.0-")
    assert trials["3"].info.status == "FAILED" and trials["3"].data.tags["paceray.error"] == "toy failure at step 3"
    steps = {k: [m.step for m in client.get_metric_history(t.info.run_id, "toy/error")] for k, t in trials.items()}
    assert sorted(steps["0"]) == [1, 2, 3, 4, 5, 6] and sorted(steps["3"]) == [1, 2]  # not retried
    # the search's progress lines: the failed trial and why, the finished one
    assert re.search(r"\] trial \S+ failed: .*toy failure at step 3", r.stdout), r.stdout[-3000:]
    assert re.search(r"\] trial rate1\.0-\S+ finished at step 6/6", r.stdout), r.stdout[-3000:]
    # The generic report: the searched parameter and the trainable's metric, best first.
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "best toy/error" in line and "fail_at" in line)
    assert "fail_at" in lines[header] and "final toy/error" in lines[header]
    assert "FINISHED" in lines[header + 1] and f"{math.exp(-6):.4g}" in lines[header + 1]
    assert "FAILED" in lines[header + 2] and "toy failure at step 3" in lines[header + 2]
    assert "metric: toy/error (lower is better)" in r.stdout
    report = shared.paceray("report", "toy", env=ENV)
    assert "best toy/error" in report.stdout and "* best trial:" in report.stdout
