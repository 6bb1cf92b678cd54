#!/usr/bin/env python
"""Training throughput of the denoiser: a bare PyTorch loop against paceray's own Ray Train path.

    python benchmarks/throughput.py --quick            # CPU, digits, a few minutes
    python benchmarks/throughput.py --preset ddpm-cifar10 --dataset fashion-mnist --image-size 32 \
        --batch 128 --bf16 --json out.json             # one GPU

Prints, for one model/batch/size, alternating A B A B:
  bare  the peer a user writes by hand: same model, AdamW, grad clip, EMA and ε loss, uniform
        timesteps, no curriculum, no Ray, no logging;
  ours  the real `trainables.denoiser.train_loop`, run by `paceray.trial.trainer.trainer_for(...).fit()`
        on a local Ray with one worker and tracking off;
then the median images/s of each and ratio = median over repeats of ours/bare; the data path
alone (ImageBatches + curriculum sampler); the share of a real trial's wall time spent in
evaluation (quick.yaml by default); on CUDA the MFU. `--json OUT` writes every figure.

How both are timed, alike: torch's global optimizer-step hook (`torch.optim.optimizer.
register_optimizer_step_post_hook`) counts the training steps of the process, and the clock runs
from the end of step W (the warm-up) to the end of the last step, with the device synchronised at
both ends. Inside the Ray worker that leaves out Ray start-up, the worker's set-up, the warm-up
and the loop's obligatory final eval and checkpoint, without touching the loop under test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from efficiency import efficiency  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent

GOAL_RATIO = {"cpu": 0.97, "cuda": 0.99}
GOAL_DATA_MULTIPLE = 5.0
GOAL_EVAL_SHARE = 0.10
SETTLE_S = 5.0  # before each bare run: Ray winds the previous fit's worker down in the background
EVAL_NEVER = 10**9  # eval.every past the end: only the loop's obligatory final eval runs
QUICK = dict(warmup=10, steps=200, repeats=3)
# --smoke: every part at a few steps, to prove the script runs against the code as it is now
# (tests/test_benchmarks.py); its figures mean nothing.
SMOKE = dict(warmup=2, steps=4, repeats=1)
SMOKE_TRIAL = ["train.steps=4", "eval.every=4", "eval.fid_samples=8", "eval.sampler_steps=2", "train.log_every=2",
               "eval.sample_grid=0"]
DEFAULT = dict(warmup=30, steps=400, repeats=3)


# --------------------------------------------------------------------------- settings

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"short runs: {QUICK}")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "ddpm-cifar10"])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"],
                   help="the model's channel count follows the dataset (digits/MNISTs: 1, cifar10: 3)")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--repeats", type=int, help="A B pairs")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--threads", type=int, help="torch threads of both loops; the Ray worker gets as many CPUs "
                                               "(default: 1 on CPU, as quick.yaml)")
    p.add_argument("--parts", default="throughput,data,trial",
                   help="comma-separated subset of throughput,data,trial")
    p.add_argument("--trial", default=str(REPO / "search_spaces" / "quick.yaml"),
                   help="spec whose base config is run as one real trial for the eval share")
    p.add_argument("--trial-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override in the trial's spec, as `paceray --set` (repeatable)")
    p.add_argument("--storage", help="storage root (datasets, FID nets, statistics); default: a temp dir")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the assets of the benchmark and trial configs in --storage, then exit")
    p.add_argument("--json", dest="json_out", help="write every figure to this JSON file")
    p.add_argument("--address", help="a running Ray cluster to fit on; default: a local Ray started here")
    p.add_argument("--smoke", action="store_true", help=f"a few steps of every part ({SMOKE}; the trial with "
                                                        f"{' '.join(SMOKE_TRIAL)}): proves the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.trial_set = [*SMOKE_TRIAL, *args.trial_set]
    for key, value in (SMOKE if args.smoke else QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    unknown = args.parts - {"throughput", "data", "trial"}
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be at least 1")
    return args


def bench_config(args, steps: int) -> dict:
    """The trial config both loops train with: defaults of `Config` but for what is benchmarked,
    and an eval pushed past the end whose one obligatory run is made as cheap as the config allows."""
    from trainables.denoiser.config import Config

    return Config.model_validate({
        "data": {"dataset": args.dataset, "image_size": args.image_size},
        "model": {"preset": args.preset},
        "train": {"steps": steps, "batch_size": args.batch, "compile": args.compile,
                  "precision": "bf16" if args.bf16 else "fp32"},
        "eval": {"every": EVAL_NEVER, "fid_samples": 16, "batch_size": 16, "sampler_steps": 1, "sample_grid": 0},
    }).model_dump(mode="json")


def environment(args, threads: int) -> dict:
    import ray

    env = {"device": args.device, "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "torch_threads": threads, "load_avg_start": os.getloadavg()[0]}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


# --------------------------------------------------------------------------- timing, alike for both

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Seconds from the end of optimizer step `first` to the end of step `last` (1-based),
    counting the steps of every optimizer in this process through torch's global post-step hook;
    the device is synchronised at both ends only."""

    def __init__(self, first: int, last: int, device: torch.device):
        self.first, self.last, self.device = first, last, device
        self.count, self.start, self.end = 0, None, None

    def __enter__(self) -> "StepTimer":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.count += 1
        if self.count in (self.first, self.last):
            sync(self.device)
            if self.count == self.first:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"StepTimer saw {self.count} optimizer steps, wanted {self.last}")
        return self.end - self.start


# --------------------------------------------------------------------------- A: the bare loop

def bare_images_per_s(config: dict, storage: Path, device: torch.device, warmup: int, steps: int) -> float:
    """The hand-written peer: preloaded images indexed at random, uniform t, same model and update."""
    from trainables.denoiser.config import Config
    from trainables.diffusion.data import load_split, resize_images, to_unit_range
    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.diffusion.assets import dataset_path
    from trainables.diffusion.model import EMA, build_model

    cfg = Config.model_validate(config)
    images, _ = load_split(dataset_path(cfg.data, storage), "train")
    images = resize_images(images.to(device), cfg.data.image_size)
    model = build_model(cfg.model.preset, cfg.data.image_size, images.shape[1]).to(device)
    step_model = torch.compile(model) if cfg.train.compile else model
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    batch, bf16 = cfg.train.batch_size, cfg.train.precision == "bf16"

    def step() -> None:
        x0 = to_unit_range(images[torch.randint(len(images), (batch,), device=device)])
        t = torch.randint(cfg.diffusion.timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(step_model, x0, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update(model)

    with StepTimer(warmup, warmup + steps, device) as timer:
        for _ in range(warmup + steps):
            step()
    return steps * batch / timer.seconds


# --------------------------------------------------------------------------- B: paceray's path

def timed_train_loop(config: dict, context) -> dict:
    """Runs in the Ray Train worker: the real train_loop under a StepTimer (see the module doc)."""
    import ray.train.torch

    from trainables.denoiser import train_loop

    first = config.pop(BENCH_KEY)["timed_from_step"]
    start = time.perf_counter()
    with StepTimer(first, config["train"]["steps"], ray.train.torch.get_device()) as timer:
        train_loop(config, context)
    return {"worker_seconds": time.perf_counter() - start, "train_seconds": timer.seconds,
            "timed_from_step": first, "threads": torch.get_num_threads()}


BENCH_KEY = "benchmark"  # our part of the config the wrapper is given; train_loop never sees it


@dataclass
class Fit:
    wall_s: float  # trainer.fit() on the driver
    timing: dict  # what timed_train_loop returned
    evals: list  # (step, eval/seconds) of every eval
    metrics: dict  # the last report


class RayPath:
    """Fits through `paceray.trial.trainer.trainer_for` on the connected Ray, tracking off, each under a
    fresh name (a reused name would resume the earlier fit)."""

    def __init__(self, storage: Path, run_dir: Path):
        self.storage, self.run_dir, self.count = storage, run_dir, 0

    def fit(self, config: dict, resources, timed_from_step: int, keep: int = 2) -> Fit:
        from paceray.base.paths import RunDir
        from paceray.protocol import TrialContext
        from paceray.trial.trainer import FitPlan, trainer_for

        self.count += 1
        name = f"bench-{self.count:03d}"
        ctx = TrialContext(trial_id="bench", run_id=None, tracking_uri=None, storage=str(self.storage),
                           run_dir=str(self.run_dir), metric="eval/fid", console_progress=False)
        config = {**config, BENCH_KEY: {"timed_from_step": timed_from_step}}
        # max_failures=0: a retried worker would resume from a checkpoint and skew the timing.
        bench = SimpleNamespace(train_loop=timed_train_loop, checkpoints_to_keep=lambda _config: keep)
        plan = FitPlan(bench, config, resources.model_copy(update={"max_failures": 0}),
                       RunDir(self.run_dir).ray_results, name, context={})
        trainer = trainer_for(plan, ctx)
        start = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - start
        evals = sorted((m["step"], m["eval/seconds"]) for _, m in result.best_checkpoints or [])
        shutil.rmtree(RunDir(self.run_dir).ray_results / name, ignore_errors=True)  # big models: GBs of checkpoints
        return Fit(wall, result.return_value, evals, result.metrics)


def throughput(args, storage: Path, ray_path: RayPath, resources, device: torch.device, threads: int) -> dict:
    config = bench_config(args, args.warmup + args.steps)
    bare, ours, fits = [], [], []
    for repeat in range(1, args.repeats + 1):
        time.sleep(SETTLE_S)
        bare.append(bare_images_per_s(config, storage, device, args.warmup, args.steps))
        release(device)
        fit = ray_path.fit(config, resources, timed_from_step=args.warmup)
        ours.append(args.steps * args.batch / fit.timing["train_seconds"])
        fits.append({"wall_s": fit.wall_s, **fit.timing})
        print(f"  repeat {repeat}: bare {bare[-1]:9,.0f} img/s   ours {ours[-1]:9,.0f} img/s   "
              f"ours/bare {ours[-1] / bare[-1]:.3f}   (fit {fit.wall_s:.1f} s wall)", flush=True)
        if fit.timing["threads"] != threads and device.type == "cpu":
            print(f"  note: the Ray worker ran {fit.timing['threads']} torch threads, the bare loop {threads}")
    ratio = statistics.median(o / b for o, b in zip(ours, bare))
    goal = GOAL_RATIO[device.type]
    out = {"bare_img_per_s": bare, "ours_img_per_s": ours, "ours_fits": fits,
           "bare_median": statistics.median(bare), "ours_median": statistics.median(ours),
           "ratio": ratio, "ratio_goal": goal, "ratio_met": ratio >= goal}
    print(f"bare  median {out['bare_median']:9,.0f} img/s")
    print(f"ours  median {out['ours_median']:9,.0f} img/s")
    print(f"ratio {ratio:.3f}  (median of ours/bare over {len(ours)} pairs; goal >= {goal} on "
          f"{device.type.upper()}: {'met' if out['ratio_met'] else 'NOT met'})", flush=True)
    out.update(efficiency(config, storage, device, out))
    return out


def release(device: torch.device) -> None:
    """Hand the bare loop's cached GPU memory back before the Ray worker takes the same GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the data path

def data_path_images_per_s(config: dict, storage: Path, device: torch.device, steps: int) -> float:
    """ImageBatches + the curriculum sampler's sample() and advance(), as the loop calls them."""
    from trainables.diffusion import curriculum
    from trainables.denoiser.config import Config
    from trainables.diffusion.data import ImageBatches, load_split
    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.diffusion.assets import dataset_path

    cfg = Config.model_validate(config)
    images, labels = load_split(dataset_path(cfg.data, storage), "train")
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device)
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    sampler = curriculum.from_config(cfg.curriculum, cfg.diffusion.timesteps, diffusion.log_snr())

    def step():
        x0, _ = next(batches)
        t = sampler.sample(x0.shape[0], device)
        sampler.advance()
        return x0, t

    for _ in range(10):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


# --------------------------------------------------------------------------- a real trial

def trial_eval_share(spec_path: str, overrides: list[str], ray_path: RayPath, warmup: int) -> dict:
    """One trial of a spec's base config (+ overrides) with the spec's resources, as `paceray
    train` runs it but with tracking off: evaluation seconds against the trial's wall time
    (trainer.fit() on the driver, the trial's Ray start-up included)."""
    from paceray.spec.specfile import load, parse_overrides

    loaded = load(spec_path, parse_overrides(overrides))
    config, res = loaded.base, loaded.spec.resources
    steps, batch = config["train"]["steps"], config["train"]["batch_size"]
    first = min(warmup, steps - 1)
    evals = -(-steps // config["eval"]["every"])
    fit = ray_path.fit(config, res, first,
                       keep=evals + 1)  # keep every eval's report
    eval_s = sum(seconds for _, seconds in fit.evals)
    # Evals after step `first` and before the last step ran inside the timed window.
    timed_eval_s = sum(seconds for step, seconds in fit.evals if first <= step < steps)
    out = {"spec": str(spec_path), "overrides": overrides, "steps": steps, "batch": batch, "evals": fit.evals,
           "eval_seconds": eval_s, "wall_seconds": fit.wall_s, "worker_seconds": fit.timing["worker_seconds"],
           "eval_share": eval_s / fit.wall_s, "eval_share_goal": GOAL_EVAL_SHARE,
           "final_fid": fit.metrics.get("eval/fid"), "fid_features": fit.metrics.get("fid_features"),
           "fid_samples": fit.metrics.get("fid_samples"),
           # Steps after `first`; checkpoint writes at the evals in between are in it.
           "train_img_per_s": (steps - first) * batch / (fit.timing["train_seconds"] - timed_eval_s)}
    met = "met" if out["eval_share"] <= GOAL_EVAL_SHARE else "NOT met"
    print(f"trial {Path(spec_path).name}{''.join(' --set ' + o for o in overrides)}: {steps} steps, "
          f"{len(fit.evals)} evals of {out['fid_samples']} samples: eval {eval_s:.1f} s of {fit.wall_s:.1f} s wall = "
          f"{out['eval_share']:.1%} (goal <= {GOAL_EVAL_SHARE:.0%}: {met}); final FID {out['final_fid']:.3f} "
          f"({out['fid_features']}); training {out['train_img_per_s']:,.0f} img/s after step {first}", flush=True)
    return out


# --------------------------------------------------------------------------- main

def prepare(args, storage: Path) -> None:
    """Dataset, FID net and reference statistics of every config this run trains, before timing."""
    from paceray.protocol import PrepareContext
    from paceray.spec.specfile import load, parse_overrides
    from trainables.denoiser import prepare as prepare_assets

    context = PrepareContext(storage=str(storage), tracking_uri=None)
    if args.parts & {"throughput", "data"} or args.prepare_only:
        prepare_assets(bench_config(args, 1), context)
    if "trial" in args.parts:
        prepare_assets(load(args.trial, parse_overrides(args.trial_set)).base, context)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # as the loop does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scratch = Path(tempfile.mkdtemp(prefix="paceray-bench-"))
    storage = Path(args.storage).expanduser().resolve() if args.storage else scratch / "storage"
    try:
        prepare(args, storage)
        if args.prepare_only:
            print(f"prepared in {storage}")
            return 0
        report = run(args, storage, scratch / "runs", device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def cpu_threads(args, device: torch.device) -> int:
    """Torch threads of the bare loop, and the CPUs (so threads) Ray gives the worker. On CPU the
    default is 1, as quick.yaml's `cpus_per_worker: 1`: with every core busy training, Ray's own
    processes would take their share from the worker alone (try --threads with all cores)."""
    if args.threads:
        return args.threads
    return 1 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def run(args, storage: Path, run_dir: Path, device: torch.device) -> dict:
    from paceray.cluster import connect as raycluster
    from paceray.spec.specfile import ResourcesSection

    threads = cpu_threads(args, device)
    torch.set_num_threads(threads)
    raycluster.connect(args.address) if args.address else raycluster.connect(num_cpus=os.cpu_count())
    ray_path = RayPath(storage, run_dir)
    report = {"environment": environment(args, threads)}
    print_environment(report["environment"])
    try:
        if args.parts & {"throughput", "data"}:
            report["settings"] = settings(args)
        if "throughput" in args.parts:
            resources = ResourcesSection(workers=1, cpus_per_worker=float(threads),
                                         gpus_per_worker=1.0 if device.type == "cuda" else 0.0)
            report["throughput"] = throughput(args, storage, ray_path, resources, device, threads)
        if "data" in args.parts:
            report["data_path"] = data_part(args, storage, device, report.get("throughput"))
        if "trial" in args.parts:
            report["trial"] = trial_eval_share(args.trial, args.trial_set, ray_path, args.warmup)
    finally:
        raycluster.shutdown()
    report["environment"]["load_avg_end"] = os.getloadavg()[0]
    print(f"load average at the end {report['environment']['load_avg_end']:.2f}")
    return report


def print_environment(e: dict) -> None:
    gpu = f" ({e['gpu']})" if "gpu" in e else ""
    print(f"paceray throughput: {e['device']}{gpu}, torch {e['torch']}, ray {e['ray']}, python {e['python']}, "
          f"{e['cpus']} CPUs, {e['torch_threads']} torch threads per loop, load average {e['load_avg_start']:.2f}",
          flush=True)


def settings(args) -> dict:
    s = {"preset": args.preset, "dataset": args.dataset, "image_size": args.image_size, "batch": args.batch,
         "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "bf16": args.bf16,
         "compile": args.compile, "quick": args.quick}
    print(f"{s['preset']} UNet, {s['dataset']} at {s['image_size']}x{s['image_size']}, batch {s['batch']}, "
          f"{s['warmup']} warm-up + {s['steps']} timed steps, {'bf16' if s['bf16'] else 'fp32'}, "
          f"{'torch.compile' if s['compile'] else 'eager'}, {s['repeats']} repeats", flush=True)
    return s


def data_part(args, storage: Path, device: torch.device, throughput_report: dict | None) -> dict:
    rate = data_path_images_per_s(bench_config(args, 1), storage, device, max(args.steps, 200))
    if throughput_report is None:
        print(f"data path alone {rate:,.0f} img/s")
        return {"img_per_s": rate}
    multiple = rate / throughput_report["ours_median"]
    met = "met" if multiple >= GOAL_DATA_MULTIPLE else "NOT met"
    print(f"data path alone {rate:,.0f} img/s = {multiple:,.1f}x our training rate "
          f"(goal >= {GOAL_DATA_MULTIPLE:.0f}x: {met})")
    return {"img_per_s": rate, "multiple_of_ours": multiple, "goal": GOAL_DATA_MULTIPLE}


if __name__ == "__main__":
    sys.exit(main())
