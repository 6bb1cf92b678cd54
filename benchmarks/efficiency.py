"""The FLOPs of one training step of the denoiser and the MFU they imply on CUDA, for
benchmarks/throughput.py (imported only on its driver side: Ray workers do not have this folder
on their path)."""

from __future__ import annotations

from pathlib import Path

import torch

# Dense bf16 tensor-core peak (NVIDIA datasheets, without sparsity), matched in this order
# against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12))


# --------------------------------------------------------------------------- FLOPs and MFU

def flops_per_image(config: dict, channels: int, device: torch.device, batch: int = 4) -> float:
    """FLOPs of one forward + backward of the ε loss, per image (the optimizer's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.denoiser.config import Config
    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.diffusion.model import build_model

    cfg = Config.model_validate(config)
    model = build_model(cfg.model.preset, cfg.data.image_size, channels).to(device)
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    x0 = torch.randn(batch, channels, cfg.data.image_size, cfg.data.image_size, device=device)
    t = torch.randint(cfg.diffusion.timesteps, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        diffusion.training_losses(model, x0, t).mean().backward()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device) -> tuple[str, float] | None:
    name = torch.cuda.get_device_name(device)
    return next(((key, peak) for key, peak in PEAK_BF16_FLOPS if key in name), None)


def efficiency(config: dict, storage: Path, device: torch.device, rates: dict) -> dict:
    from trainables.denoiser.config import Config
    from trainables.diffusion.data import read_manifest
    from trainables.diffusion.assets import dataset_path

    data_dir = dataset_path(Config.model_validate(config).data, storage)
    flops = flops_per_image(config, read_manifest(data_dir)["image_shape"][0], device)
    out = {"flops_per_image": flops}
    print(f"FLOPs per image, forward + backward: {flops / 1e9:.3f} GFLOP")
    if device.type != "cuda":
        return out
    peak = peak_flops(device)
    if peak is None:
        print(f"MFU: no peak bf16 FLOP/s known for {torch.cuda.get_device_name(device)}")
        return out
    out.update({"peak_assumed": peak[0], "peak_bf16_flops": peak[1],
                "mfu_bare": flops * rates["bare_median"] / peak[1], "mfu_ours": flops * rates["ours_median"] / peak[1]})
    print(f"MFU (peak assumed: {peak[0]}, {peak[1] / 1e12:.0f} TFLOP/s dense bf16): "
          f"bare {out['mfu_bare']:.1%}, ours {out['mfu_ours']:.1%}")
    return out
