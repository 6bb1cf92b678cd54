"""Discrete-time Gaussian diffusion (DDPM, Ho et al. 2020) with ε-prediction, in the papers' notation.

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),   ᾱ_t = ∏_{s≤t} (1 − β_s),   t ∈ [0, T)
    SNR(t) = ᾱ_t / (1 − ᾱ_t)
    L_simple = ‖ε − ε_θ(x_t, t)‖²  per sample; the weighting w(t) is applied by the caller

The β schedule, q_sample and the DDIM sampler are diffusers' (DDPMScheduler, DDIMScheduler);
this module keeps ᾱ in float64 so log-SNR stays exact near t = 0, where float32 rounds 1 − ᾱ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from trainables.diffusion.config import SPEED_LAMBDA, SPEED_TAU
from trainables.diffusion.model import null_label

SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "min-snr", "p2")  # functions of SNR(t) alone; `speed` is GaussianDiffusion's
DEFAULT_GAMMA = {"min-snr": 5.0, "p2": 1.0}

# DDPM's linear schedule is given for T = 1000; like improved-diffusion we scale both ends by
# 1000/T so that any T spans the same range of noise levels (diffusers takes them as given).
DDPM_BETA_START, DDPM_BETA_END, DDPM_T = 1e-4, 0.02, 1000


def ddpm_scheduler(timesteps: int, schedule: str) -> DDPMScheduler:
    if schedule == "linear":
        scale = DDPM_T / timesteps
        if DDPM_BETA_END * scale >= 1:
            raise ValueError(
                f"diffusion.timesteps={timesteps} is too few for the linear schedule "
                f"(β_T = 20/T must stay below 1); use at least 21 or diffusion.schedule=cosine"
            )
        return DDPMScheduler(
            num_train_timesteps=timesteps,
            beta_schedule="linear",
            beta_start=DDPM_BETA_START * scale,
            beta_end=DDPM_BETA_END * scale,
        )
    if schedule == "cosine":
        # Nichol & Dhariwal 2021: ᾱ(t) ∝ cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β ≤ 0.999.
        return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2")
    raise ValueError(f"diffusion.schedule={schedule!r} is unknown; choose one of {list(SCHEDULES)}")


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023) for ε-prediction: min(SNR, γ) / SNR."""
    return snr.clamp(max=gamma) / snr


def p2_weight(snr: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 weighting (Choi et al. 2022): 1 / (k + SNR)^γ."""
    return (k + snr) ** -gamma


def speed_weights(alphas_cumprod: torch.Tensor, lam: float, tau: float) -> torch.Tensor:
    """SpeeD's change-aware weighting (Speed_IDDPM._weights, `weighting: ours`; the commit and
    defaults: config.py): w = ∂(1 − ᾱ_t)/∂t (np.gradient), min–max scaled onto [1 − λ, λ] below
    τ·T; 1 from τ·T on. Float64, one per t."""
    rate = torch.gradient(1.0 - alphas_cumprod.double())[0]
    low = 1.0 - lam
    w = low + (1.0 - 2.0 * low) * (rate - rate.min()) / (rate.max() - rate.min())
    w[round(tau * len(alphas_cumprod)):] = 1.0
    return w


def weight_from_snr(
    snr: torch.Tensor, weighting: str, gamma: float | None = None, k: float = 1.0
) -> torch.Tensor:
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss.weighting={weighting!r} is unknown; choose one of {list(WEIGHTINGS)}")
    gamma = DEFAULT_GAMMA[weighting] if gamma is None else gamma
    if weighting == "min-snr":
        return min_snr_weight(snr, gamma)
    return p2_weight(snr, k, gamma)


def predict_epsilon(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    # diffusers models return an output object with `.sample`; plain modules return the tensor.
    out = model(x_t, t, class_labels=labels)
    return getattr(out, "sample", out)


def guided_epsilon(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float,
    null: int,
) -> torch.Tensor:
    """Classifier-free guidance: ε_uncond + s (ε_cond − ε_uncond), both from one forward of 2B."""
    eps_cond, eps_uncond = predict_epsilon(
        model,
        torch.cat([x_t, x_t]),
        torch.cat([t, t]),
        torch.cat([labels, torch.full_like(labels, null)]),
    ).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class SampleOptions:
    """How `GaussianDiffusion.sample` draws beyond its size and step count: the class labels and
    the classifier-free guidance scale, the noise generator, and the device (default the model's)."""

    labels: torch.Tensor | None = None
    guidance_scale: float = 1.0
    generator: torch.Generator | None = None
    device: torch.device | str | None = None


class GaussianDiffusion:
    """The forward process q(x_t | x_0), the ε-prediction loss and a DDIM sampler for T steps."""

    def __init__(self, timesteps: int = 1000, schedule: str = "linear"):
        if timesteps < 2:
            raise ValueError(f"diffusion.timesteps must be at least 2, got {timesteps}")
        self.timesteps = timesteps
        self.schedule = schedule
        self.scheduler = ddpm_scheduler(timesteps, schedule)
        self.betas = self.scheduler.betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64 on t's device."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t]
        return alpha_bar / (1.0 - alpha_bar)

    def log_snr(self) -> torch.Tensor:
        """ln SNR(t) for every t in [0, T): float64, strictly decreasing in t."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    def loss_weight(
        self, t: torch.Tensor, weighting: str = "uniform", gamma: float | None = None, k: float = 1.0,
        speed_lambda: float = SPEED_LAMBDA, speed_tau: float = SPEED_TAU,
    ) -> torch.Tensor:
        """w(t) per sample (float32) for `uniform`, `min-snr` (γ=5), `p2` (k=1, γ=1) or `speed`
        (SpeeD's, from the whole schedule: `speed_weights`)."""
        if weighting == "speed":
            table = speed_weights(self.alphas_cumprod, speed_lambda, speed_tau)
            return table.to(t.device)[t].to(torch.float32)
        return weight_from_snr(self.snr(t), weighting, gamma, k).to(torch.float32)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        return self.scheduler.add_noise(x0, noise, t)

    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unweighted ‖ε − ε_θ(x_t, t)‖² averaged over pixels: shape (B,), float32."""
        if noise is None:
            noise = torch.randn_like(x0)
        eps = predict_epsilon(model, self.q_sample(x0, t, noise), t, labels)
        return (eps.float() - noise.float()).square().flatten(1).mean(dim=1)

    def timestep_spacing(self, steps: int) -> str:
        # "trailing" starts at t = T − 1, where x_T ~ N(0, I) is what the model saw in training
        # (Lin et al. 2024, Table 2); "leading" (the DDIM paper's) starts at T − T/steps. DDIMScheduler
        # steps from t to t − T // steps, which matches the trailing grid only when steps divides T:
        # otherwise its last step would stop at t = 0 instead of x_0, so use the leading grid then.
        return "trailing" if self.timesteps % steps == 0 else "leading"

    def ddim_scheduler(self, steps: int) -> DDIMScheduler:
        if not 1 <= steps <= self.timesteps:
            raise ValueError(
                f"eval.sampler_steps={steps} must be between 1 and diffusion.timesteps={self.timesteps}"
            )
        scheduler = DDIMScheduler(
            num_train_timesteps=self.timesteps,
            trained_betas=self.scheduler.betas.numpy(),
            clip_sample=True,  # x̂_0 clipped to the data range [-1, 1] at every step
            set_alpha_to_one=True,  # the last step lands on x_0 itself
            timestep_spacing=self.timestep_spacing(steps),
        )
        scheduler.set_timesteps(steps)
        return scheduler

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        num: int,
        shape: tuple[int, int, int],
        steps: int,
        options: SampleOptions = SampleOptions(),
    ) -> torch.Tensor:
        """`num` images of `shape` (C, H, W) in [-1, 1] by deterministic DDIM (η = 0) in `steps` steps.

        With labels and guidance_scale s ≠ 1, classifier-free guidance; s = 1 is plain conditional.
        A class-conditional model given no labels samples with the null label (unconditionally).
        `device` defaults to the model's.
        """
        labels, guidance_scale, generator = options.labels, options.guidance_scale, options.generator
        device = options.device
        if device is None:
            device = next(model.parameters(), torch.empty(0)).device
        device = torch.device(device)
        scheduler = self.ddim_scheduler(steps)
        null = null_label(model)
        guided = labels is not None and guidance_scale != 1.0
        if guided and null is None:
            raise ValueError(
                f"eval.guidance_scale={guidance_scale} needs a class-conditional model "
                "(data.class_conditional: true); use 1.0 for an unconditional one"
            )
        if labels is None and null is not None:
            labels = torch.full((num,), null, dtype=torch.long)  # unconditional samples
        if labels is not None:
            labels = labels.to(device)
        x = randn_tensor((num, *shape), generator=generator, device=device, dtype=torch.float32)
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            for t in scheduler.timesteps:
                t_batch = t.to(device).expand(num)
                if guided:
                    eps = guided_epsilon(model, x, t_batch, labels, guidance_scale, null)
                else:
                    eps = predict_epsilon(model, x, t_batch, labels)
                x = scheduler.step(eps.float(), t, x, eta=0.0, generator=generator).prev_sample
        finally:
            model.train(was_training)
        return x.clamp(-1.0, 1.0)
