"""The difficulty probe on digits, for real: a `paceray tune` of one trial per cluster, its report
and difficulty.json in the parent run, and the denoiser's `order: measured` following it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import experiment_runs, prelaunched, run_paceray
from paceray.base.errors import PacerayError

pytestmark = pytest.mark.slow
N = 2


@prelaunched
def probe_search(shared, tmp):
    spec = {"name": "probe-test", "trainable": "difficulty-probe",
            "base": {"data": {"dataset": "digits", "image_size": 8}, "model": {"preset": "tiny"},
                     "diffusion": {"timesteps": 1000, "schedule": "linear"},
                     "train": {"steps": 60, "batch_size": 32},
                     "probe": {"num_clusters": N, "eval_every": 10, "heldout_samples": 64}},
            "search": {"probe.cluster": {"grid": list(range(1, N + 1))}},
            "resources": {"workers": 1, "cpus_per_worker": 1}}
    path = tmp / "probe.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = shared.paceray("tune", path, "--run-dir", tmp / "runs")
    client, runs = experiment_runs(shared, "probe-test")
    parent = next(r for r in runs if r.data.tags.get("paceray.kind") == "search")
    difficulty = Path(parent.info.artifact_uri) / "report" / "difficulty.json"
    return {"stdout": result.stdout, "runs": runs, "parent": parent, "difficulty": difficulty,
            "uri": shared.uri, "tmp": tmp}


def test_every_cluster_has_its_measurements(probe_search):
    data = json.loads(probe_search["difficulty"].read_text())
    assert (data["timesteps"], data["num_clusters"], data["clustering"], data["schedule"]) == (1000, N, "uniform",
                                                                                              "linear")
    assert [c["cluster"] for c in data["clusters"]] == list(range(1, N + 1))
    assert [c["bounds"] for c in data["clusters"]] == [[0, 500], [500, 1000]]
    for c in data["clusters"]:
        assert isinstance(c["convergence_steps"], int) and 0 <= c["convergence_steps"] <= 60
        assert 0 < c["relative_final_loss"] < 1  # it learned
    # The relative entropy of consecutive marginals falls with t (the paper's §3): C1 > C2.
    assert data["clusters"][0]["kl"] > data["clusters"][1]["kl"] > 0
    assert "ridge 0.001" in data["kl_note"]
    out = probe_search["stdout"]
    assert "easiest → hardest by kl: C2 C1" in out and "easiest → hardest by convergence_steps:" in out
    for name in ("probe.csv", "difficulty.png"):
        assert (probe_search["difficulty"].parent / name).is_file()


def test_order_measured_in_preview_follows_the_probe(probe_search):
    data = json.loads(probe_search["difficulty"].read_text())
    for measure in ("convergence_steps", "kl"):
        expected = [c["cluster"] for c in sorted(data["clusters"], key=lambda c: (c[measure], c["cluster"]))]
        r = run_paceray("curriculum", "preview", "-N", N, "--order", "measured", "--difficulty",
                        probe_search["difficulty"], "--measure", measure, "--json")
        preview = json.loads(r.stdout)
        assert preview["introduction_order"] == expected
        assert preview["stages"][0]["clusters"] == [expected[0]]  # the easiest first
    r = run_paceray("curriculum", "preview", "-N", 4, "--order", "measured", "--difficulty",
                    probe_search["difficulty"], check=False)
    assert r.returncode == 2 and "num_clusters 2 (probe) vs 4 (trial)" in r.stderr.strip().splitlines()[-1]


def test_a_probe_run_id_resolves_to_a_checked_file_in_the_storage_root(probe_search, storage):
    from trainables.denoiser.config import Config
    from trainables.diffusion.curriculum import from_config
    from paceray.trial.prepare import prepare_context
    from trainables.denoiser.measured import resolve

    parent = probe_search["parent"].info.run_id
    config = Config.model_validate({"curriculum": {"order": "measured", "num_clusters": N, "difficulty": parent,
                                                   "difficulty_measure": "kl"}}).model_dump(mode="json")
    resolved = resolve(config, storage, prepare_context(storage, probe_search["uri"]))
    path = Path(resolved["curriculum"]["difficulty"])
    assert path.is_relative_to(storage) and path.read_bytes() == probe_search["difficulty"].read_bytes()
    sampler = from_config(Config.model_validate(resolved).curriculum, 1000)
    assert sampler.order == [1, 0]  # by KL: C2 (high noise) easiest
    other = {**config, "diffusion": {**config["diffusion"], "schedule": "cosine"}}
    with pytest.raises(PacerayError, match=r"schedule 'linear' \(probe\) vs 'cosine' \(trial\)"):
        resolve(other, storage, prepare_context(storage, probe_search["uri"]))
    with pytest.raises(PacerayError, match="no such file, and not an MLflow run id"):
        resolve({**config, "curriculum": {**config["curriculum"], "difficulty": "nope.json"}}, storage, prepare_context(storage, None))
