"""A packed search's trials: every arm's config, expanded on the driver, grouped into packs.

With `tune.pack` (K, or `auto`) a search's arms are expanded here — the grid's canonical points
times `tune.seeds` times num_samples, or a random search's samples — and arms the trainable says
may share a trial (`Packing.key`: for the denoiser, the same data, model, steps and seed) are
grouped, in order, into packs of up to K (`auto`: see `packs`). Arms that share nothing with
others form packs of one (an ordinary trial). Each pack is one Tune trial.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Optional

from paceray.spec import space as space_lib
from paceray.spec.specfile import Distribution, LoadedSpec


def pack_size(loaded: LoadedSpec) -> Optional[int | str]:
    """The search's `tune.pack` if it packs (K > 1 or auto) and its trainable can; else None."""
    pack = loaded.spec.tune.pack
    if pack == 1 or loaded.trainable.packing is None:
        return None
    return pack


def arm_configs(loaded: LoadedSpec) -> list[dict]:
    """Every arm's full config: grid points (canonical, × seeds) × num_samples for a grid search;
    for a random search, num_samples draws of the non-grid distributions (seeded by `tune.seed`),
    each crossed with the grid and the seeds as Tune would."""
    t = loaded.spec.tune
    if t.algorithm == "grid":
        points = space_lib.grid_points(loaded) * t.num_samples
        return [space_lib.canonical(loaded, space_lib.with_point(loaded.base, p)) for p in points]
    rng = random.Random(t.seed)
    grid_keys = [k for k, d in loaded.search.items() if d.kind == "grid"]
    drawn_keys = [k for k in loaded.search if k not in grid_keys]
    seeds = space_lib.seeds(loaded) or [None]
    configs = []
    for _ in range(t.num_samples):
        drawn = {k: draw(loaded.search[k], rng) for k in drawn_keys}
        for values in itertools.product(*(loaded.search[k].args for k in grid_keys)):
            for seed in seeds:
                point = {**drawn, **dict(zip(grid_keys, values))}
                if seed is not None:
                    point[loaded.trainable.seed_path] = seed
                configs.append(space_lib.canonical(loaded, space_lib.with_point(loaded.base, point)))
    return configs


def draw(dist: Distribution, rng: random.Random) -> Any:
    """One value of a non-grid distribution: from the distribution Tune's sampler of that kind
    draws from (with Python's generator, so not Tune's values: an unpacked random search of the
    same seed draws other points)."""
    kind, args = dist.kind, dist.args
    if kind == "choice":
        return rng.choice(list(args))
    if kind == "randint":
        return rng.randrange(int(args[0]), int(args[1]))
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.uniform(float(args[0]), float(args[1]))


def packs(loaded: LoadedSpec, configs: list[dict], slots: Optional[int] = None) -> list[list[dict]]:
    """`configs` grouped by the trainable's pack key, in order of first appearance, each group cut
    into packs of up to `tune.pack` arms. `auto`: packs that fill the `slots` trials the cluster
    runs at once (all arms ÷ slots, rounded up), none larger than the trainable's `max_pack`: on
    2 slots, 4 arms train as 2 packs of 2 side by side, not one pack of 4 beside an idle slot."""
    packing, size = loaded.trainable.packing, pack_size(loaded)
    if size is None:
        return [[c] for c in configs]
    groups: dict[str, list[dict]] = {}
    for config in configs:
        groups.setdefault(packing.key(config), []).append(config)
    fill = math.ceil(len(configs) / slots) if slots else len(configs)
    out = []
    for group in groups.values():
        k = min(max(1, int(packing.max_pack(group[0]))), max(1, fill)) if size == "auto" else int(size)
        out.extend(group[i:i + k] for i in range(0, len(group), k))
    return out
