"""`curriculum.order: measured`: the clusters ordered by a difficulty probe's measurements.

`curriculum.difficulty` names a `difficulty.json` (a file) or a probe search's parent run id (its
`report/difficulty.json` artifact). `prepare` resolves it once, on the driver: it checks that the
probe measured this trial's T, N, clustering and schedule, copies the file into the storage root
(content-addressed, so every worker on every node reads the same bytes) and hands the trials that
path. `Config` only checks that a reference is given.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Optional

from paceray.protocol import PacerayError, one_line, write_atomic
from trainables.difficulty_probe.difficulty import DIFFICULTY_FILE, check_setting, load_difficulty, ranking

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT = f"report/{DIFFICULTY_FILE}"


def _fetch(ref: str, tracking_uri: Optional[str]) -> bytes:
    path = Path(ref).expanduser()
    if path.is_file():
        return path.read_bytes()
    if not RUN_ID.match(ref):
        raise PacerayError(f"curriculum.difficulty: {ref}: no such file, and not an MLflow run id")
    if tracking_uri is None:
        raise PacerayError(f"curriculum.difficulty: run {ref} needs the tracking store the probe search logged to "
                           f"(--tracking-uri, or the --run-dir of its embedded store)")
    import os

    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=ARTIFACT, tracking_uri=tracking_uri,
                                                        dst_path=tmp)
        except Exception as e:  # MlflowException: no such run or artifact
            raise PacerayError(one_line(f"curriculum.difficulty: run {ref} at {tracking_uri} has no {ARTIFACT} "
                                        f"(is it a finished difficulty-probe search?): {str(e)[:200]}")) from None
        return Path(local).read_bytes()


def resolve(config: dict, storage: Path, tracking_uri: Optional[str]) -> dict:
    """The config with `curriculum.difficulty` replaced by the checked file in the storage root."""
    c, d = config["curriculum"], config["diffusion"]
    if c["order"] != "measured":
        return config
    raw = _fetch(c["difficulty"], tracking_uri)
    dst = storage / "difficulty" / f"{hashlib.sha256(raw).hexdigest()[:16]}.json"
    if not dst.exists():
        write_atomic(dst, lambda tmp: Path(tmp).write_bytes(raw))
    try:
        data = load_difficulty(dst)
        check_setting(data, f"curriculum.difficulty {c['difficulty']}", timesteps=d["timesteps"],
                      num_clusters=c["num_clusters"], clustering=c["clustering"], schedule=d["schedule"])
        ranking(data, c["difficulty_measure"], c["num_clusters"])
    except ValueError as e:
        raise PacerayError(one_line(str(e))) from None
    return {**config, "curriculum": {**c, "difficulty": str(dst)}}
