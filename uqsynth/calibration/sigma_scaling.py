"""Sigma scaling (Laves et al. 2020): one scalar on the predicted std, fitted by Gaussian NLL."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities
from uqsynth.config import Interval


class SigmaScaling(StreamingCalibrator):
    """Recalibrate N(mean, std^2) as N(mean, (scale_ * std)^2).

    Laves, Ihler, Fast, Kahrs and Ortmaier (2020), "Well-calibrated regression
    uncertainty in medical imaging with deep learning": MC-dropout std is
    typically off by a roughly constant factor, so one scalar fixes most of
    the miscalibration while keeping the model's ranking of voxels by
    uncertainty. The scalar minimizes the Gaussian negative log-likelihood of
    the calibration voxels, ``sum_t log(s * std_t) + z_t^2 / (2 s^2)`` with
    ``z_t = (y_t - mean_t) / std_t``, whose minimum is in closed form:
    ``s^2 = mean(z^2)``. So the summary is just ``sum_sq_ = sum(z^2)`` and
    ``n_``, which add up over batches and processes (:meth:`partial_fit`,
    :meth:`merge`).

    It cannot fix a bias or a wrong shape (heavy tails): those need
    ``isotonic`` or ``conformal``.

    Args:
        min_scale: Lower bound on the fitted scale, so a degenerate
            calibration set (every residual zero) still gives a valid Gaussian.

    Attributes:
        sum_sq_: Sum of squared standardized residuals.
        n_: Number of voxels seen.
        scale_: The fitted factor ``s`` on ``std``.
    """

    _summary_names = ("sum_sq_", "n_")

    def __init__(self, *, min_scale: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-6) -> None:
        self.min_scale = min_scale

    def _summarize(self, mean, std, target):
        z = (target - mean) / std
        return {"sum_sq_": np.asarray(np.sum(z * z), dtype=np.float64)}

    def _finalize(self) -> None:
        self.scale_ = np.asarray(max(np.sqrt(float(self.sum_sq_) / float(self.n_)), float(self.min_scale)))

    def cdf(self, mean, std, values):
        """CDF of N(mean, (scale_ * std)^2) at ``values``."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        return ndtr((values - mean) / (float(self.scale_) * std))

    def quantile(self, mean, std, q):
        """``q``-quantile of N(mean, (scale_ * std)^2)."""
        check_is_fitted(self)
        q = check_probabilities(q)
        mean, std, q = check_inputs(mean, std, q, other_name="q")
        return mean + float(self.scale_) * std * ndtri(q)
