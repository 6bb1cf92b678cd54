"""`curriculum.reference` of a `shuffled` trial under patience pacing: an easy-to-hard trial's
`curriculum/schedule.json`, a file or a run id, checked before anything is written and copied
into the storage root by its content."""

import json

import pytest
from mlflow.tracking import MlflowClient

from paceray.base.errors import PacerayError
from trainables.denoiser.config import Config
from trainables.diffusion.config import CurriculumConfig
from trainables.diffusion.curriculum import CurriculumSampler, from_config
from trainables.denoiser.reporting import schedule_json
from paceray.trial.prepare import prepare_context
from trainables.denoiser.references import resolve_shuffled_reference


def shuffled_config(reference):
    return Config.model_validate({"curriculum": {"order": "shuffled", "pacing": "patience", "num_clusters": 4,
                                                 "reference": reference}}).model_dump(mode="json")


def finished_easy_to_hard(n=4):
    """The schedule.json a real easy-to-hard patience trial writes, from a sampler run to the end."""
    s = CurriculumSampler(CurriculumConfig(num_clusters=n, pacing="patience", patience=4, smoothing=0.0), 1000)
    for i in range(200):
        s.advance(1.0 if i % 10 else 0.5)  # an improvement every 10 steps, then flat
    return schedule_json(s)


def test_a_schedule_file_gives_the_allocation_and_is_copied_by_content(tmp_path):
    ref = tmp_path / "schedule.json"
    schedule = finished_easy_to_hard()
    ref.write_text(json.dumps(schedule))
    storage = tmp_path / "storage"
    resolved = resolve_shuffled_reference(shuffled_config(str(ref)), storage, prepare_context(storage, None))
    copy = resolved["curriculum"]["reference"]
    assert copy.startswith(str(storage / "schedules")) and json.loads(open(copy).read()) == schedule
    sampler = from_config(Config.model_validate(resolved).curriculum, 1000)
    lengths = schedule["realised_stage_lengths"]
    assert len(lengths) == 3 and sampler.full_from_step == 1 + sum(lengths)


def test_a_run_id_resolves_through_the_tracking_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("ref", artifact_location=str(tmp_path / "artifacts"))
    run = c.create_run(exp).info.run_id
    c.log_dict(run, finished_easy_to_hard(), "curriculum/schedule.json")
    resolved = resolve_shuffled_reference(shuffled_config(run), tmp_path / "storage", prepare_context(tmp_path / "storage", uri))
    assert json.loads(open(resolved["curriculum"]["reference"]).read())["order"] == "easy-to-hard"
    with pytest.raises(PacerayError, match="has no curriculum/schedule.json"):
        other = c.create_run(exp).info.run_id
        resolve_shuffled_reference(shuffled_config(other), tmp_path / "storage", prepare_context(tmp_path / "storage", uri))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    (json.dumps({"order": "easy-to-hard", "clusters": [[0, 1]] * 4}), "realised_stage_lengths must be"),
    (json.dumps({**finished_easy_to_hard(), "order": "hard-to-easy"}), "must be an easy-to-hard trial with 4"),
    (json.dumps(finished_easy_to_hard(n=3)), "must be an easy-to-hard trial with 4 clusters"),
])
def test_a_bad_reference_is_one_line_and_writes_nothing(tmp_path, content, message):
    ref = tmp_path / "schedule.json"
    ref.write_text(content)
    storage = tmp_path / "storage"
    with pytest.raises(PacerayError, match=message) as e:
        resolve_shuffled_reference(shuffled_config(str(ref)), storage, prepare_context(storage, None))
    assert "\n" not in str(e.value) and str(e.value).startswith("curriculum.reference: ")
    assert not storage.exists()


def test_shuffled_under_patience_without_a_reference_fails_the_config():
    with pytest.raises(ValueError, match="needs curriculum.reference"):
        Config.model_validate({"curriculum": {"order": "shuffled", "pacing": "patience"}})
