"""A config field that names an earlier result: a local file, or an MLflow run id whose artifact
holds it. `prepare` resolves it once, on the driver, and copies the bytes into the storage root
(content-addressed, so every worker on every node reads the same file); the trials get that path.

Two fields use it: `curriculum.difficulty` (a difficulty probe's `difficulty.json`, measured.py) and
`curriculum.reference` (an easy-to-hard trial's `curriculum/schedule.json`, for `shuffled`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from paceray.protocol import PacerayError, PrepareContext, one_line, write_atomic

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SCHEDULE_ARTIFACT = "curriculum/schedule.json"


def fetch(field: str, ref: str, artifact: str, context: PrepareContext, what: str) -> bytes:
    """The bytes `ref` names: a file, or `artifact` of the run `ref` in the tracking store the
    platform reads (`context.fetch_artifact`); `what` says which run it must be."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.read_bytes()
    if not RUN_ID.match(ref):
        raise PacerayError(f"{field}: {ref}: no such file, and not an MLflow run id")
    if context.tracking_uri is None or context.fetch_artifact is None:
        raise PacerayError(f"{field}: run {ref} needs the tracking store {what} logged to "
                           f"(--tracking-uri, or the --run-dir of its embedded store)")
    try:
        return context.fetch_artifact(ref, artifact)
    except LookupError as e:  # no such run or artifact
        raise PacerayError(one_line(f"{field}: run {ref} at {context.tracking_uri} has no {artifact} "
                                    f"(is it {what}?): {str(e)[:200]}")) from None


def store(storage: Path, folder: str, raw: bytes) -> Path:
    """`raw` under storage/folder/, named by its digest; written once, atomically."""
    dst = storage / folder / f"{hashlib.sha256(raw).hexdigest()[:16]}.json"
    if not dst.exists():
        write_atomic(dst, lambda tmp: Path(tmp).write_bytes(raw))
    return dst


def resolve_shuffled_reference(config: dict, storage: Path, context: PrepareContext) -> dict:
    """`curriculum.reference` of a `shuffled` trial, checked to give the stage lengths its
    allocation needs, replaced by the copy in the storage root."""
    c = config["curriculum"]
    if c["order"] != "shuffled" or not c.get("reference"):
        return config
    from trainables.diffusion.config import CurriculumConfig
    from trainables.diffusion.curriculum import CurriculumSampler, SamplerInputs, reference_stage_lengths

    field = "curriculum.reference"
    raw = fetch(field, c["reference"], SCHEDULE_ARTIFACT, context, "a finished easy-to-hard trial")
    try:  # checked before anything is written
        lengths = reference_stage_lengths(c["reference"], raw)
        ran = json.loads(raw)
        if ran.get("order") != "easy-to-hard" or len(ran.get("clusters", [])) != c["num_clusters"]:
            raise ValueError(f"{c['reference']}: the reference must be an easy-to-hard trial with "
                             f"{c['num_clusters']} clusters, got order {ran.get('order')!r} with "
                             f"{len(ran.get('clusters', []))}")
        # The stage count (N, cumulative), not the clusters' widths, decides whether the lengths are
        # enough: uniform clusters check it without the schedule's ln SNR.
        curriculum = CurriculumConfig.model_validate({**c, "clustering": "uniform"})
        CurriculumSampler(curriculum, config["diffusion"]["timesteps"], inputs=SamplerInputs(reference_lengths=lengths))
    except ValueError as e:
        raise PacerayError(one_line(f"{field}: {e}")) from None
    return {**config, "curriculum": {**c, "reference": str(store(storage, "schedules", raw))}}
