"""Diffusion math: schedules, SNR, q_sample, loss weightings, DDIM sampling, guidance, learning."""

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from trainables.diffusion.diffusion import (GaussianDiffusion, SampleOptions, guided_epsilon, min_snr_weight, p2_weight,
                                            predict_epsilon, weight_from_snr)
from trainables.diffusion.model import EMA, build_model, drop_labels




class ExactEpsilon(nn.Module):
    """The Bayes-optimal ε-predictor when the data distribution is the single point x0:
    ε = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t). DDIM driven by it must land exactly on x0."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def forward(self, x_t, t, class_labels=None):
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((x_t - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()).to(x_t.dtype)


class Zero(nn.Module):
    def forward(self, x_t, t, class_labels=None):
        return torch.zeros_like(x_t)


# ----------------------------------------------------------------- schedules


def test_linear_schedule_at_1000_is_ddpm():
    d = GaussianDiffusion(1000, "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-5)
    assert d.alphas_cumprod.dtype == torch.float64 and d.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


def test_linear_schedule_rescales_for_other_T():
    # improved-diffusion: both ends times 1000/T, so T=250 spans the same noise levels.
    d = GaussianDiffusion(250, "linear")
    assert d.betas[0].item() == pytest.approx(4e-4, rel=1e-5)
    assert d.betas[-1].item() == pytest.approx(0.08, rel=1e-5)
    full = GaussianDiffusion(1000, "linear").log_snr()
    assert d.log_snr()[-1].item() == pytest.approx(full[-1].item(), abs=0.5)
    assert d.log_snr()[0].item() == pytest.approx(full[0].item() - math.log(4), abs=0.05)


def test_linear_schedule_rejects_too_few_steps():
    with pytest.raises(ValueError, match="diffusion.timesteps"):
        GaussianDiffusion(20, "linear")
    GaussianDiffusion(21, "linear")
    GaussianDiffusion(10, "cosine")


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    d = GaussianDiffusion(T, "cosine")

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # All but the last step, where β is capped at 0.999 instead of reaching 1.
    torch.testing.assert_close(d.alphas_cumprod[:-1], expected[:-1], rtol=2e-5, atol=1e-9)
    assert d.betas[-1].item() == pytest.approx(0.999, rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 100])
def test_log_snr_strictly_decreasing(schedule, T):
    lam = GaussianDiffusion(T, schedule).log_snr()
    assert lam.dtype == torch.float64 and lam.shape == (T,)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all()


def test_snr_and_q_sample_match_formulas():
    d = GaussianDiffusion(1000, "linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        d.q_sample(x0, t, noise), (a.sqrt() * x0 + (1 - a).sqrt() * noise).float(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(d.snr(t), d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t]))
    torch.testing.assert_close(d.snr(t).log(), d.log_snr()[t])


# ----------------------------------------------------------------- loss weighting


def test_weighting_formulas_on_known_snr():
    def f64(*values):
        return torch.tensor(values, dtype=torch.float64)

    snr = f64(0.5, 1.0, 5.0, 10.0, 20.0)
    torch.testing.assert_close(min_snr_weight(snr, 5.0), f64(1, 1, 1, 0.5, 0.25))
    torch.testing.assert_close(p2_weight(snr, 1.0, 1.0), 1 / f64(1.5, 2, 6, 11, 21))
    torch.testing.assert_close(p2_weight(snr, 1.0, 0.5), f64(1.5, 2, 6, 11, 21) ** -0.5)
    torch.testing.assert_close(p2_weight(torch.tensor([3.0]), 2.0, 2.0), torch.tensor([1 / 25]))
    # Defaults: min-snr γ = 5, p2 k = 1, γ = 1.
    torch.testing.assert_close(weight_from_snr(snr, "min-snr"), min_snr_weight(snr, 5.0))
    torch.testing.assert_close(weight_from_snr(snr, "p2"), 1 / (1 + snr))
    torch.testing.assert_close(weight_from_snr(snr, "uniform"), torch.ones_like(snr))
    with pytest.raises(ValueError, match="loss.weighting"):
        weight_from_snr(snr, "snr")


def test_loss_weight_per_timestep():
    d = GaussianDiffusion(1000, "linear")
    t = torch.arange(0, 1000, 37)
    snr = d.snr(t)
    w = d.loss_weight(t, "min-snr", gamma=5.0)
    assert w.dtype == torch.float32 and w.shape == t.shape
    # Min-SNR only down-weights the low-noise (high-SNR) end.
    torch.testing.assert_close(w[snr <= 5], torch.ones_like(w[snr <= 5]))
    torch.testing.assert_close(w[snr > 5], (5 / snr[snr > 5]).float())
    torch.testing.assert_close(d.loss_weight(t, "p2", gamma=0.5, k=1.0), ((1 + snr) ** -0.5).float())


def test_training_losses_is_per_sample_epsilon_mse():
    d = GaussianDiffusion(1000, "cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    losses = d.training_losses(Zero(), x0, t, noise=noise)
    assert losses.shape == (6,)
    torch.testing.assert_close(losses, noise.square().mean(dim=(1, 2, 3)))
    # The exact predictor for a one-point data set has (numerically) zero loss.
    exact = ExactEpsilon(x0, d.alphas_cumprod)
    assert d.training_losses(exact, x0, t, noise=noise).max() < 1e-6


# ----------------------------------------------------------------- DDIM sampling


# 7 does not divide T (the leading grid), the others do (the trailing grid). One step of the
# cosine schedule is left out: from ᾱ_999 ≈ 2e-9 the x̂_0 division amplifies float32 rounding.
@pytest.mark.parametrize(
    "schedule, steps",
    [("linear", 1), ("linear", 7), ("linear", 50), ("cosine", 7), ("cosine", 25), ("cosine", 1000)],
)
def test_ddim_recovers_the_single_data_point(schedule, steps):
    d = GaussianDiffusion(1000, schedule)
    x0 = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    exact = ExactEpsilon(x0, d.alphas_cumprod)
    out = d.sample(exact, 3, (2, 4, 4), steps, SampleOptions(generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_sample_shape_range_and_determinism():
    torch.manual_seed(0)
    model = build_model("tiny", 8, 1)
    model.train()
    d = GaussianDiffusion(1000, "linear")

    def draw(seed):
        return d.sample(model, 4, (1, 8, 8), 5, SampleOptions(generator=torch.Generator().manual_seed(seed)))

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 1, 8, 8)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert model.training  # sampling switches to eval and back


def test_sampler_steps_out_of_range():
    d = GaussianDiffusion(100, "cosine")
    with pytest.raises(ValueError, match="eval.sampler_steps"):
        d.sample(Zero(), 1, (1, 4, 4), 101)


# ----------------------------------------------------------------- class conditioning


def conditional_tiny():
    torch.manual_seed(0)
    model = build_model("tiny", 8, 1, num_classes=3).eval()
    # Give the class embedding a visible effect on ε (at init it is small but nonzero).
    with torch.no_grad():
        model.class_embedding.weight.mul_(10)
    return model


def test_guidance_one_is_conditional_and_zero_is_unconditional():
    model = conditional_tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([10, 200, 600, 990])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = predict_epsilon(model, x, t, labels)
        uncond = predict_epsilon(model, x, t, torch.full_like(labels, 3))
        assert (cond - uncond).abs().max() > 1e-3
        def close(a, b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

        close(guided_epsilon(model, x, t, labels, 1.0, 3), cond)
        close(guided_epsilon(model, x, t, labels, 0.0, 3), uncond)
        close(guided_epsilon(model, x, t, labels, 3.0, 3), uncond + 3 * (cond - uncond))


def test_guided_sampling_wiring():
    model = conditional_tiny()
    d = GaussianDiffusion(1000, "linear")
    labels = torch.tensor([0, 1, 2, 0])

    def draw(**kw):
        return d.sample(model, 4, (1, 8, 8), 4, SampleOptions(generator=torch.Generator().manual_seed(5), **kw))

    unconditional = draw()  # a conditional model without labels samples with the null label
    without_guidance = draw(labels=labels, guidance_scale=0.0)
    torch.testing.assert_close(without_guidance, unconditional, rtol=1e-4, atol=1e-4)
    conditional = draw(labels=labels, guidance_scale=1.0)
    guided = draw(labels=labels, guidance_scale=3.0)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    assert not torch.allclose(guided, conditional, atol=1e-3)
    with pytest.raises(ValueError, match="class-conditional"):
        d.sample(Zero(), 4, (1, 8, 8), 4, SampleOptions(labels=labels, guidance_scale=2.0))


def test_label_dropout_fraction():
    labels = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.2, null=10, generator=torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.2) < 0.015
    assert torch.equal(dropped[~is_null], labels[~is_null])
    again = drop_labels(labels, 0.2, null=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)
    assert torch.equal(drop_labels(labels, 0.0, null=10), labels)
    assert (drop_labels(labels, 1.0, null=10) == 10).all()


# ----------------------------------------------------------------- it learns


@pytest.mark.slow
def test_denoiser_learns_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images = torch.from_numpy(load_digits().images.astype(np.float32)) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = images.unsqueeze(1)  # (1797, 1, 8, 8)
    d = GaussianDiffusion(1000, "linear")
    model = build_model("tiny", 8, 1)
    ema = EMA(model, decay=0.99)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    start = time.perf_counter()
    for _ in range(200):
        x0 = images[torch.randint(0, len(images), (64,), generator=g)]
        t = torch.randint(0, d.timesteps, (64,), generator=g)
        loss = d.training_losses(model, x0, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"digits tiny: loss first20={first:.3f} last20={last:.3f} train={train_s:.1f}s")
    assert last < 0.6 * first

    with ema.applied_to(model) as averaged:
        samples = d.sample(averaged, 64, (1, 8, 8), 20, SampleOptions(generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(samples).all() and samples.min() >= -1 and samples.max() <= 1
    # Digits are mostly background (-1): samples should be far darker than clipped noise (mean 0).
    data_mean, sample_mean = images.mean().item(), samples.mean().item()
    print(f"pixel mean: data={data_mean:.2f} samples={sample_mean:.2f}")
    assert sample_mean < 0.5 * data_mean
