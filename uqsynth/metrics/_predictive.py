"""The uncalibrated Gaussian predictive of the paper, as quantile and interval functions.

Metrics that need quantiles or intervals take functions with the signatures
of :meth:`uqsynth.calibration.base.Calibrator.quantile` and
:meth:`~uqsynth.calibration.base.Calibrator.interval`, so a fitted
calibrator's bound methods drop in where these defaults are used. These
defaults are :class:`uqsynth.predictive.GaussianPredictive`'s, so the
uncalibrated numbers are the predictive interface's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from uqsynth.predictive import GaussianPredictive

QuantileFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
"""``quantile_fn(mean, std, q) -> q-quantile per voxel``, as ``Calibrator.quantile``."""

IntervalFn = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]
"""``interval_fn(mean, std, level) -> (lower, upper)`` per voxel, as ``Calibrator.interval``."""


def gaussian_quantile(mean: np.ndarray, std: np.ndarray, q: float | np.ndarray) -> np.ndarray:
    """``q``-quantile of N(mean, std^2): ``mean + std * Phi^-1(q)`` (the paper's Gaussian assumption)."""
    return GaussianPredictive(mean, std).quantile(q)


def gaussian_interval(mean: np.ndarray, std: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval of N(mean, std^2): ``mean -/+ Phi^-1(1/2 + level/2) * std``."""
    return GaussianPredictive(mean, std).interval(level)
