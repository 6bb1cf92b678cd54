"""UNet presets, size validation, unwrapping DDP / torch.compile, and the weight EMA."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainables.diffusion.model import EMA, PRESETS, build_model, count_parameters, null_label, num_downsamples, unwrap




def forward(model, x, labels=None):
    t = torch.randint(0, 1000, (x.shape[0],))
    with torch.no_grad():
        return model(x, t, class_labels=labels).sample


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 1), (16, 3)])
def test_tiny_forward_shapes(size, channels):
    model = build_model("tiny", size, channels).eval()
    x = torch.randn(2, channels, size, size)
    assert forward(model, x).shape == x.shape
    assert null_label(model) is None


@pytest.mark.parametrize("preset, size", [("small", 16), ("small", 28), ("base", 28), ("base", 32)])
def test_larger_presets_forward(preset, size):
    model = build_model(preset, size, 1).eval()
    x = torch.randn(1, 1, size, size)
    assert forward(model, x).shape == x.shape


def test_class_conditional_forward():
    torch.manual_seed(0)
    model = build_model("tiny", 8, 1, num_classes=10).eval()
    assert model.config.num_class_embeds == 11 and null_label(model) == 10
    x = torch.randn(3, 1, 8, 8).repeat(2, 1, 1, 1)
    t = torch.full((6,), 500)
    with torch.no_grad():
        out = model(x, t, class_labels=torch.tensor([0, 4, 9, 10, 10, 10])).sample
    assert out.shape == x.shape
    # The label changes ε; the null label is a class of its own.
    assert not torch.allclose(out[:3], out[3:], atol=1e-6)


def test_ddpm_cifar10_has_ddpm_parameter_count():
    with torch.device("meta"):
        model = build_model("ddpm-cifar10", 32, 3)
    assert count_parameters(model) == pytest.approx(35.7e6, rel=0.01)
    assert num_downsamples("ddpm-cifar10") == 3


def test_parameter_counts_grow_with_preset():
    counts = []
    for name in ["tiny", "small", "base", "ddpm-cifar10"]:
        with torch.device("meta"):
            counts.append(count_parameters(build_model(name, 32, 3)))
    assert counts == sorted(counts) and counts[0] < 1e6 and 1e6 < counts[1] < 1e7


@pytest.mark.parametrize(
    "preset, size", [("ddpm-cifar10", 28), ("ddpm-cifar10", 4), ("small", 10), ("tiny", 9)]
)
def test_invalid_image_size_names_the_fields(preset, size):
    with pytest.raises(ValueError, match="model.preset") as err:
        build_model(preset, size, 1)
    assert "data.image_size" in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="model.preset='huge'"):
        build_model("huge", 32, 3)
    assert set(PRESETS) == {"tiny", "small", "base", "ddpm-cifar10"}


# ----------------------------------------------------------------- wrappers and EMA


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_ddp_and_compile(single_process_group):
    model = build_model("tiny", 8, 1)
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap(ddp) is model
    assert unwrap(torch.compile(model)) is model  # compiles lazily: nothing is traced here
    assert unwrap(torch.compile(ddp)) is model
    assert unwrap(model) is model
    assert count_parameters(ddp) == sum(p.numel() for p in model.parameters())


def fill(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def first_param(model):
    return next(unwrap(model).parameters()).detach().clone()


def test_ema_follows_the_warmup_decay(single_process_group):
    model = build_model("tiny", 8, 1)
    wrapped = torch.compile(nn.parallel.DistributedDataParallel(model))
    ema = EMA(wrapped, decay=0.9)
    fill(model, 1.0)
    ema.update(wrapped)  # the first update copies the weights (decay 0)
    fill(model, 3.0)
    ema.update(wrapped)  # then decay = min(0.9, (1 + n) / (10 + n)) with n = 1: 2/11
    fill(model, 5.0)
    expected = 2 / 11 * 1.0 + 9 / 11 * 3.0
    with ema.applied_to(wrapped) as averaged:
        assert averaged is model
        torch.testing.assert_close(first_param(model), torch.full_like(first_param(model), expected))
    torch.testing.assert_close(first_param(model), torch.full_like(first_param(model), 5.0))
    for _ in range(200):
        ema.update(model)
    assert ema.averaged.cur_decay_value == pytest.approx(0.9)
    assert ema.updates == 202


def test_ema_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 8, 1)
    ema = EMA(model, decay=0.5)
    for value in (0.1, 0.2, 0.3):
        fill(model, value)
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    restored = EMA(build_model("tiny", 8, 1), decay=0.5)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True, map_location="cpu"))
    assert restored.updates == 3
    a, b = build_model("tiny", 8, 1), build_model("tiny", 8, 1)
    ema.copy_to(a)
    restored.copy_to(b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # Averaged, not the last weights: 0.3 is not what the EMA holds.
    assert not torch.allclose(first_param(a), torch.full_like(first_param(a), 0.3))
