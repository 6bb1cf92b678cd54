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
    each crossed with the grid and the seeds as Tune would, and with the arms (which share it)."""
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
                for arm in space_lib.arm_points(loaded):
                    point = {**arm, **drawn, **dict(zip(grid_keys, values))}
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
    into packs of up to `tune.pack` arms. `auto` (see `_auto_cap`): the packs, none larger than the
    trainable's `max_pack`, that let the `slots` trials the cluster runs at once finish soonest:
    on 2 slots, 4 arms train as 2 packs of 2 side by side, not one pack of 4 beside an idle slot."""
    packing, size = loaded.trainable.packing, pack_size(loaded)
    if size is None:
        return [[c] for c in configs]
    groups: dict[str, list[dict]] = {}
    for config in configs:
        groups.setdefault(packing.key(config), []).append(config)
    if size != "auto":
        return [g[i:i + int(size)] for g in groups.values() for i in range(0, len(g), int(size))]
    limits = [max(1, int(packing.max_pack(g[0]))) for g in groups.values()]
    cap = _auto_cap([len(g) for g in groups.values()], limits, slots)
    return [part for g, limit in zip(groups.values(), limits) for part in _split(g, min(cap, limit))]


def _split(group: list, cap: int) -> list[list]:
    """`group` in order, cut into the fewest packs of at most `cap`, as equal in size as may be."""
    n_packs = math.ceil(len(group) / cap)
    sizes = [len(group) // n_packs + (1 if i < len(group) % n_packs else 0) for i in range(n_packs)]
    starts = list(itertools.accumulate([0] + sizes))
    return [group[a:b] for a, b in zip(starts, starts[1:])]


def _auto_cap(group_sizes: list[int], limits: list[int], slots: Optional[int]) -> int:
    """The largest pack a group is cut into under `auto`: the cap whose packs, started in order on
    `slots` trials at a time (Tune's FIFO), end soonest, counting a pack's time as its arm count;
    of equal ends, the one with the fewest packs (each pays a trial's start-up). Unknown slots:
    the largest packs. The five arms of each of five seeds on 2 slots: packs of 3 and 2 (all
    done after 13 arms' time per slot), not five packs of 5 (15, one slot idle at the end)."""
    largest = max(min(n, limit) for n, limit in zip(group_sizes, limits))
    if not slots:
        return largest

    def cost(cap: int) -> tuple[int, int]:
        sizes = [len(part) for n, limit in zip(group_sizes, limits)
                 for part in _split(list(range(n)), min(cap, limit))]
        free = [0] * slots  # when each slot frees up
        for size in sizes:
            free[free.index(min(free))] += size
        return max(free), len(sizes)

    return min(range(1, largest + 1), key=cost)
