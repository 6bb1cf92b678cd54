"""Pure math of the difficulty probe (§3 of Kim et al., ICLR 2025). Numpy float64, no torch.

Two measures of how hard the denoising task at timestep t is:
  * analytic: D_KL(p_{t-1} ‖ p_t) between consecutive forward marginals when the data is
    modelled as a Gaussian N(μ, Σ); a small KL means the step barely changes the distribution,
    so undoing it is easy (the paper's observation: large-t tasks are easier);
  * empirical: how fast, and how far, a cluster's held-out loss falls during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class GaussianFit:
    """N(mean, V diag(eigvals) Vᵀ); eigvals already include the ridge."""

    mean: np.ndarray  # [d]
    eigvals: np.ndarray  # [d], ascending (np.linalg.eigh)
    eigvecs: np.ndarray  # [d, d], columns are eigenvectors
    ridge: float


def fit_gaussian(x: np.ndarray, ridge: float = 1e-3) -> GaussianFit:
    """Gaussian fit to x [n, d] (flattened images, pixels in [-1, 1]).

    Σ = sample covariance (ddof=1) + ridge·I. The ridge keeps every eigenvalue ≥ ridge, so the
    KL stays finite for constant pixels (e.g. digits' always-black borders), whose variance is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need x of shape [n ≥ 2, d], got {x.shape}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    cov = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
    lam, vecs = np.linalg.eigh(cov)
    # Decompose S, then add the ridge: same eigenvectors as S + ridge·I, and clipping S's
    # round-off negatives at 0 guarantees eigvals ≥ ridge exactly.
    return GaussianFit(x.mean(axis=0), np.maximum(lam, 0.0) + ridge, vecs, float(ridge))


def marginal_kl(alphas_cumprod: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """[T] array, element t = D_KL(p_{t-1} ‖ p_t), p_{-1} the data Gaussian (ᾱ_{-1} = 1).

    p_t = N(√ᾱ_t μ, ᾱ_t Σ + (1 − ᾱ_t) I) shares Σ's eigenbasis for every t, so in that basis
    each KL is a sum over directions i of 1-D KLs with m = √ᾱ (Vᵀμ)_i, v = ᾱ λ_i + (1 − ᾱ):
        0.5 Σ_i [v0/v1 + (m1 − m0)²/v1 − 1 + ln(v1/v0)].
    """
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all((a > 0) & (a <= 1)):
        raise ValueError("alphas_cumprod must be a non-empty 1-D array with values in (0, 1]")
    a_prev = np.concatenate([[1.0], a[:-1]])[:, None]  # ᾱ_{t-1}, [T, 1]
    a_t = a[:, None]
    lam = fit.eigvals[None, :]  # [1, d]
    mu = (fit.eigvecs.T @ fit.mean)[None, :]  # Vᵀμ
    v1 = a_t * lam + (1.0 - a_t)
    # Late steps have v0 ≈ v1, where v0/v1 − 1 + ln(v1/v0) cancels catastrophically. With
    # δ = (v0 − v1)/v1 = (ᾱ_{t-1} − ᾱ_t)(λ − 1)/v1 computed without subtracting v's, the term
    # is δ − log1p(δ), accurate down to δ ~ 1e-8.
    delta = (a_prev - a_t) * (lam - 1.0) / v1
    var_term = delta - np.log1p(delta)
    mean_term = (np.sqrt(a_t) - np.sqrt(a_prev)) ** 2 * mu**2 / v1
    return 0.5 * (var_term + mean_term).sum(axis=1)


def cluster_sums(per_t: np.ndarray, edges: list[int]) -> list[float]:
    """Sum of per_t over each cluster [e_{k-1}, e_k), edges e_0 = 0 < … < e_N = T."""
    v = np.asarray(per_t, dtype=np.float64)
    e = list(edges)
    if len(e) < 2 or e[0] != 0 or e[-1] != v.shape[0] or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"edges must rise strictly from 0 to {v.shape[0]}, got {e}")
    return [float(v[lo:hi].sum()) for lo, hi in zip(e, e[1:])]


def smooth(values: Sequence[float], smoothing: float) -> np.ndarray:
    """Bias-corrected EMA (as in Adam): starting the EMA at 0 biases early values toward 0;
    dividing by 1 − smoothing^(i+1) removes it, so a constant input comes back unchanged."""
    v = np.asarray(values, dtype=np.float64)
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, ema = np.empty_like(v), 0.0
    for i, x in enumerate(v):
        ema = smoothing * ema + (1.0 - smoothing) * x
        out[i] = ema / (1.0 - smoothing ** (i + 1))
    return out


def _losses(losses: Sequence[float]) -> np.ndarray:
    v = np.asarray(losses, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("losses must be a non-empty 1-D sequence of finite values")
    return v


def convergence_step(steps: Sequence[int], losses: Sequence[float], tolerance: float = 0.05,
                     smoothing: float = 0.6) -> int:
    """First eval step s_i from which the smoothed held-out loss ℓ̃ stays within `tolerance`
    (relative) of its final value: |ℓ̃_j − ℓ̃_final| ≤ tolerance·|ℓ̃_final| for every j ≥ i.
    "Stays" rather than "first enters": a noisy curve may touch the band early and leave it."""
    s, v = np.asarray(steps), _losses(losses)
    if s.shape != v.shape:
        raise ValueError(f"steps and losses differ in shape: {s.shape} vs {v.shape}")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be ≥ 0, got {tolerance}")
    sm = smooth(v, smoothing)
    outside = np.flatnonzero(np.abs(sm - sm[-1]) > tolerance * abs(sm[-1]))
    # The last point is always inside, so the answer is one past the last point outside.
    return int(s[outside[-1] + 1]) if outside.size else int(s[0])


def relative_final_loss(losses: Sequence[float], smoothing: float = 0.6) -> float:
    """Smoothed final loss / first raw loss: the fraction of the cluster's loss that training
    left (< 1 means it learned). Smoothing the end only: the first value is the baseline."""
    v = _losses(losses)
    if v[0] == 0:
        raise ValueError("the first loss is 0; the ratio is undefined")
    return float(smooth(v, smoothing)[-1] / v[0])
