"""Export a checkpoint's EMA weights as a diffusers pipeline folder (`DDPMPipeline.from_pretrained`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from paceray.protocol import PacerayError, one_line
from trainables.denoiser.config import Config
from trainables.denoiser.train import CHECKPOINT_FILE, PACK_FILE
from trainables.diffusion.diffusion import GaussianDiffusion
from trainables.diffusion.model import EMA, build_model


def load_checkpoint_model(checkpoint_dir: str | Path, config: dict):
    """The UNet of a paceray checkpoint, with its EMA weights (what the FID evals sampled with)."""
    cfg = Config.model_validate(config)
    state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    weight = state["model"]["conv_in.weight"]
    num_class_embeds = state["model"].get("class_embedding.weight")
    num_classes = None if num_class_embeds is None else num_class_embeds.shape[0] - 1
    model = build_model(cfg.model.preset, cfg.data.image_size, weight.shape[1], num_classes)
    model.load_state_dict(state["model"])
    ema = EMA(model, decay=cfg.train.ema_decay)
    ema.load_state_dict(state["ema"])
    ema.copy_to(model)
    return model.eval(), cfg


def export(checkpoint_dir: str, config: dict, out_dir: str) -> str:
    model, cfg = load_checkpoint_model(checkpoint_dir, config)
    scheduler = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule).scheduler
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(out_dir)
    return out_dir


REQUIRED = ("step", "model", "ema", "optimizer", "curriculum", "world")


def check_checkpoint(checkpoint_dir: str | Path) -> None:
    """Readable, and holding everything a resume restores (for a packed trial's: every live arm's
    state); else one line naming the file."""
    pack_file = Path(checkpoint_dir) / PACK_FILE
    if pack_file.exists():
        try:
            pack = json.loads(pack_file.read_text())
            ended = set(pack.get("failed", {})) | set(pack.get("stopped", {}))
        except (ValueError, AttributeError):
            raise PacerayError(f"{pack_file}: corrupted (not the JSON a packed checkpoint writes)") from None
        arms = sorted(p.name for p in Path(checkpoint_dir).iterdir() if p.is_dir())
        if not arms and not ended:
            raise PacerayError(f"{checkpoint_dir}: a packed checkpoint without any arm's state")
        for arm in arms:
            _check_state(Path(checkpoint_dir) / arm)
        return
    _check_state(Path(checkpoint_dir))


def _check_state(folder: Path) -> None:
    path = folder / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PacerayError(f"{path}: checkpoint file missing") from None
    except Exception as e:  # truncated or overwritten: torch raises many kinds
        raise PacerayError(one_line(f"{path}: corrupted checkpoint ({type(e).__name__})")) from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise PacerayError(f"{path}: not a paceray checkpoint (missing {', '.join(missing)})")
