"""The denoiser network (diffusers' UNet2DModel in named presets), class labels and weight EMA.

Class conditioning follows classifier-free guidance (Ho & Salimans): the embedding table has
`num_classes + 1` rows and the last row is the null label, so one network learns both the
conditional and the unconditional ε; `drop_labels` swaps labels for the null label during
training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# diffusers is imported where a network is built, not at module import: the driver imports this
# module for the preset check alone (prepare), and importing diffusers costs it ~3 s per command.

# Each preset is UNet2DModel kwargs without the data-dependent ones (size, channels, classes).
# Down/up block lists mirror each other: diffusers walks the up path in reverse.
PRESETS: dict[str, dict] = {
    # CPU tests: 8x8 and 16x16 in a few ms per step; one downsample, no attention.
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        norm_num_groups=8,
    ),
    # Quick CPU runs at 16x16-32x32 (digits, MNIST): attention only at the bottleneck.
    "small": dict(
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=8,
    ),
    # Fashion-MNIST / CIFAR-10 on one GPU: DDPM's layout at half width, attention one level down.
    "base": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
    ),
    # Ho et al. 2020, CIFAR-10 (35.7M parameters): the config of google/ddpm-cifar10-32,
    # attention at 16x16 (the second level of a 32x32 input), dropout 0.1.
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        dropout=0.1,
    ),
}


# Text-conditioned presets: UNet2DConditionModel kwargs without the data-dependent ones (size,
# channels, the text encoder's width). Cross-attention on the caption's hidden states wherever
# attention is, and at the bottleneck.
TEXT_PRESETS: dict[str, dict] = {
    # CPU tests at 8x8-16x16: cross-attention at the first level and the bottleneck.
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    # One GPU at 28x28-32x32 (Fashion-MNIST, CIFAR-10): cross-attention at the two lower levels.
    "base": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=32,
        dropout=0.1,
    ),
}


def build_text_model(preset: str, image_size: int, channels: int, cross_attention_dim: int) -> nn.Module:
    """A UNet2DConditionModel predicting ε from x_t, t and a caption's hidden states (B, L,
    cross_attention_dim), in one of TEXT_PRESETS."""
    from diffusers import UNet2DConditionModel

    if preset not in TEXT_PRESETS:
        raise ValueError(f"model.preset={preset!r} has no text-conditioned form; choose one of {sorted(TEXT_PRESETS)}")
    kwargs = dict(TEXT_PRESETS[preset])
    factor = 2 ** (len(kwargs["block_out_channels"]) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(f"model.preset={preset!r} (text) halves the resolution {factor.bit_length() - 1} times, so "
                         f"data.image_size must be a multiple of {factor}, got {image_size}")
    return UNet2DConditionModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                cross_attention_dim=cross_attention_dim, **kwargs)


def num_downsamples(preset: str) -> int:
    # Every block but the last halves the resolution.
    return len(_preset_kwargs(preset)["block_out_channels"]) - 1


def check_image_size(preset: str, image_size: int) -> dict:
    """The preset's UNet arguments, once `image_size` is known to fit its downsampling."""
    kwargs, halvings = _preset_kwargs(preset), num_downsamples(preset)
    factor = 2 ** halvings
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"model.preset={preset!r} halves the resolution {halvings} times, so "
            f"data.image_size must be a multiple of {factor}, got {image_size}; "
            "pick another preset or image size"
        )
    return kwargs


def build_model(
    preset: str, image_size: int, channels: int, num_classes: int | None = None
) -> "UNet2DModel":
    """A UNet2DModel predicting ε; class-conditional (with a null label) when num_classes is set."""
    from diffusers import UNet2DModel

    kwargs = check_image_size(preset, image_size)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None (unconditional), got {num_classes}")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        **kwargs,
    )


def _preset_kwargs(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[preset])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def null_label(model: nn.Module) -> int | None:
    """The label index that means "no class" (the last embedding row); None if unconditional."""
    num_class_embeds = getattr(getattr(unwrap(model), "config", None), "num_class_embeds", None)
    return None if num_class_embeds is None else num_class_embeds - 1


def drop_labels(
    labels: torch.Tensor, p: float, null: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null` with probability p, so the model also learns ε unconditionally."""
    if p <= 0:
        return labels
    rng_device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=rng_device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


class EMA:
    """Exponential moving average of a model's weights (diffusers' EMAModel).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs
    already have a useful average instead of one stuck near the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        from diffusers.training_utils import EMAModel

        parameters = list(unwrap(model).parameters())
        self.device = parameters[0].device
        self.averaged = EMAModel(parameters, decay=decay, min_decay=0.0, foreach=True)

    @property
    def updates(self) -> int:
        return self.averaged.optimization_step

    def update(self, model: nn.Module) -> None:
        self.averaged.step(unwrap(model).parameters())

    def copy_to(self, model: nn.Module) -> None:
        self.averaged.copy_to(unwrap(model).parameters())

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """The unwrapped model holding the averaged weights; its own weights come back on exit."""
        plain = unwrap(model)
        self.averaged.store(plain.parameters())
        self.averaged.copy_to(plain.parameters())
        try:
            yield plain
        finally:
            self.averaged.restore(plain.parameters())

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
        # A checkpoint may have been loaded onto another device (map_location="cpu").
        self.averaged.to(device=self.device)
