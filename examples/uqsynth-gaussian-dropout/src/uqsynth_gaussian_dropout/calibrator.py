"""A Gaussian shift-and-scale calibrator, fitted by Gaussian negative log-likelihood."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration import Calibrator
from uqsynth.calibration.base import check_inputs, check_probabilities
from uqsynth.config import Interval

#: Below this std a voxel's MC samples agreed to round-off (uqsynth's own threshold on the [0, 1] scale).
UNRESOLVED_STD = 1e-6


class GaussianShiftScale(Calibrator):
    """Recalibrate N(mean, std) as N(mean + shift_ * sigma, (scale_ * sigma)^2), sigma = sqrt(std^2 + floor_^2).

    With standardized residuals ``z = (y - mean) / sigma`` the Gaussian NLL is
    minimized in closed form by ``shift_ = mean(z)`` and ``scale_ = std(z)``.
    It fixes a predictive distribution that is biased (the calibration curve
    misses (0.5, 0.5)) or too narrow/wide, but not one of the wrong shape.

    Why the effective std ``sigma`` and not the std itself: uqsynth fits and
    queries every brain voxel, including those whose MC samples all agreed
    (std 0, or round-off below 1e-6). Dividing by such a std gives an
    infinite (or NaN) ``z`` that wrecks the closed form, and
    ``mean + scale_ * std * ...`` would give those voxels a zero-width
    interval, a certainty the model never earned. So ``floor_`` is fitted
    from the data: the RMS residual ``y - mean`` of the voxels whose std is
    below 1e-6 (how far the truth lies from a voxel the model is sure of),
    or, if there are none (or their truth equals their mean exactly), 1e-3
    times the median absolute residual of the resolved voxels (small enough
    to leave every resolved voxel's ``z`` as it was, yet positive unless
    most residuals are exactly 0).
    ``shift_`` and ``scale_`` are fitted on the voxels with a resolved std
    only, and every voxel, whatever its std, gets ``sigma = np.hypot(std, floor_)``.

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
        residual = (target - mean).ravel()
        std = std.ravel()
        resolved = std >= UNRESOLVED_STD
        if np.count_nonzero(resolved) < 2:
            raise ValueError(f"need at least two voxels with std >= {UNRESOLVED_STD:g} to fit")
        floor = float(np.sqrt(np.mean(residual[~resolved] ** 2))) if not resolved.all() else 0.0
        if floor == 0.0:  # no unresolved voxels (or their truth equals their mean exactly)
            floor = 1e-3 * float(np.median(np.abs(residual[resolved])))
        self.floor_ = floor
        z = residual[resolved] / np.hypot(std[resolved], self.floor_)
        self.shift_ = float(z.mean())
        self.scale_ = max(float(z.std()), self.min_scale)
        return self

    def effective_std(self, std):
        """``sqrt(std^2 + floor_^2)``, > 0 for every std >= 0 (see the class docstring)."""
        check_is_fitted(self)
        return np.hypot(np.asarray(std, dtype=np.float64), float(self.floor_))

    def cdf(self, mean, std, values):
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        z = (values - mean) / self.effective_std(std)
        return ndtr((z - self.shift_) / self.scale_)

    def quantile(self, mean, std, q):
        check_is_fitted(self)
        mean, std, q = check_inputs(mean, std, check_probabilities(q), other_name="q")
        return mean + (self.shift_ + self.scale_ * ndtri(q)) * self.effective_std(std)
