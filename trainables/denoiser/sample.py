"""`paceray sample EXPORT`: images from an exported denoiser (a search's `best/pipeline`, or any
folder `export` wrote: a diffusers UNet and its DDPM scheduler), as a grid PNG with a JSON beside
it saying what was drawn. An unconditional model takes no condition; a class-conditional one
takes `--label` (one class for every image, or none: classifier-free unconditional samples) and
`--guidance`. Text-conditioned models (`--prompt`) are not trained by paceray yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from paceray.protocol import PacerayError, one_line

SCHEDULE_OF = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' beta_schedule -> ours


@dataclass(frozen=True)
class SampleRequest:
    export: Path
    n: int = 16
    steps: int = 50
    label: Optional[int] = None
    prompt: Optional[str] = None
    guidance: float = 1.0
    seed: int = 0


def classes_of(folder: Path) -> Optional[int]:
    """The class count of an exported UNet (None: unconditional), from its config alone, so a
    condition it cannot take is refused before its weights load; or one line naming what is missing."""
    for part in ("unet", "scheduler"):
        if not (folder / part).is_dir():
            raise PacerayError(f"{folder}: no {part}/ folder; give a folder `paceray tune` exported "
                               f"(the parent run's best/pipeline) or a DDPMPipeline.save_pretrained one")
    try:
        embeds = json.loads((folder / "unet" / "config.json").read_text()).get("num_class_embeds")
    except (OSError, ValueError) as e:
        raise PacerayError(one_line(f"{folder}/unet/config.json: unreadable ({e})")) from None
    return None if embeds is None else int(embeds) - 1  # the last row is the null label


def load_export(folder: Path):
    """(UNet, GaussianDiffusion) of an exported pipeline folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    from trainables.diffusion.diffusion import GaussianDiffusion

    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and says so on stderr
        unet = UNet2DModel.from_pretrained(str(folder / "unet"), low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    except (OSError, ValueError) as e:
        raise PacerayError(one_line(f"{folder}: cannot load the exported model ({e})")) from None
    schedule = SCHEDULE_OF.get(scheduler.config.beta_schedule)
    if schedule is None:
        raise PacerayError(f"{folder}/scheduler: beta_schedule {scheduler.config.beta_schedule!r} is not one paceray "
                           f"trains ({', '.join(SCHEDULE_OF)})")
    return unet.eval(), GaussianDiffusion(scheduler.config.num_train_timesteps, schedule)


def sample(request: SampleRequest, out: Path) -> dict:
    """Draw `request.n` images, write them as one grid PNG at `out` and what was drawn as JSON
    beside it (`out` with .json); returns that record."""
    import numpy as np
    import torch
    from PIL import Image

    from trainables.denoiser.reporting import sample_grid
    from trainables.diffusion.diffusion import SampleOptions
    from trainables.diffusion.model import null_label

    classes, where = classes_of(request.export), f"{request.export}"
    if request.prompt is not None:
        raise PacerayError(f"{where}: --prompt needs a text-conditioned model; this one is "
                           f"{'class-conditional (give --label)' if classes is not None else 'unconditional'}")
    if request.label is not None and classes is None:
        raise PacerayError(f"{where}: --label needs a class-conditional model; this one is unconditional")
    if request.label is not None and not 0 <= request.label < classes:
        raise PacerayError(f"{where}: --label {request.label} is not a class of this model (0..{classes - 1})")
    if request.guidance != 1.0 and request.label is None:
        raise PacerayError(f"{where}: --guidance {request.guidance} needs --label (a class to guide towards)")
    unet, diffusion = load_export(request.export)
    null = null_label(unet)
    labels = None if request.label is None else torch.full((request.n,), request.label, dtype=torch.long)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generator = torch.Generator().manual_seed(request.seed)
    with torch.no_grad():
        images = diffusion.sample(unet, request.n, shape, request.steps,
                                  SampleOptions(labels=labels, guidance_scale=request.guidance, generator=generator))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(sample_grid(images))).save(out)
    record = {"export": str(request.export), "n": request.n, "steps": request.steps, "seed": request.seed,
              "conditioning": "class" if null is not None else "none", "label": request.label,
              "guidance": request.guidance, "image": out.name}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
