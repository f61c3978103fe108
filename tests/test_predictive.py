"""The Predictive interface: the Gaussian, point masses, and what calibrate() makes of any calibrator."""

from __future__ import annotations

import numpy as np
import properscoring
import pytest
from scipy import stats
from scipy.special import ndtri
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration.base import Calibrator, check_inputs, check_probabilities
from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.metrics import gaussian_interval, gaussian_quantile
from uqsynth.predictive import (
    CalibratedPredictive,
    GaussianPredictive,
    Predictive,
    crps_from_quantiles,
    gaussian_crps,
)


def voxels(n: int = 2000, seed: int = 0, ratio: float = 1.5):
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.2, 0.8, n)
    std = rng.uniform(0.01, 0.1, n)
    return mean, std, mean + ratio * std * rng.standard_normal(n)


class Doubling(Calibrator):
    """A third-party calibrator with only fit, cdf and quantile: N(mean, (2 std)^2 + 0.01^2)."""

    def fit(self, mean, std, target):
        check_inputs(mean, std, target)
        self.fitted_ = np.asarray(1.0)
        return self

    def cdf(self, mean, std, values):
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        return stats.norm.cdf(values, mean, np.hypot(2 * std, 0.01))

    def quantile(self, mean, std, q):
        check_is_fitted(self)
        mean, std, q = check_inputs(mean, std, check_probabilities(q), other_name="q")
        return mean + np.hypot(2 * std, 0.01) * ndtri(q)


# --- the Gaussian -----------------------------------------------------------------------------------


def test_gaussian_predictive_is_scipys_normal():
    mean, std, target = voxels()
    predictive = GaussianPredictive(mean, std)
    assert isinstance(predictive, Predictive)
    np.testing.assert_array_equal(predictive.mean, mean)
    np.testing.assert_array_equal(predictive.std, std)
    np.testing.assert_allclose(predictive.cdf(target), stats.norm.cdf(target, mean, std), rtol=1e-12)
    np.testing.assert_allclose(predictive.quantile(0.9), stats.norm.ppf(0.9, mean, std), rtol=1e-12)
    np.testing.assert_allclose(predictive.nll(target), -stats.norm.logpdf(target, mean, std), rtol=1e-12)
    np.testing.assert_allclose(predictive.crps(target), properscoring.crps_gaussian(target, mean, std), rtol=1e-12)
    lower, upper = predictive.interval(0.9)
    np.testing.assert_allclose(lower, stats.norm.ppf(0.05, mean, std), rtol=1e-12)
    np.testing.assert_allclose(upper, stats.norm.ppf(0.95, mean, std), rtol=1e-12)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.5"):
        predictive.interval(1.5)
    with pytest.raises(ValueError, match="std must be >= 0"):
        GaussianPredictive(mean, -std)


def test_gaussian_predictive_broadcasts_like_the_calibrators():
    mean, std, _ = voxels(5)
    predictive = GaussianPredictive(mean[None, :], std[None, :])
    q = np.array([0.1, 0.5, 0.9])[:, None]
    assert predictive.quantile(q).shape == (3, 5)
    assert predictive.cdf(mean[None, :] + std[None, :] * np.array([-1.0, 0.0, 1.0])[:, None]).shape == (3, 5)


def test_a_zero_std_is_a_point_mass_at_the_mean():
    mean = np.array([0.3, 0.5])
    predictive = GaussianPredictive(mean, np.zeros(2))
    np.testing.assert_array_equal(predictive.cdf(np.array([0.29, 0.5])), [0.0, 1.0])
    np.testing.assert_array_equal(predictive.quantile(0.1), mean)
    np.testing.assert_array_equal(predictive.interval(0.9), (mean, mean))
    np.testing.assert_allclose(predictive.crps(np.array([0.4, 0.5])), [0.1, 0.0], atol=1e-15)  # the absolute error
    assert np.isinf(predictive.nll(np.array([0.4, 0.5]))).all()
    np.testing.assert_array_equal(predictive.quantile(np.array([0.0, 1.0])), mean)  # not 0 * inf


def test_the_metrics_gaussian_functions_give_the_same_numbers_as_before():
    """``gaussian_quantile`` / ``gaussian_interval`` are thin uses of GaussianPredictive, with the old formulas' numbers."""
    mean, std, _ = voxels()
    for q in (0.01, 0.3, 0.5, 0.975):
        np.testing.assert_array_equal(gaussian_quantile(mean, std, q), mean + std * ndtri(q))
    for level in (0.5, 0.9, 0.95):
        half = float(ndtri(0.5 + level / 2.0))
        np.testing.assert_array_equal(gaussian_interval(mean, std, level), (mean - half * std, mean + half * std))
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        gaussian_interval(mean, std, 0.0)


def test_crps_from_quantiles_approaches_the_exact_gaussian_crps():
    mean, std, target = voxels()
    exact = gaussian_crps(target, mean, std)
    approximate = crps_from_quantiles(GaussianPredictive(mean, std).quantile, target)
    assert float(np.mean(approximate)) == pytest.approx(float(np.mean(exact)), rel=5e-4)


# --- calibrate() -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [SigmaScaling, IsotonicCalibrator, ConformalCalibrator, Doubling],
                         ids=lambda make: make.__name__)
def test_calibrate_answers_with_the_calibrators_methods(make):
    mean, std, target = voxels()
    calibrator = make().fit(mean, std, target)
    base = GaussianPredictive(mean[:50], std[:50])
    predictive = calibrator.calibrate(base)
    assert isinstance(predictive, CalibratedPredictive) and predictive.base is base
    m, s, t = mean[:50], std[:50], target[:50]
    np.testing.assert_array_equal(predictive.cdf(t), calibrator.cdf(m, s, t))
    np.testing.assert_array_equal(predictive.quantile(0.2), calibrator.quantile(m, s, 0.2))
    np.testing.assert_array_equal(predictive.interval(0.9), calibrator.interval(m, s, 0.9))
    np.testing.assert_array_equal(predictive.crps(t), calibrator.crps(m, s, t))
    assert predictive.mean.shape == predictive.std.shape == (50,)
    assert (predictive.std > 0).all()


def test_calibrate_needs_a_fitted_calibrator():
    with pytest.raises(NotFittedError):
        SigmaScaling().calibrate(GaussianPredictive(np.zeros(2), np.ones(2)))


def test_sigma_scalings_predictive_is_its_gaussian_with_nll_crps_and_moments():
    mean, std, target = voxels(ratio=2.0)
    calibrator = SigmaScaling().fit(mean, std, target)
    scale = np.hypot(float(calibrator.scale_) * std, float(calibrator.floor_))
    predictive = calibrator.calibrate(GaussianPredictive(mean, std))
    np.testing.assert_allclose(predictive.nll(target), -stats.norm.logpdf(target, mean, scale), rtol=1e-10)
    np.testing.assert_allclose(predictive.crps(target), properscoring.crps_gaussian(target, mean, scale), rtol=1e-10)
    np.testing.assert_array_equal(predictive.mean, mean)
    np.testing.assert_allclose(predictive.std, scale, rtol=1e-12)
    # the default CRPS from quantiles agrees with the exact one
    default = Calibrator.crps(calibrator, mean, std, target)
    assert float(np.mean(default)) == pytest.approx(float(np.mean(predictive.crps(target))), rel=1e-3)


def test_a_predictive_with_std_zero_calibrates_to_a_width():
    mean, std, target = voxels()
    std[:100] = 0.0
    for calibrator in (SigmaScaling().fit(mean, std, target), IsotonicCalibrator().fit(mean, std, target)):
        lower, upper = calibrator.calibrate(GaussianPredictive(mean[:100], std[:100])).interval(0.9)
        assert (upper > lower).all() and np.isfinite(upper).all()


@pytest.mark.parametrize("make", [IsotonicCalibrator, ConformalCalibrator, Doubling], ids=lambda make: make.__name__)
def test_calibrators_without_a_density_say_so(make):
    """The evaluation scores an NLL only where ``nll`` does not raise NotImplementedError."""
    mean, std, target = voxels()
    predictive = make().fit(mean, std, target).calibrate(GaussianPredictive(mean, std))
    with pytest.raises(NotImplementedError, match="gives no density"):
        predictive.nll(target)


def test_isotonic_moments_are_those_of_its_quantiles():
    mean, std, target = voxels(20000, ratio=3.0)
    calibrator = IsotonicCalibrator().fit(mean, std, target)
    exact_mean, exact_std = calibrator.moments(mean[:20], std[:20])
    midpoint_mean, midpoint_std = Calibrator.moments(calibrator, mean[:20], std[:20])
    np.testing.assert_allclose(exact_mean, midpoint_mean, atol=1e-3 * float(std.max()))
    np.testing.assert_allclose(exact_std, midpoint_std, rtol=0.05)  # the midpoint rule misses the outer 1 %
    np.testing.assert_allclose(exact_std / calibrator.effective_std(std[:20]), 3.0, rtol=0.03)
