#!/usr/bin/env python
"""Is one pass of the FID feature network over all of a pack's arms faster than one pass per arm?

    python benchmarks/feature_pass.py                       # CPU: digits classifier, 5 arms
    python benchmarks/feature_pass.py --device cuda --arms 8

At an eval each arm of a pack draws `eval.fid_samples` images, `eval.batch_size` at a time; the
arms' batches of one round can go through the feature network alone (one call per arm) or
together (one call on their concatenation: `trainables.diffusion.fid.update_together`). This
times both on the same random images, alternating, `--repeats` times, and prints the medians and
together ÷ alone. The denoiser evaluates together where the device is CUDA, alone on CPU
(trainables/denoiser/train.py `evaluate`); the digits classifier network comes from the storage
root (`--storage`), prepared there first if missing (as a digits trial prepares it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=int, default=5)
    p.add_argument("--images", type=int, default=1000, help="eval.fid_samples per arm")
    p.add_argument("--batch", type=int, default=256, help="eval.batch_size")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (a trial's worker gets its CPUs')")
    p.add_argument("--storage", default=str(Path.home() / ".cache" / "paceray"))
    args = p.parse_args(argv)
    from trainables.diffusion.fid import load_extractor

    root = Path(args.storage)
    if not sorted((root / "fid-nets").glob("digits-*.pt")):  # the digits assets, as a digits trial prepares them
        from paceray.protocol import PrepareContext
        from trainables.denoiser.config import Config
        from trainables.denoiser.features import prepare

        config = Config.model_validate({"data": {"dataset": "digits", "image_size": 8}}).model_dump()
        prepare(config, PrepareContext(storage=str(root), tracking_uri=None))
    nets = sorted((root / "fid-nets").glob("digits-*.pt"))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ext = load_extractor("classifier", dataset_dir=root / "datasets" / "digits", fid_net_path=nets[-1]).to(device)
    arms = [torch.rand(args.images, 1, 8, 8, device=device) * 2 - 1 for _ in range(args.arms)]
    rounds = range(0, args.images, args.batch)

    @torch.no_grad()
    def alone():
        for x in arms:
            for i in rounds:
                ext(x[i:i + args.batch])

    @torch.no_grad()
    def together():
        for i in rounds:
            ext(torch.cat([x[i:i + args.batch] for x in arms]))

    def timed(f) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(alone), timed(together)  # warm-up
    walls = {"alone": [], "together": []}
    for _ in range(args.repeats):
        walls["alone"].append(timed(alone))
        walls["together"].append(timed(together))
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"feature pass, {ext.feature_name.split('#')[0]} on {device} ({args.threads} thread(s) on CPU): "
          f"{args.arms} arms × {args.images} images in batches of {args.batch}; alone {med['alone'] * 1000:.1f} ms, "
          f"together {med['together'] * 1000:.1f} ms; together ÷ alone {med['together'] / med['alone']:.2f} "
          f"(median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / "platform"), str(REPO)]
    sys.exit(main())
