"""A Gaussian shift-and-scale calibrator, fitted by Gaussian negative log-likelihood."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration import Calibrator
from uqsynth.calibration.base import check_inputs, check_probabilities
from uqsynth.config import Interval


class GaussianShiftScale(Calibrator):
    """Recalibrate N(mean, std) as N(mean + shift_ * std, (scale_ * std)^2).

    With standardized residuals ``z = (y - mean) / std`` the Gaussian NLL is
    minimized in closed form by ``shift_ = mean(z)`` and ``scale_ = std(z)``.
    It fixes a predictive distribution that is biased (the calibration curve
    misses (0.5, 0.5)) or too narrow/wide, but not one of the wrong shape.

    Args:
        min_scale: Lower bound on the fitted scale, against degenerate data.
            Its range is declared in the hint, so a configuration setting
            ``min_scale = 0`` is refused when it loads, naming the key.
    """

    def __init__(self, *, min_scale: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-6) -> None:
        self.min_scale = min_scale

    def fit(self, mean, std, target):
        self._validate_params()  # the declared range, for code that builds the calibrator itself
        mean, std, target = check_inputs(mean, std, target)
        z = ((target - mean) / std).ravel()
        if z.size < 2:
            raise ValueError("need at least two voxels to fit")
        self.shift_ = float(z.mean())
        self.scale_ = max(float(z.std()), self.min_scale)
        return self

    def cdf(self, mean, std, values):
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        z = (values - mean) / std
        return ndtr((z - self.shift_) / self.scale_)

    def quantile(self, mean, std, q):
        check_is_fitted(self)
        mean, std, q = check_inputs(mean, std, check_probabilities(q), other_name="q")
        return mean + (self.shift_ + self.scale_ * ndtri(q)) * std
