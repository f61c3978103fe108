"""Sigma scaling (Laves et al. 2020) with a fitted floor: N(mean, (s * std)^2 + c^2), fitted by robust Gaussian NLL."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration import _scale
from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities
from uqsynth.config import Interval


class SigmaScaling(StreamingCalibrator):
    """Recalibrate N(mean, std^2) as N(mean, sigma_eff^2) with ``sigma_eff^2 = (scale_ * std)^2 + floor_^2``.

    Laves, Ihler, Fast, Kahrs and Ortmaier (2020), "Well-calibrated regression
    uncertainty in medical imaging with deep learning": MC-dropout std is
    typically off by a roughly constant factor, so one scalar ``s`` fixes
    most of the miscalibration while keeping the model's ranking of voxels
    by uncertainty. Their ``s`` minimizes the Gaussian NLL of the calibration
    voxels, ``s^2 = mean(z^2)``. Two things break that closed form on real
    maps, and this calibrator fixes both:

    - Voxels whose std is round-off (every MC sample agreed): ``z = r / std``
      is 1e4 or infinite, and a dozen of them among a million make
      ``mean(z^2)`` huge, so the fitted Gaussian is so wide that its
      calibration curve is a step at 0.5. Here the variance has a floor,
      ``sigma_eff^2 = (s std)^2 + c^2``, with ``c`` fitted with ``s``: those
      voxels get the width their own residuals call for (finite and
      positive, also for std 0), and the others keep ``s * std``.
    - A few gross errors (``|z| ~ 1e4`` with a resolved std) would inflate
      ``s`` the same way. The likelihood is that of a Gaussian contaminated
      by a small fitted fraction ``eps`` of gross errors
      (:mod:`uqsynth.calibration._scale`), which the Gaussian then need not
      explain. The calibrated predictive is the Gaussian: an interval is
      for the voxels the model describes, and ``outlier_fraction_`` says how
      many it does not.

    ``(s, c, eps)`` maximize the binned likelihood of a histogram of the
    voxels by std and standardized residual (:func:`uqsynth.calibration._scale.fit_scale`);
    the histogram (``counts_``, integers) is the whole summary, so it adds up
    over batches and processes (:meth:`partial_fit`, :meth:`merge`).

    It cannot fix a bias or a wrong shape (heavy tails): those need
    ``isotonic`` or ``conformal``.

    Args:
        min_scale: Lower bound on the fitted scale, so a degenerate
            calibration set (every residual zero) still gives a valid Gaussian.

    Attributes:
        counts_: Voxels by std row and ``|z|`` bin, shape ``(rows, bins)``; additive.
        n_: Number of voxels seen.
        scale_: The fitted factor ``s`` on ``std``.
        floor_: The fitted floor ``c`` (units of the target), > 0.
        outlier_fraction_: The fitted share ``eps`` of gross errors.
    """

    _summary_names = ("counts_", "n_")

    def __init__(self, *, min_scale: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-6) -> None:
        self.min_scale = min_scale

    @staticmethod
    def positive_edges() -> np.ndarray:
        """Edges of the ``|z|`` bins: 0, then log-spaced from ``Z_LOW`` to ``Z_FAR``."""
        decades = int(round(np.log10(_scale.Z_FAR / _scale.Z_LOW)))
        return np.concatenate([[0.0], np.geomspace(_scale.Z_LOW, _scale.Z_FAR, decades * _scale.Z_PER_DECADE + 1)])

    def _summarize(self, mean, std, target):
        rows = _scale.sigma_rows(std.ravel())
        z = _scale.coordinate(mean.ravel(), std.ravel(), target.ravel(), rows)
        edges = self.positive_edges()
        return {"counts_": _scale.histogram2d(rows, _scale.positive_bin(z, edges), edges.size)}

    def _finalize(self) -> None:
        fit = _scale.fit_scale(self.counts_, self.positive_edges(), min_scale=float(self.min_scale))
        self.scale_ = np.asarray(max(fit.s, float(self.min_scale)))
        self.floor_ = np.asarray(fit.c)
        self.outlier_fraction_ = np.asarray(fit.eps)

    def effective_std(self, std: np.ndarray) -> np.ndarray:
        """``sigma_eff = sqrt((scale_ * std)^2 + floor_^2)``, > 0 for every std >= 0."""
        check_is_fitted(self)
        return np.hypot(float(self.scale_) * np.asarray(std, dtype=np.float64), float(self.floor_))

    def fit_report(self) -> dict[str, float]:
        """``scale``, ``floor`` and ``outlier_fraction`` (the fitted ``s``, ``c`` and ``eps``)."""
        check_is_fitted(self)
        return {"scale": float(self.scale_), "floor": float(self.floor_),
                "outlier_fraction": float(self.outlier_fraction_)}

    def cdf(self, mean, std, values):
        """CDF of N(mean, sigma_eff^2) at ``values``."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        return ndtr((values - mean) / self.effective_std(std))

    def quantile(self, mean, std, q):
        """``q``-quantile of N(mean, sigma_eff^2)."""
        check_is_fitted(self)
        q = check_probabilities(q)
        mean, std, q = check_inputs(mean, std, q, other_name="q")
        return mean + self.effective_std(std) * ndtri(q)

    def nll(self, mean, std, target):
        """Per-voxel negative log density of N(mean, sigma_eff^2) at ``target``."""
        check_is_fitted(self)
        mean, std, target = check_inputs(mean, std, target)
        scale = self.effective_std(std)
        return 0.5 * np.log(2.0 * np.pi) + np.log(scale) + 0.5 * ((target - mean) / scale) ** 2

    def crps(self, mean, std, target):
        """Per-voxel CRPS of N(mean, sigma_eff^2), exact (closed form)."""
        check_is_fitted(self)
        mean, std, target = check_inputs(mean, std, target)
        from uqsynth.predictive import gaussian_crps

        return gaussian_crps(target, mean, self.effective_std(std))

    def moments(self, mean, std):
        """``(mean, sigma_eff)``: the calibrated Gaussian's mean and std."""
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        return mean, self.effective_std(std)
