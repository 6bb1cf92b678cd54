"""Difficulty-probe math (trainables/difficulty_probe/analysis.py): the marginal KL against
Monte Carlo, its decrease with t, the ridge, cluster sums, smoothing and convergence."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from trainables.difficulty_probe.analysis import (
    GaussianFit,
    cluster_sums,
    convergence_step,
    fit_gaussian,
    marginal_kl,
    relative_final_loss,
    smooth,
)

T = 1000
# DDPM's linear schedule (Ho et al. 2020).
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
UNIFORM5 = [0, 200, 400, 600, 800, 1000]


def gaussian_2d() -> tuple[np.ndarray, np.ndarray, GaussianFit]:
    """Non-diagonal Σ with eigenvalues 0.001 and 0.399: the thin direction makes the early-t KLs
    ~1e-3, large enough for Monte Carlo to resolve (a near-isotropic Σ gives ~1e-5 there)."""
    mu, cov = np.array([0.3, -0.5]), np.array([[0.2, 0.199], [0.199, 0.2]])
    lam, vecs = np.linalg.eigh(cov)
    return mu, cov, GaussianFit(mu, lam, vecs, ridge=1e-3)


def marginal(mu, cov, a):
    return multivariate_normal(np.sqrt(a) * mu, a * cov + (1.0 - a) * np.eye(len(mu)))


# On DDPM's schedule consecutive marginals are close, the KL is mostly the variance term, and
# only early t are resolvable. A coarse schedule (big jumps in ᾱ) makes the mean term
# (√ᾱ_t − √ᾱ_{t-1})²(Vᵀμ)²/v1 a sizeable share (~25% at t = 2), so a wrong mean term fails too.
COARSE = np.array([0.9, 0.5, 0.1])


@pytest.mark.parametrize("schedule, t", [("ddpm", 0), ("ddpm", 1), ("ddpm", 10), ("ddpm", 30),
                                         ("coarse", 1), ("coarse", 2)])
def test_kl_matches_monte_carlo(schedule, t):
    a = ALPHAS_CUMPROD if schedule == "ddpm" else COARSE
    mu, cov, fit = gaussian_2d()
    closed = marginal_kl(a, fit)[t]
    p_prev = marginal(mu, cov, 1.0 if t == 0 else a[t - 1])  # p_{-1}: the data
    p_t = marginal(mu, cov, a[t])
    n = 1_000_000
    x = p_prev.rvs(size=n, random_state=np.random.default_rng(t))
    log_ratio = p_prev.logpdf(x) - p_t.logpdf(x)
    estimate, se = log_ratio.mean(), log_ratio.std(ddof=1) / np.sqrt(n)
    assert closed > 10 * se, "t too late: the KL is lost in the Monte-Carlo noise"
    assert abs(closed - estimate) < 5 * se, (closed, estimate, se)  # 5σ: false alarm ~6e-7


def test_kl_decreases_with_t():
    # Large-t denoising tasks are easier (smaller KL) — on the 2-D Gaussian and on
    # [-1, 1] "images" with constant border pixels.
    x = np.random.default_rng(0).uniform(-1, 1, size=(500, 16))
    x[:, :4] = -1.0
    for fit in (gaussian_2d()[2], fit_gaussian(x)):
        sums = cluster_sums(marginal_kl(ALPHAS_CUMPROD, fit), UNIFORM5)
        assert sums[0] > 10 * sums[-1]
        assert all(a > b for a, b in zip(sums, sums[1:])), sums


def test_fit_gaussian_covariance_and_ridge():
    x = np.random.default_rng(1).normal(size=(50, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.3], [0, 0, 1]])
    fit = fit_gaussian(x, ridge=0.01)
    rebuilt = fit.eigvecs @ np.diag(fit.eigvals) @ fit.eigvecs.T
    np.testing.assert_allclose(rebuilt, np.cov(x, rowvar=False, ddof=1) + 0.01 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(fit.mean, x.mean(axis=0))
    for bad in (dict(x=x[:1]), dict(x=x, ridge=0.0), dict(x=x, ridge=-1.0)):
        with pytest.raises(ValueError):
            fit_gaussian(**bad)


def test_ridge_keeps_kl_finite_on_constant_pixel():
    x = np.random.default_rng(2).uniform(-1, 1, size=(200, 5))
    x[:, 2] = -1.0  # an always-black pixel: sample variance exactly 0
    fit = fit_gaussian(x, ridge=1e-3)
    assert fit.eigvals.min() == pytest.approx(1e-3, rel=1e-6)
    kl = marginal_kl(ALPHAS_CUMPROD, fit)
    assert np.all(np.isfinite(kl)) and np.all(kl >= 0)
    assert kl[0] > 0


def test_marginal_kl_validates_schedule():
    fit = gaussian_2d()[2]
    for bad in (np.array([]), np.array([0.5, 0.0]), np.array([1.1]), ALPHAS_CUMPROD[None, :]):
        with pytest.raises(ValueError):
            marginal_kl(bad, fit)
    assert marginal_kl(np.ones(3), fit) == pytest.approx(np.zeros(3), abs=1e-15)  # no noise, no change


def test_cluster_sums():
    assert cluster_sums(np.arange(10.0), [0, 3, 4, 10]) == [0 + 1 + 2, 3, 4 + 5 + 6 + 7 + 8 + 9]
    for bad in ([0, 5], [1, 10], [0, 4, 4, 10], [0, 11]):
        with pytest.raises(ValueError):
            cluster_sums(np.arange(10.0), bad)


def test_smooth_bias_correction():
    np.testing.assert_allclose(smooth([3.0] * 20, 0.9), 3.0, rtol=1e-12)  # no pull toward 0
    np.testing.assert_allclose(smooth([1.0, 2.0], 0.5), [1.0, 1.25 / 0.75])
    np.testing.assert_array_equal(smooth([4.0, 1.0, 7.0], 0.0), [4.0, 1.0, 7.0])


def test_convergence_step_exponential_decay():
    # ℓ(s) = a + b e^{-s/τ}, decreasing, unsmoothed: within tolerance of ℓ_final once
    # b e^{-s/τ} ≤ tol·ℓ_final + b e^{-s_final/τ}.
    a, b, tau, tol = 0.1, 1.0, 300.0, 0.05
    steps = np.arange(100, 5001, 100)  # not from 0: the answer is a step, not an index
    losses = a + b * np.exp(-steps / tau)
    s_star = -tau * np.log((tol * losses[-1] + b * np.exp(-steps[-1] / tau)) / b)
    expected = int(steps[steps >= s_star][0])
    assert convergence_step(steps, losses, tolerance=tol, smoothing=0.0) == expected
    # Smoothing lags a falling curve, so it can only delay convergence here.
    assert convergence_step(steps, losses, tolerance=tol) >= expected


def test_convergence_step_flat_and_stays_in_band():
    assert convergence_step([10, 20, 30], [2.0, 2.0, 2.0]) == 10
    # Touches the band at 20 but leaves it at 30: converged only from 40 on.
    assert convergence_step([10, 20, 30, 40, 50], [2.0, 1.0, 1.5, 1.0, 1.0], smoothing=0.0) == 40
    for steps, losses in (([], []), ([1, 2], [1.0]), ([1, 2], [1.0, np.nan]), ([2, 1], [1.0, 1.0])):
        with pytest.raises(ValueError):
            convergence_step(steps, losses)


def test_relative_final_loss():
    assert relative_final_loss([2.0, 1.0, 0.5, 0.5], smoothing=0.0) == 0.25
    assert relative_final_loss([1.0] * 5) == pytest.approx(1.0)
    # The end is smoothed, the start raw: smooth([2, 1], 0.5) = [2, 4/3], so 2/3 (raw: 1/2).
    assert relative_final_loss([2.0, 1.0], smoothing=0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        relative_final_loss([1.0, np.inf])
