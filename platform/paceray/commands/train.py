"""`paceray train SPEC`: one trial (base config + --set) through Ray Train, no Tune."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from paceray import raycluster, tracking
from paceray.atomic import write_text_atomic
from paceray.errors import PacerayError
from paceray.paths import storage_root
from paceray.spec import flatten, load, load_trainable, parse_overrides
from paceray.trial import Resources, TrialContext, trainer_for, trial_storage


def _pointer(run_dir: Path, name: str) -> Path:
    return run_dir / "train" / name / "latest.json"


def prepare_assets(trainable, config: dict, storage: Path, where: str) -> None:
    """The trainable's one-off preparation (datasets, FID nets, reference statistics), before any run exists."""
    prepare = getattr(trainable, "prepare", None)
    if prepare is not None:
        try:
            prepare(config, str(storage))
        except PacerayError as e:
            raise PacerayError(f"{where}: {e}") from None


def latest_checkpoint(trial_dir: Path) -> Optional[Path]:
    """The checkpoint Ray Train will resume from: the latest one its snapshot registered (a folder
    on disk may be one a crash cut short while it was being written, which Ray ignores)."""
    try:
        snapshot = json.loads((trial_dir / "checkpoint_manager_snapshot.json").read_text())
        name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (FileNotFoundError, ValueError):
        return None
    return trial_dir / name if name else None


def check_resumable(trainable, trial_dir: Path) -> None:
    """A corrupted checkpoint is one line here, not a crash loop on the workers."""
    ckpt = latest_checkpoint(trial_dir)
    check = getattr(trainable, "check_checkpoint", None)
    if ckpt is not None and check is not None:
        check(str(ckpt))


def run_train(spec_path: str, overrides, address: Optional[str], tracking_uri: Optional[str], resume: bool,
              run_dir: Optional[str]) -> None:
    # Order matters: everything that can fail on bad input (spec, dataset, Ray address, tracking
    # server, checkpoint) fails before an MLflow run or anything under the run directory exists.
    loaded = load(spec_path, parse_overrides(overrides))
    spec = loaded.spec
    rd = Path(run_dir).expanduser().resolve() if run_dir else loaded.run_dir
    tracking_uri = tracking_uri or spec.tracking.uri
    pointer = _pointer(rd, spec.name)
    previous = None
    if resume:
        if not pointer.exists():
            raise PacerayError(f"--resume: no earlier `paceray train` of {spec.name!r} under {rd} ({pointer} is missing)")
        previous = json.loads(pointer.read_text())
    config = loaded.base
    trainable = load_trainable(spec.trainable, str(spec.path))
    if previous:
        check_resumable(trainable, trial_storage(rd) / previous["trial_id"])
    storage = storage_root()
    prepare_assets(trainable, config, storage, str(spec.path))
    external = tracking.external_uri(tracking_uri)
    if external:
        tracking.check_reachable(external)
    where = raycluster.connect(address)
    try:
        with tracking.tracking_session(rd, external) as uri:
            print(f"paceray train {spec.name}: {where}; MLflow at {uri}", flush=True)
            if previous:
                trial_id, run_id = previous["trial_id"], previous["run_id"]
            else:
                trial_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                run_id = tracking.create_run(uri, spec.experiment, trial_id,
                                             {tracking.TRIAL_TAG: trial_id, tracking.KIND_TAG: "trial"},
                                             flatten(config))
                write_text_atomic(pointer, json.dumps({"trial_id": trial_id, "run_id": run_id,
                                                       "experiment": spec.experiment}))
            result = _fit(trainable, config, spec, rd, storage, uri, trial_id, run_id)
    finally:
        raycluster.shutdown()
    scored = [m for _, m in (result.best_checkpoints or []) if m.get("eval/fid") is not None]
    best = min(scored, key=lambda m: m["eval/fid"]) if scored else {}
    print(f"\nresults: {trial_storage(rd) / trial_id}")
    if best:
        print(f"best eval/fid {best['eval/fid']:.3f} at step {best.get('step')} ({best.get('fid_features', '')}, "
              f"{best.get('fid_samples')} samples)")
    if external is None:
        print(f"MLflow UI: {tracking.ui_command(rd)}")


def _fit(trainable, config, spec, rd: Path, storage: Path, uri: str, trial_id: str, run_id: str):
    ctx = TrialContext(trial_id=trial_id, run_id=run_id, tracking_uri=uri, storage=str(storage), run_dir=str(rd))
    res = spec.resources
    trainer = trainer_for(trainable, config, ctx, Resources(res.workers, res.cpus_per_worker, res.gpus_per_worker),
                          trial_storage(rd), name=trial_id, keep_best=config["train"]["checkpoint_keep"])
    status = "FAILED"
    try:
        result = trainer.fit()
        reason = tracking.trial_error(uri, run_id)
        if reason:  # the trainable ended the trial as failed, and said why
            raise PacerayError(f"trial {trial_id} failed: {reason}")
        status = "FINISHED"
        return result
    except PacerayError:
        raise
    except Exception as e:  # Ray wraps the worker's error; the run must not stay RUNNING
        tracking.record_failure(uri, run_id, e)
        raise PacerayError(f"trial {trial_id} failed: {str(e).splitlines()[0][:300]} "
                           f"(details: {trial_storage(rd) / trial_id}; resume with --resume)") from e
    finally:
        tracking.end_trial_run(uri, run_id, status, rd)

