"""The calibration curve (the paper's Figs. 6 and 7), its RMS distance to y = x, and the miscalibration area.

Definition (Kuleshov et al. 2018, as the paper): for each expected
probability ``p`` on an even grid, the observed probability is the fraction
of voxels whose truth lies at or below the predicted ``p``-quantile,
``P_hat(p) = mean_t 1[y_t <= F_t^-1(p)]``. A calibrated predictor has
``P_hat(p) = p``. The quantile function is the Gaussian's by default, or a
calibrator's ``quantile`` for the curve after recalibration.

Grid: ``p = 0.05, 0.10, ..., 0.95`` by default. The end points are left
out because ``P_hat(0) = 0`` and ``P_hat(1) = 1`` hold for any predictor
(the 0- and 1-quantiles of a continuous distribution are -inf and +inf, and
calibrators only answer ``q`` in (0, 1)); counting them would only pull the
RMS towards 0. A grid that includes 0 or 1 is accepted and those points
are set to 0 and 1 exactly (uncertainty-toolbox's grid ``linspace(0, 1, 100)``
does so).

Figures of merit:

- :func:`calibration_rms`: ``sqrt(mean_p (P_hat(p) - p)^2)`` over the grid,
  the paper's "RMS error to y = x" and uncertainty-toolbox's
  ``root_mean_squared_calibration_error``;
- :func:`miscalibration_area`: the geometric area between the
  piecewise-linear curve and the diagonal over [0, 1], with the exact end
  points (0, 0) and (1, 1) added, counting crossings of the diagonal as two
  triangles (uncertainty-toolbox's ``miscalibration_area``, which tends to
  the mean absolute calibration error as the grid gets finer).

Note on uncertainty-toolbox's ``prop_type="quantile"``: it counts
``(mean - y) / std <= Phi^-1(p)``, i.e. truths *above* the ``(1 - p)``-quantile,
so its curve is this one reflected through (0.5, 0.5). On a grid symmetric
about 0.5 both figures of merit are the same (tested).
"""

from __future__ import annotations

import numpy as np

from uqsynth.metrics._predictive import QuantileFn, gaussian_quantile
from uqsynth.metrics._voxels import masked_voxels

DEFAULT_LEVELS = np.round(np.arange(1, 20) * 0.05, 10)
"""The expected probabilities of the curve: 0.05, 0.10, ..., 0.95."""


def calibration_curve(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    quantile_fn: QuantileFn | None = None,
    levels: np.ndarray = DEFAULT_LEVELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected and observed probabilities of the calibration curve, in one shot.

    Args:
        truth: True intensities.
        mean: Predictive means, same shape.
        std: Predictive stds, same shape.
        mask: Voxels to use; None for all.
        quantile_fn: ``quantile_fn(mean, std, q)``; the Gaussian's by default,
            or a fitted calibrator's ``quantile``.
        levels: Expected probabilities, increasing, in [0, 1].

    Returns:
        ``(expected, observed)`` arrays of the grid's length.
    """
    accumulator = CalibrationCurveAccumulator(levels=levels, quantile_fn=quantile_fn)
    accumulator.update(truth, mean, std, mask)
    return accumulator.levels_, accumulator.observed()


def calibration_rms(expected: np.ndarray, observed: np.ndarray) -> float:
    """RMS distance of the curve to y = x over its grid points: the paper's figure of merit."""
    expected, observed = np.asarray(expected, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    return float(np.sqrt(np.mean((observed - expected) ** 2)))


def miscalibration_area(expected: np.ndarray, observed: np.ndarray) -> float:
    """Area between the piecewise-linear calibration curve and y = x over [0, 1].

    The end points (0, 0) and (1, 1) are added when missing (they hold for
    every predictor). Where the curve crosses the diagonal inside a segment
    the two triangles count separately, as in uncertainty-toolbox, so
    errors of opposite sign do not cancel. Ranges from 0 (calibrated) to 0.5.
    """
    x = np.asarray(expected, dtype=np.float64)
    y = np.asarray(observed, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected and observed must be 1-D of one length, got {x.shape} and {y.shape}")
    if x.size == 0 or x[0] > 0.0:
        x, y = np.concatenate([[0.0], x]), np.concatenate([[0.0], y])
    if x[-1] < 1.0:
        x, y = np.concatenate([x, [1.0]]), np.concatenate([y, [1.0]])
    gap = y - x
    left, right, width = gap[:-1], gap[1:], np.diff(x)
    same_side = left * right >= 0
    trapezoid = width * np.abs(left + right) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        # Crossing: two triangles meeting where the gap is 0, at fraction |l| / (|l| + |r|).
        hourglass = width * (left**2 + right**2) / (2.0 * (np.abs(left) + np.abs(right)))
    return float(np.sum(np.where(same_side, trapezoid, hourglass)))


class CalibrationCurveAccumulator:
    """The calibration curve, accumulated batch by batch (e.g. one test volume at a time).

    Keeps, per expected probability, the number of voxels whose truth lies
    at or below the predicted quantile, and the number of voxels: a few
    integers, so a test set of any size never sits in memory at once, and
    accumulators from several subjects or processes add up (:meth:`merge`).

    Args:
        levels: Expected probabilities, increasing, in [0, 1].
        quantile_fn: ``quantile_fn(mean, std, q)``; the Gaussian's by default.

    Attributes:
        levels_: The grid, float64.
        below_: Per level, voxels with ``truth <= quantile`` (int64).
        n_: Voxels seen.
    """

    def __init__(self, *, levels: np.ndarray = DEFAULT_LEVELS, quantile_fn: QuantileFn | None = None) -> None:
        levels = np.asarray(levels, dtype=np.float64)
        if levels.ndim != 1 or levels.size == 0:
            raise ValueError("levels must be a non-empty 1-D grid of probabilities")
        if (levels < 0).any() or (levels > 1).any() or (np.diff(levels) <= 0).any():
            raise ValueError(f"levels must increase strictly within [0, 1], got {levels}")
        self.quantile_fn = quantile_fn
        self.levels_ = levels
        self.below_ = np.zeros(levels.size, dtype=np.int64)
        self.n_ = 0

    def update(
        self, truth: np.ndarray, mean: np.ndarray, std: np.ndarray, mask: np.ndarray | None = None
    ) -> CalibrationCurveAccumulator:
        """Count one batch of voxels (those inside ``mask``); return ``self``."""
        truth, mean, std = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
        quantile_fn = self.quantile_fn or gaussian_quantile
        for i, p in enumerate(self.levels_):
            if p == 0.0:
                continue  # nothing lies below the 0-quantile
            if p == 1.0:
                self.below_[i] += truth.size
                continue
            self.below_[i] += int(np.count_nonzero(truth <= quantile_fn(mean, std, float(p))))
        self.n_ += truth.size
        return self

    def merge(self, other: CalibrationCurveAccumulator) -> CalibrationCurveAccumulator:
        """Add the counts of ``other`` (same grid); return ``self``."""
        if not np.array_equal(other.levels_, self.levels_):
            raise ValueError("cannot merge calibration curves on different grids")
        self.below_ += other.below_
        self.n_ += other.n_
        return self

    def observed(self) -> np.ndarray:
        """Observed probability per level: the fraction of voxels at or below the quantile."""
        if self.n_ == 0:
            raise ValueError("no voxels accumulated yet; call update first")
        return self.below_ / float(self.n_)

    def result(self) -> dict:
        """JSON-ready curve and figures of merit.

        Returns:
            ``{"expected": [...], "observed": [...], "rms": float,
            "miscalibration_area": float, "n": int}``.
        """
        observed = self.observed()
        return {
            "expected": self.levels_.tolist(),
            "observed": observed.tolist(),
            "rms": calibration_rms(self.levels_, observed),
            "miscalibration_area": miscalibration_area(self.levels_, observed),
            "n": int(self.n_),
        }
