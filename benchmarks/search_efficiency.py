#!/usr/bin/env python
"""How much of a whole search's wall time is training: a spec's `paceray tune` (quick.yaml by
default) against the time its images would take at the bare loop's rate on the cores it can use.

    python benchmarks/search_efficiency.py                       # quick.yaml, CPU: ~5 minutes
    python benchmarks/search_efficiency.py --spec search_spaces/quick.yaml --set train.steps=400
    python benchmarks/search_efficiency.py --pack 2              # packed, unpacked and plain, side by side

    ideal      = images ÷ bare img/s ÷ the machine's cores
    efficiency = ideal ÷ the search's measured wall time

With --pack K (an integer or auto) one invocation times, back to back and `--repeats` times each:
the search unpacked (tune.pack 1), the search packed (tune.pack K), and benchmarks/plain_search.py
(a plain Ray Tune + Ray Train script of the same arms: no FID, MLflow or checkpoints); it prints
each one's median wall and efficiency, packed ÷ unpacked, and each search ÷ the plain script.

images: every trial's `train.steps × train.batch_size`; bare img/s: the hand-written loop of
benchmarks/throughput.py (same model, optimizer, EMA and loss; no Ray, no curriculum, no
logging) on one torch thread, as a trial's worker gets on CPU (median of `--bare-repeats`);
cores: the machine's (a search that cannot use them all, fewer trials than cores, pays for it
here). The wall time is the whole command, as a user waits for it: start-up,
the embedded MLflow server, every trial's Ray Train start, evals, the report and the export.
The search runs `--repeats` times on the embedded default (a local Ray, tracking under a
scratch run directory); the median is reported, with each run's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from throughput import bare_images_per_s  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.50
PACKED_GOALS = {"packed ÷ unpacked": 0.70, "packed efficiency": 0.60}  # reported, not gating
# --smoke: one trial (the grid pinned) of a few steps, one eval at its end, in an experiment of
# its own (a shared tracking server may hold the spec's).
SMOKE = ("tracking.experiment=search-efficiency-smoke", "curriculum.order=none", "train.steps=4", "eval.every=4", "eval.fid_samples=8", "eval.sampler_steps=2",
         "train.log_every=2", "eval.sample_grid=0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(REPO / "search_spaces" / "quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as `paceray tune --set` (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="searches to time (each takes minutes)")
    p.add_argument("--bare-repeats", type=int, default=3)
    p.add_argument("--bare-steps", type=int, default=200)
    p.add_argument("--storage", help="storage root (datasets, FID nets, statistics); default: a temp dir")
    p.add_argument("--json", dest="json_out", help="write every figure to this JSON file")
    p.add_argument("--address", help="a running Ray cluster to search on (`paceray tune --address`); default: a "
                                     "local Ray started by the command")
    p.add_argument("--tracking-uri", help="the MLflow server to track into (`paceray tune --tracking-uri`); "
                                          "default: the embedded store under a scratch run directory")
    p.add_argument("--pack", help="also time the search packed (tune.pack PACK: an integer or auto) and the "
                                  "plain Ray script of the same arms, side by side")
    p.add_argument("--smoke", action="store_true", help=f"a few steps of one trial, to prove the script runs: "
                                                        f"{' '.join(SMOKE)}; its figures mean nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.overrides = [*args.overrides, *SMOKE]
        args.repeats, args.bare_repeats, args.bare_steps = 1, 1, 5
    return args


def search_shape(loaded) -> dict:
    """Trials, images and the cores the search can use, from the spec alone."""
    searched = set(loaded.search)
    if searched & {"train.steps", "train.batch_size"}:
        raise SystemExit("search_efficiency: the spec searches train.steps or train.batch_size; "
                         "images per trial would differ (pin them with --set)")
    from paceray.spec.space import trial_count_preview

    trials = trial_count_preview(loaded)
    train = loaded.base["train"]
    cpus = os.cpu_count() or 1
    return {"trials": trials, "steps": train["steps"], "batch": train["batch_size"],
            "images": trials * train["steps"] * train["batch_size"], "usable_cores": cpus, "cpus": cpus}


def timed_search(args: argparse.Namespace, storage: Path, scratch: Path, i: int, pack: str = "") -> float:
    paceray = str(Path(sys.executable).parent / "paceray")
    cmd = [paceray, "tune", args.spec, "--run-dir", str(scratch / f"runs-{pack or 'spec'}-{i}")]
    cmd += ["--address", args.address] if args.address else []
    cmd += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    overrides = [*args.overrides, *([f"tune.pack={pack}"] if pack else [])]
    for o in overrides:
        cmd += ["--set", o]
    return timed(cmd, storage, f"search {i + 1}")


def timed(cmd: list[str], storage: Path, what: str) -> float:
    """The whole wall of `cmd` (start-up included), with the storage root; its output if it fails."""
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PACERAY_STORAGE": str(storage)})
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def timed_plain(args: argparse.Namespace, storage: Path, scratch: Path, i: int) -> float:
    """benchmarks/plain_search.py on the same arms, its whole wall (start-up included)."""
    cmd = [sys.executable, str(Path(__file__).with_name("plain_search.py")), "--spec", args.spec,
           "--storage", str(storage), "--results", str(scratch / f"plain-{i}")]
    cmd += ["--address", args.address] if args.address else []
    for o in args.overrides:
        cmd += ["--set", o]
    return timed(cmd, storage, f"plain script {i + 1}")


def side_by_side(args: argparse.Namespace, storage: Path, scratch: Path, ideal: float) -> dict:
    """Unpacked, packed and plain, interleaved per repeat (so drift on a noisy machine hits all
    three alike); medians, efficiencies and ratios."""
    walls: dict[str, list[float]] = {"unpacked": [], "packed": [], "plain": []}
    for i in range(args.repeats):
        walls["unpacked"].append(timed_search(args, storage, scratch, i, pack="1"))
        walls["packed"].append(timed_search(args, storage, scratch, i, pack=str(args.pack)))
        walls["plain"].append(timed_plain(args, storage, scratch, i))
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratio = med["packed"] / med["unpacked"]
    for kind in ("unpacked", "packed"):
        print(f"{kind:9s} median wall {med[kind]:.1f} s · efficiency {ideal / med[kind]:.1%} · "
              f"{med[kind] / med['plain']:.2f}× the plain script's {med['plain']:.1f} s")
    print(f"packed ÷ unpacked: {ratio:.2f} (goal <= {PACKED_GOALS['packed ÷ unpacked']}: "
          f"{'met' if ratio <= PACKED_GOALS['packed ÷ unpacked'] else 'NOT met'}); packed efficiency "
          f"{ideal / med['packed']:.1%} (goal >= {PACKED_GOALS['packed efficiency']:.0%}); tune.pack {args.pack}; "
          f"{args.repeats} repeat(s); load average {os.getloadavg()[0]:.2f}")
    return {"pack": args.pack, "walls": walls, "medians": med, "packed_over_unpacked": ratio,
            "efficiency_packed": ideal / med["packed"], "efficiency_unpacked": ideal / med["unpacked"],
            "packed_over_plain": med["packed"] / med["plain"], "unpacked_over_plain": med["unpacked"] / med["plain"]}


def main(argv=None) -> int:
    from paceray.protocol import PrepareContext
    from paceray.spec.specfile import load, parse_overrides

    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="paceray-efficiency-"))
    storage = Path(args.storage).expanduser().resolve() if args.storage else scratch / "storage"
    try:
        loaded = load(args.spec, parse_overrides(args.overrides))
        shape = search_shape(loaded)
        loaded.base = loaded.trainable.prepare(loaded.base, PrepareContext(storage=str(storage), tracking_uri=None))
        torch.set_num_threads(1)
        bare = [bare_images_per_s(loaded.base, storage, torch.device("cpu"), 10, args.bare_steps)
                for _ in range(args.bare_repeats)]
        bare_rate = statistics.median(bare)
        ideal = shape["images"] / bare_rate / shape["usable_cores"]
        print(f"search_efficiency {Path(args.spec).name}{''.join(' --set ' + o for o in args.overrides)}: "
              f"{shape['trials']} trials × {shape['steps']} steps × batch {shape['batch']} = {shape['images']:,} images; "
              f"bare {bare_rate:,.0f} img/s (median of {len(bare)}, 1 torch thread); {shape['usable_cores']} usable "
              f"core(s) of {shape['cpus']}: ideal {ideal:.1f} s", flush=True)
        report = {**shape, "bare_img_per_s": bare, "bare_median": bare_rate, "ideal_seconds": ideal,
                  "goal": GOAL, "spec": args.spec, "overrides": args.overrides}
        if args.pack:
            report.update(side_by_side(args, storage, scratch, ideal))
        else:
            walls = []
            for i in range(args.repeats):
                walls.append(timed_search(args, storage, scratch, i))
                print(f"search {i + 1}: wall {walls[-1]:.1f} s, efficiency {ideal / walls[-1]:.1%}", flush=True)
            wall = statistics.median(walls)
            eff = ideal / wall
            print(f"efficiency {eff:.1%} (median wall {wall:.1f} s over {len(walls)} search(es); goal >= {GOAL:.0%}: "
                  f"{'met' if eff >= GOAL else 'NOT met'}); load average {os.getloadavg()[0]:.2f}")
            report.update({"wall_seconds": walls, "efficiency": eff})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
