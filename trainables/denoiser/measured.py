"""`curriculum.order: measured`: the clusters ordered by a difficulty probe's measurements.

`curriculum.difficulty` names a `difficulty.json` (a file) or a probe search's parent run id (its
`report/difficulty.json` artifact). `prepare` resolves it once, on the driver: it checks that the
probe measured this trial's T, N, clustering and schedule, copies the file into the storage root
(content-addressed, so every worker on every node reads the same bytes) and hands the trials that
path. `Config` only checks that a reference is given.
"""

from __future__ import annotations

from pathlib import Path

from paceray.protocol import PacerayError, PrepareContext, one_line
from trainables.denoiser.references import fetch, store
from trainables.diffusion.difficulty import DIFFICULTY_FILE, check_setting, load_difficulty, ranking

ARTIFACT = f"report/{DIFFICULTY_FILE}"


def resolve(config: dict, storage: Path, context: PrepareContext) -> dict:
    """The config with `curriculum.difficulty` replaced by the checked file in the storage root."""
    c, d = config["curriculum"], config["diffusion"]
    if c["order"] != "measured":
        return config
    dst = store(storage, "difficulty", fetch("curriculum.difficulty", c["difficulty"], ARTIFACT, context,
                                             "a finished difficulty-probe search"))
    try:
        data = load_difficulty(dst)
        check_setting(data, f"curriculum.difficulty {c['difficulty']}", timesteps=d["timesteps"],
                      num_clusters=c["num_clusters"], clustering=c["clustering"], schedule=d["schedule"])
        ranking(data, c["difficulty_measure"], c["num_clusters"])
    except ValueError as e:
        raise PacerayError(one_line(str(e))) from None
    return {**config, "curriculum": {**c, "difficulty": str(dst)}}
