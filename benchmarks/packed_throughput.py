#!/usr/bin/env python
"""Training throughput of K packed arms on one device, per-arm loop against stacked, against one
arm alone: what packing buys on a GPU (and costs on a CPU).

    python benchmarks/packed_throughput.py                                   # CPU, tiny, K = 1 2 4
    python benchmarks/packed_throughput.py --device cuda --preset ddpm-cifar10 --image-size 32 \
        --arms 1,4,8,16 --batch 128 --bf16                                   # one GPU

One step of a pack, as trainables/denoiser/train.py takes it: one batch and one noise tensor
shared by the arms, each arm its own uniform timesteps, its own model, AdamW (clipped) and EMA.
`loop`: the arms' forward and backward one after another (`train.pack_compute: loop`);
`stacked`: one vmapped forward and backward over their stacked weights (`StackedArms`,
`train.pack_compute: stacked`). Images are random (the data path is not what is measured). For
each K it prints arm-images/s (K × batch per step) of both, and their multiple of one arm alone;
on CUDA the MFU from FLOPs per image (torch.utils.flop_counter) against a dense bf16 peak
(`--peak-tflops`, 989 for H100 SXM and H200). Goal of the packed-arms issue (reported, not
gating): ≥ 3× one arm's images/s at 8 arms for the small preset on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--arms", default="1,2,4", help="comma-separated K")
    p.add_argument("--paths", default="loop,stacked")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--smoke", action="store_true", help="K = 1, 2 for 2 steps: proves the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.arms, args.steps, args.warmup, args.repeats = "1,2", 2, 1, 1
    return args


class Pack:
    """K arms of one seed's model, stepped on one shared batch and noise, loop or stacked."""

    def __init__(self, args, k: int, path: str, device: torch.device):
        import copy

        from trainables.denoiser.stacked import StackedArms
        from trainables.diffusion.diffusion import GaussianDiffusion
        from trainables.diffusion.model import EMA, build_model

        torch.manual_seed(0)
        base = build_model(args.preset, args.image_size, args.channels, None).to(device)
        self.models = [copy.deepcopy(base) for _ in range(k)]
        self.optimizers = [torch.optim.AdamW(m.parameters(), lr=2e-3) for m in self.models]
        self.emas = [EMA(m, decay=0.999) for m in self.models]
        self.stack = StackedArms(self.models, self.optimizers, lr=2e-3, weight_decay=0.0) if path == "stacked" else None
        self.diffusion, self.args, self.device = GaussianDiffusion(1000, "linear"), args, device

    def step(self) -> None:
        from trainables.diffusion.diffusion import predict_epsilon

        a, dev = self.args, self.device
        x0 = torch.rand(a.batch, a.channels, a.image_size, a.image_size, device=dev) * 2 - 1
        noise = torch.randn_like(x0)
        ts = [torch.randint(1000, (a.batch,), device=dev) for _ in self.models]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            if self.stack is not None:
                x_t = torch.stack([self.diffusion.q_sample(x0, t, noise) for t in ts])
                losses = self.stack.losses(x_t, torch.stack(ts), None, noise).mean(dim=1)
        if self.stack is not None:
            self.stack.step(losses, 2e-3, 1.0)
        else:
            for model, opt, t in zip(self.models, self.optimizers, ts):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                    eps = predict_epsilon(model, self.diffusion.q_sample(x0, t, noise), t)
                    loss = (eps.float() - noise.float()).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        for model, ema in zip(self.models, self.emas):
            ema.update(model)


def arm_images_per_s(args, k: int, path: str, device: torch.device) -> float:
    pack = Pack(args, k, path, device)
    for _ in range(args.warmup):
        pack.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        pack.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return k * args.batch * args.steps / (time.perf_counter() - start)


def flops_per_image(args, device: torch.device) -> float:
    """One forward and backward of one arm's loss, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    pack = Pack(args, 1, "loop", device)
    with FlopCounterMode(display=False) as counter:
        pack.step()
    return counter.get_total_flops() / args.batch


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    arms, paths = [int(k) for k in args.arms.split(",")], args.paths.split(",")
    rates: dict[str, dict[int, list[float]]] = {p: {k: [] for k in arms} for p in paths}
    for _ in range(args.repeats):  # every configuration once per repeat: drift hits all alike
        for k in arms:
            for path in paths:
                rates[path][k].append(arm_images_per_s(args, k, path, device))
    med = {p: {k: statistics.median(v) for k, v in by_k.items()} for p, by_k in rates.items()}
    alone = med[paths[0]][arms[0]] if arms[0] == 1 else None
    flops = flops_per_image(args, device) if device.type == "cuda" else None
    print(f"packed_throughput: {args.preset} {args.channels}x{args.image_size}px, batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {device} ({args.threads} thread(s) on CPU), median of {args.repeats}")
    report = {"settings": vars(args), "rates": rates, "medians": med, "flops_per_image": flops}
    for k in arms:
        cells = []
        for path in paths:
            rate = med[path][k]
            cell = f"{path} {rate:,.0f} arm-img/s"
            if alone:
                cell += f" ({rate / alone:.2f}× one arm)"
            if flops:
                cell += f" MFU {rate * flops / (args.peak_tflops * 1e12):.1%}"
            cells.append(cell)
        print(f"K={k:2d}: " + " · ".join(cells))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / "platform"), str(REPO)]
    sys.exit(main())
