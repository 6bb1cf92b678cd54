"""`difficulty.json`: what a probe search measured per cluster, and the order it implies.

Written by the probe's report into the search's parent run (`report/difficulty.json`); read by
the denoiser's `curriculum.order: measured`. Pure JSON: no torch, no pandas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

DIFFICULTY_FILE = "difficulty.json"
FORMAT = "paceray.difficulty/1"
MEASURES = ("convergence_steps", "kl")  # easiest first = smallest first, for both
# What must agree between the probe and a trial that uses its ranking.
SETTING = ("timesteps", "num_clusters", "clustering", "schedule")


def load_difficulty(path: str | Path) -> dict:
    """A difficulty.json, checked; ValueError with what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable difficulty file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not data.get("clusters"):
        raise ValueError(f"{path}: not a paceray difficulty file (format {FORMAT}, written by a probe search's report)")
    return data


def ranking(data: dict, measure: str, num_clusters: Optional[int] = None) -> list[int]:
    """0-based cluster indices, easiest (smallest `measure`) first; ties by cluster number."""
    if measure not in MEASURES:
        raise ValueError(f"difficulty measure {measure!r}: use one of {', '.join(MEASURES)}")
    clusters = data["clusters"]
    n = num_clusters or data.get("num_clusters")
    if sorted(c["cluster"] for c in clusters) != list(range(1, (n or 0) + 1)):
        raise ValueError(f"the difficulty file covers clusters {sorted(c['cluster'] for c in clusters)}, "
                         f"not all of 1..{n}: finish the probe search first")
    values = [c[measure] for c in clusters]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"the difficulty file has a non-finite {measure}")
    return [c["cluster"] - 1 for c in sorted(clusters, key=lambda c: (c[measure], c["cluster"]))]


def check_setting(data: dict, where: str, **trial) -> None:
    """ValueError naming every setting in which the probe and the trial differ."""
    differ = [f"{k} {data.get(k)!r} (probe) vs {trial[k]!r} (trial)" for k in SETTING if data.get(k) != trial[k]]
    if differ:
        raise ValueError(f"{where}: the probe measured another curriculum setting: {'; '.join(differ)}")
