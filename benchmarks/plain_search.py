#!/usr/bin/env python
"""The peer a paceray search is measured against: a plain Ray Tune + Ray Train script of the same
arms — the same model, optimizer, EMA, loss, steps, batch and worker resources — with no FID,
no MLflow, no checkpoints and no curriculum (uniform timesteps: a curriculum's draw costs nothing
next to a step). One Tune trial per arm, as many at once as the cluster holds.

    python benchmarks/plain_search.py --spec search_spaces/quick.yaml [--set KEY=VALUE ...]

Prints the wall time of the whole script (start-up included) and writes it to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plain_train_loop(config: dict) -> None:
    """Each rank: the bare step of benchmarks/throughput.py on its shard, `train.steps` times.
    Written out here, not imported: this runs on Ray's workers, whose path holds the installed
    packages but not benchmarks/ (cloudpickle ships this function by value)."""
    import ray.train
    import ray.train.torch
    import torch

    from trainables.denoiser.config import Config
    from trainables.diffusion.assets import dataset_path
    from trainables.diffusion.data import load_split, resize_images, to_unit_range
    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.diffusion.model import EMA, build_model

    cfg, storage = Config.model_validate(config["arm"]), Path(config["storage"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed * 1000 + ctx.get_world_rank())
    images, _ = load_split(dataset_path(cfg.data, storage), "train", ctx.get_world_rank(), ctx.get_world_size())
    images = resize_images(images.to(device), cfg.data.image_size)
    model = build_model(cfg.model.preset, cfg.data.image_size, images.shape[1]).to(device)
    ema = EMA(model, decay=cfg.train.ema_decay)
    step_model = ray.train.torch.prepare_model(model) if ctx.get_world_size() > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    batch = cfg.train.batch_size
    for _ in range(cfg.train.steps):
        x0 = to_unit_range(images[torch.randint(len(images), (batch,), device=device)])
        t = torch.randint(cfg.diffusion.timesteps, (batch,), device=device)
        loss = diffusion.training_losses(step_model, x0, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update(model)
    ray.train.report({"done": 1})


def run_arm(config: dict) -> None:
    """One Tune trial: a TorchTrainer of the arm, with the spec's worker resources."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = config["resources"]
    TorchTrainer(plain_train_loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=r["workers"], use_gpu=r["gpus_per_worker"] > 0,
                                              resources_per_worker={"CPU": r["cpus_per_worker"],
                                                                    **({"GPU": r["gpus_per_worker"]}
                                                                       if r["gpus_per_worker"] else {})}),
                 run_config=RunConfig(storage_path=config["results"], name=f"arm-{config['index']}")).fit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(REPO / "search_spaces" / "quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", required=True, help="the storage root holding the prepared dataset")
    p.add_argument("--results", required=True, help="a scratch folder for Ray's results")
    p.add_argument("--address", help="a running Ray cluster; default: a local Ray")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    start = time.perf_counter()
    import ray
    from ray import tune

    from paceray.spec import packs
    from paceray.spec.specfile import load, parse_overrides

    loaded = load(args.spec, parse_overrides(args.overrides))
    arms = packs.arm_configs(loaded)
    res = loaded.spec.resources
    ray.init(address=args.address, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 1)
    at_once = max(1, int(cpus // (res.workers * res.cpus_per_worker)))
    space = {"index": tune.grid_search(list(range(len(arms))))}
    settings = {"storage": args.storage, "results": args.results, "resources": res.model_dump()}

    def trainable(c: dict) -> None:
        run_arm({**c, **settings, "arm": arms[c["index"]]})

    tune.Tuner(tune.with_resources(trainable, {"CPU": 0, "memory": 2**20}), param_space=space,
               tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
               run_config=tune.RunConfig(storage_path=args.results, name="plain", verbose=0)).fit()
    wall = time.perf_counter() - start
    print(f"plain Ray Tune + Ray Train: {len(arms)} arm(s), {at_once} at once: wall {wall:.1f} s", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"arms": len(arms), "wall_seconds": wall}) + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    sys.exit(main())
