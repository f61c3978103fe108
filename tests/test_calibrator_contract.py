"""The calibrator contract suite itself: its zero-std checks catch what they name, in one line."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr, ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration.base import Calibrator, check_inputs, check_probabilities
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.testing.calibrator_contract import (
    CALIBRATOR_CHECKS,
    QUALITY_CHECKS,
    check_calibrate_gives_its_predictive,
    check_calibrator,
    check_fit_with_zero_std,
    check_heavy_tailed_coverage,
    check_zero_std_outputs,
)


class PlainScale(Calibrator):
    """Sigma scaling as it was: N(mean, (s std)^2), s^2 = mean(z^2). A zero std divides by zero."""

    def fit(self, mean, std, target):
        mean, std, target = check_inputs(mean, std, target)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.scale_ = float(np.sqrt(np.mean(((target - mean) / std) ** 2)))
        return self

    def cdf(self, mean, std, values):
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        with np.errstate(divide="ignore", invalid="ignore"):
            return ndtr((values - mean) / (self.scale_ * std))

    def quantile(self, mean, std, q):
        check_is_fitted(self)
        mean, std, q = check_inputs(mean, std, check_probabilities(q), other_name="q")
        return mean + self.scale_ * std * ndtri(q)


class Refusing(PlainScale):
    """Refuses a zero std, as every calibrator did before."""

    def fit(self, mean, std, target):
        if (np.asarray(std) <= 0).any():
            raise ValueError("std must be positive; mask those voxels out")
        return super().fit(mean, std, target)


class FittedOnResolvedOnly(PlainScale):
    """Fits on the voxels with std > 0 (as the pipeline did), but gives a zero std a zero-width interval."""

    def fit(self, mean, std, target):
        keep = np.asarray(std) > 1e-6
        return super().fit(np.asarray(mean)[keep], np.asarray(std)[keep], np.asarray(target)[keep])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_calibrator_refusing_zero_std_fails_naming_the_call_and_the_remedy():
    with pytest.raises(AssertionError) as error:
        check_fit_with_zero_std(Refusing)
    message = one_line(error)
    assert "fit on voxels of which 5% have std 0 and 5% std 1e-09 raised ValueError: std must be positive" in message
    assert "sqrt((s * std)^2 + c^2)" in message


def test_a_calibrator_dividing_by_a_zero_std_fails_naming_what_it_gave():
    with pytest.raises(AssertionError) as error:
        check_fit_with_zero_std(PlainScale)
    assert "the 90 % interval of ordinary voxels is not finite" in one_line(error)


def test_a_zero_width_interval_for_a_zero_std_fails():
    with pytest.raises(AssertionError) as error:
        check_zero_std_outputs(FittedOnResolvedOnly)
    assert "the 50% interval of voxels with std 0 has zero width" in one_line(error)
    with pytest.raises(AssertionError, match="has zero width"):
        check_fit_with_zero_std(FittedOnResolvedOnly)


def test_check_calibrator_names_the_failed_zero_std_check():
    with pytest.raises(AssertionError, match=r"^check_fit_with_zero_std failed for Refusing\(\)"):
        check_calibrator(Refusing)


def test_the_builtin_sigma_scaling_passes_where_the_old_one_failed():
    for check in (check_fit_with_zero_std, check_zero_std_outputs, check_heavy_tailed_coverage,
                  check_calibrate_gives_its_predictive):
        check(SigmaScaling)


def test_heavy_tailed_coverage_catches_a_gaussian_fit_by_its_variance():
    """Plain sigma scaling on Student t data: its 90 % interval covers too much (the t's variance is in its tails)."""
    class ResolvedPlainScale(FittedOnResolvedOnly):
        def quantile(self, mean, std, q):
            return super().quantile(mean, np.maximum(std, 1.0), q)

    with pytest.raises(AssertionError, match="the 90 % interval holds 0.9[4-9]"):
        check_heavy_tailed_coverage(ResolvedPlainScale)


def test_the_suite_lists_each_check_once_and_keeps_quality_apart():
    assert len(set(CALIBRATOR_CHECKS)) == len(CALIBRATOR_CHECKS)
    assert {check_fit_with_zero_std, check_zero_std_outputs, check_calibrate_gives_its_predictive} <= set(CALIBRATOR_CHECKS)
    assert set(QUALITY_CHECKS).isdisjoint(CALIBRATOR_CHECKS)
