"""Reward over-optimisation maths: the best-of-n KL and the curve fits of Gao et al. 2022."""

import math

import pytest

from rlhfkit.evaluate.overoptimisation import best_of_n_kl, fit_best_of_n, fit_rl


def test_best_of_n_kl_matches_hand_computed_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.1931472, abs=1e-7)  # log 2 - 1/2
    assert best_of_n_kl(4) == pytest.approx(0.6362944, abs=1e-7)  # log 4 - 3/4
    assert best_of_n_kl(64) == pytest.approx(3.1745081, abs=1e-7)  # log 64 - 63/64
    values = [best_of_n_kl(2 ** i) for i in range(8)]
    assert values == sorted(values)  # more draws, further from the policy
    for bad in (0, -3, 2.0, 1.5):
        with pytest.raises(ValueError, match="integer n >= 1"):
            best_of_n_kl(bad)


def test_fit_best_of_n_recovers_a_noiseless_curve_and_its_peak():
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    gold = [x * (1.2 - 0.3 * x) for x in d]
    fit = fit_best_of_n(d, gold)
    assert (fit.form, fit.points) == ("best_of_n", 6)
    assert fit.alpha == pytest.approx(1.2, abs=1e-12) and fit.beta == pytest.approx(0.3, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    # d* = alpha / (2 beta) = 2, KL* = 4, R(d*) = alpha^2 / (4 beta) = 1.2
    assert fit.peak_d == pytest.approx(2.0) and fit.peak_kl == pytest.approx(4.0)
    assert fit.peak_value == pytest.approx(1.2)
    assert fit.predict(0.0) == 0.0 and fit.predict(1.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=">= 0"):
        fit.predict(-1.0)


def test_fit_best_of_n_on_the_best_of_n_kl_axis():
    # the study's points: d = sqrt(KL of best-of-n), n = 1, 2, 4, ..., 64 (n = 1 is d = 0)
    d = [math.sqrt(best_of_n_kl(2 ** i)) for i in range(7)]
    gold = [x * (0.8 - 0.25 * x) for x in d]
    fit = fit_best_of_n(d, gold)
    assert fit.alpha == pytest.approx(0.8) and fit.beta == pytest.approx(0.25)
    assert fit.peak_kl == pytest.approx((0.8 / 0.5) ** 2)


def test_fit_rl_recovers_a_noiseless_curve_and_its_peak():
    d = [0.0, 0.3, 1.0, 2.0, 4.0, 6.0]  # d = 0 contributes 0 = 0 (d log d -> 0)
    gold = [x * (1.0 - 0.5 * math.log(x)) if x > 0 else 0.0 for x in d]
    fit = fit_rl(d, gold)
    assert fit.form == "rl"
    assert fit.alpha == pytest.approx(1.0, abs=1e-10) and fit.beta == pytest.approx(0.5, abs=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    # d* = exp(alpha / beta - 1) = e, R(d*) = beta * d* = e / 2
    assert fit.peak_d == pytest.approx(math.e) and fit.peak_kl == pytest.approx(math.e ** 2)
    assert fit.peak_value == pytest.approx(math.e / 2)
    assert fit.predict(0.0) == 0.0 and fit.predict(math.e) == pytest.approx(math.e / 2)


def test_a_noisy_curve_fits_with_r2_below_one():
    d = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    noise = [0.02, -0.03, 0.01, 0.03, -0.02, -0.01]
    fit = fit_best_of_n(d, [x * (1.0 - 0.2 * x) + e for x, e in zip(d, noise, strict=True)])
    assert 0.9 < fit.r2 < 1.0
    assert fit.alpha == pytest.approx(1.0, abs=0.05) and fit.beta == pytest.approx(0.2, abs=0.03)


def test_no_interior_peak_without_over_optimisation():
    d = [0.5, 1.0, 2.0, 3.0]
    rising = fit_best_of_n(d, [x * (1.0 + 0.1 * x) for x in d])  # beta = -0.1: still accelerating
    assert rising.beta == pytest.approx(-0.1)
    assert rising.peak_d is None and rising.peak_kl is None and rising.peak_value is None
    linear = fit_rl(d, [0.5 * x for x in d])  # beta = 0: no bend at all
    assert linear.beta == pytest.approx(0.0, abs=1e-12) and linear.peak_d is None
    falling = fit_best_of_n(d, [x * (-1.0 - 0.5 * x) for x in d])  # beta > 0 but alpha < 0: only falls
    assert falling.beta == pytest.approx(0.5) and falling.peak_d is None


def test_too_few_or_degenerate_points_raise():
    for fit in (fit_best_of_n, fit_rl):
        with pytest.raises(ValueError, match="at least 2 points with d > 0"):
            fit([0.0, 1.0], [0.0, 0.5])
        with pytest.raises(ValueError, match="at least 2 points with d > 0"):
            fit([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
        with pytest.raises(ValueError, match="3 values of d for 2"):
            fit([0.5, 1.0, 2.0], [0.1, 0.2])
        with pytest.raises(ValueError, match=">= 0"):
            fit([-1.0, 1.0, 2.0], [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="finite"):
            fit([0.5, 1.0, 2.0], [0.1, float("nan"), 0.3])
        with pytest.raises(ValueError, match="do not determine"):
            fit([1.5, 1.5, 1.5], [0.2, 0.3, 0.25])  # one distinct d: alpha and beta are not separable
    with pytest.raises(ValueError, match="do not determine"):
        fit_rl([1.0, 1.0], [0.2, 0.3])  # log 1 = 0: beta is unconstrained
