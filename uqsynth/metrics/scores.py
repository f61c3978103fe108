"""Proper scores and prediction intervals: CRPS, Gaussian NLL, interval coverage (PICP) and width.

Proper scores reward sharpness and calibration together: a predictor cannot
improve its expected score by reporting anything but what it believes.

- CRPS (continuous ranked probability score) is in intensity units and
  reduces to the absolute error when the std goes to 0, so it reads like
  the MAE of a probabilistic prediction. For the Gaussian predictive it is
  exact (``properscoring.crps_gaussian``); for a calibrated (non-Gaussian)
  one :func:`crps_from_quantiles` integrates the pinball loss over
  quantile levels.
- Gaussian NLL is only defined for the Gaussian predictive (an isotonic
  map has no useful density; a calibrator whose predictive has one can give
  it as ``nll_fn``). A voxel every MC sample agreed on (std below
  :data:`STD_FLOOR`) is a point mass: its NLL is infinite when it is wrong
  and minus infinite when it is right, and any floor would make a handful
  of them dominate the mean of millions. Such voxels are left out of the
  NLL and counted (``n_left_out``), so the number stays finite and says
  what it covers.
- PICP (prediction interval coverage probability) is the fraction of truths
  inside the central ``level`` interval; calibrated means PICP = level. The
  mean width says what that coverage costs.

Units: like the paper's RMSE, every number in intensity units is on the
``[0, scale]`` scale (``scale=255``): CRPS and widths are multiplied by
``scale``, and the NLL is that of the density on the scaled intensities
(``NLL_[0,1] + log(scale)``). Inputs are on the normalized scale.

Each score has a one-shot function (mean over the voxels in a mask) and a
streaming accumulator of sums and counts, for a test set that does not fit
in memory; the accumulators of several subjects or processes add up
(``merge``).
"""

from __future__ import annotations

import numpy as np
import properscoring

from uqsynth.metrics._predictive import IntervalFn, QuantileFn, gaussian_interval, gaussian_quantile
from uqsynth.metrics._voxels import level_key, masked_voxels

DEFAULT_INTERVAL_LEVELS = (0.5, 0.9, 0.95)
"""Central interval levels reported by default."""

DEFAULT_CRPS_LEVELS_COUNT = 39
"""Quantile levels used by :func:`crps_from_quantiles` (midpoints of 39 equal cells of (0, 1)).

Why 39: each level costs one call of the quantile function on every voxel
(about 60 ms per calibrator on a 2-million-voxel brain), and 39 midpoints are
already within 0.15 % of the exact Gaussian CRPS (99: 0.04 %; 19: 0.4 %).
"""

STD_FLOOR = 1e-6
"""Predictive std (normalized [0, 1] scale) below which a voxel has no resolved spread.

Its T Monte Carlo samples agree to float32 round-off. The uncalibrated
Gaussian's probabilistic scores floor the std here (its NLL leaves such
voxels out and counts them): an error divided by a round-off std is
meaningless. Calibrators fit and score them: they fit a floor of their own
(:mod:`uqsynth.calibration`).
"""


def crps_levels(count: int = DEFAULT_CRPS_LEVELS_COUNT) -> np.ndarray:
    """The midpoint grid ``(k - 0.5) / count``, ``k = 1..count``, of the quantile-based CRPS."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return (np.arange(1, count + 1) - 0.5) / count


def pinball_loss(truth: np.ndarray, quantile: np.ndarray, level: float) -> np.ndarray:
    """Per-voxel pinball (quantile) loss ``max(level * u, (level - 1) * u)``, ``u = truth - quantile``."""
    u = np.asarray(truth, dtype=np.float64) - np.asarray(quantile, dtype=np.float64)
    return np.maximum(level * u, (level - 1.0) * u)


def crps_gaussian(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    std_floor: float = STD_FLOOR,
    scale: float = 255.0,
) -> float:
    """Mean CRPS of N(mean, std^2) inside ``mask``, exact (``properscoring.crps_gaussian``), on ``[0, scale]``.

    Args:
        std_floor: Stds below it are raised to it (normalized scale), so a
            zero std gives the absolute error rather than NaN.
    """
    return _one_shot(CRPSAccumulator(std_floor=std_floor, scale=scale), truth, mean, std, mask)["crps"]


def crps_from_quantiles(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    quantile_fn: QuantileFn | None = None,
    levels: np.ndarray | None = None,
    scale: float = 255.0,
) -> float:
    """Mean CRPS of any predictive given by its quantile function, on ``[0, scale]``.

    Uses ``CRPS(F, y) = 2 * integral_0^1 pinball_tau(y - F^-1(tau)) dtau``
    (Gneiting and Raftery 2007, eq. 22 / Laio and Tamea 2007), approximated by
    the midpoint rule: ``2 * mean_k pinball_{tau_k}`` over ``levels``
    (default: 39 midpoints ``(k - 0.5) / 39``). The integrand is bounded and
    vanishes at both ends, so the approximation converges quickly: for a
    Gaussian the default grid is within 0.15 % of the exact CRPS, whether
    the std is right or 3 times off (pass ``levels=crps_levels(99)`` for
    0.04 %). Use it for
    recalibrated predictives (a calibrator's ``quantile``); the Gaussian
    itself is scored exactly by :func:`crps_gaussian`.

    Args:
        quantile_fn: ``quantile_fn(mean, std, q)``; the Gaussian's by default.
        levels: Quantile levels in (0, 1), a midpoint grid for the
            approximation to hold.
    """
    accumulator = CRPSAccumulator(quantile_fn=quantile_fn or gaussian_quantile, levels=levels, scale=scale)
    return _one_shot(accumulator, truth, mean, std, mask)["crps"]


def gaussian_nll(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    std_floor: float = STD_FLOOR,
    scale: float = 255.0,
) -> float:
    """Mean Gaussian negative log-likelihood inside ``mask``, of the density on ``[0, scale]``.

    ``0.5 log(2 pi s^2) + (y - mean)^2 / (2 s^2)`` with ``s = scale * std``,
    over the voxels whose std is at least ``std_floor`` (normalized scale):
    below it the predictive is a point mass with no finite NLL, so those
    voxels are left out (:class:`NLLAccumulator` counts them). Lower is
    better. NaN when every voxel is left out.
    """
    return _one_shot(NLLAccumulator(std_floor=std_floor, scale=scale), truth, mean, std, mask)["nll"]


def interval_scores(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    interval_fn: IntervalFn | None = None,
    levels: tuple[float, ...] = DEFAULT_INTERVAL_LEVELS,
    scale: float = 255.0,
) -> dict[str, dict[str, float]]:
    """Coverage and mean width of central intervals at ``levels``.

    Args:
        interval_fn: ``interval_fn(mean, std, level) -> (lower, upper)``; the
            Gaussian's by default, or a fitted calibrator's ``interval``.

    Returns:
        ``{"picp": {"0.5": ..., ...}, "width": {"0.5": ..., ...}}``: the
        fraction of truths with ``lower <= truth <= upper`` and the mean
        ``upper - lower`` on the ``[0, scale]`` scale, keyed by level.
    """
    accumulator = IntervalAccumulator(interval_fn=interval_fn, levels=levels, scale=scale)
    return _one_shot(accumulator, truth, mean, std, mask)


def _one_shot(accumulator, truth, mean, std, mask) -> dict:
    return accumulator.update(truth, mean, std, mask).result()


class _SumAccumulator:
    """Sums over voxels and a voxel count; subclasses say what is summed."""

    def __init__(self) -> None:
        self.sums_: dict[str, float] = {}
        self.n_ = 0

    def update(
        self, truth: np.ndarray, mean: np.ndarray, std: np.ndarray, mask: np.ndarray | None = None
    ):
        """Add the voxels inside ``mask`` of one batch; return ``self``."""
        truth, mean, std = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
        for name, value in self._batch_sums(truth, mean, std).items():
            self.sums_[name] = self.sums_.get(name, 0.0) + float(value)
        self.n_ += truth.size
        return self

    def merge(self, other):
        """Add the sums of ``other`` (same class and settings); return ``self``."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name, value in other.sums_.items():
            self.sums_[name] = self.sums_.get(name, 0.0) + value
        self.n_ += other.n_
        return self

    def _means(self) -> dict[str, float]:
        if self.n_ == 0:
            raise ValueError("no voxels accumulated yet; call update first")
        return {name: value / self.n_ for name, value in self.sums_.items()}

    def _batch_sums(self, truth: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
        raise NotImplementedError


class CRPSAccumulator(_SumAccumulator):
    """Streaming mean CRPS: exact for the Gaussian, or quantile-based for ``quantile_fn``.

    Args:
        quantile_fn: None for the Gaussian predictive, scored exactly with
            ``properscoring.crps_gaussian``; otherwise ``quantile_fn(mean,
            std, q)`` scored with the pinball approximation of
            :func:`crps_from_quantiles`.
        levels: Quantile levels of the approximation (default :func:`crps_levels`).
        std_floor: Floor on the std for the exact Gaussian CRPS.
        scale: Intensity scale of the result.
    """

    def __init__(
        self,
        *,
        quantile_fn: QuantileFn | None = None,
        levels: np.ndarray | None = None,
        std_floor: float = STD_FLOOR,
        scale: float = 255.0,
    ) -> None:
        super().__init__()
        self.quantile_fn = quantile_fn
        self.levels = crps_levels() if levels is None else np.asarray(levels, dtype=np.float64)
        if ((self.levels <= 0) | (self.levels >= 1)).any():
            raise ValueError("CRPS quantile levels must lie in (0, 1)")
        self.std_floor = std_floor
        self.scale = scale

    def _batch_sums(self, truth, mean, std):
        if self.quantile_fn is None:
            crps = properscoring.crps_gaussian(truth, mean, np.maximum(std, self.std_floor))
            return {"crps": np.sum(crps) * self.scale}
        total = 0.0
        for tau in self.levels:
            total += float(np.sum(pinball_loss(truth, self.quantile_fn(mean, std, float(tau)), float(tau))))
        return {"crps": 2.0 * total / self.levels.size * self.scale}

    def result(self) -> dict[str, float]:
        """``{"crps": mean CRPS on [0, scale], "n": voxels}``."""
        return {"crps": self._means()["crps"], "n": int(self.n_)}


class NLLAccumulator(_SumAccumulator):
    """Streaming mean NLL: the Gaussian's (see :func:`gaussian_nll`), or that of ``nll_fn``.

    Args:
        std_floor: Voxels with a smaller std (normalized scale) are point
            masses: left out of the Gaussian NLL and counted in ``n_left_out``.
        scale: Intensity scale of the density (adds ``log(scale)`` to a
            normalized-scale NLL).
        nll_fn: ``nll_fn(mean, std, truth) -> per-voxel NLL`` on the
            normalized scale, e.g. a calibrated predictive's; voxels where it
            is not finite are left out and counted. ``None``: the Gaussian.

    Attributes:
        n_left_out_: Voxels left out (point masses, or non-finite ``nll_fn`` values).
    """

    def __init__(self, *, std_floor: float = STD_FLOOR, scale: float = 255.0, nll_fn=None) -> None:
        super().__init__()
        if not std_floor > 0:
            raise ValueError(f"std_floor must be positive, got {std_floor}")
        self.std_floor = std_floor
        self.scale = scale
        self.nll_fn = nll_fn
        self.n_left_out_ = 0

    def update(self, truth, mean, std, mask=None):
        """Add the voxels inside ``mask``, leaving out (and counting) those without a finite NLL; return ``self``."""
        truth, mean, std = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
        if self.nll_fn is None:
            kept = std >= self.std_floor
            s = std[kept] * self.scale
            z = (truth[kept] - mean[kept]) * self.scale / s
            nll = 0.5 * np.log(2.0 * np.pi) + np.log(s) + 0.5 * z * z
        else:
            nll = np.asarray(self.nll_fn(mean, std, truth), dtype=np.float64).ravel() + np.log(self.scale)
            kept = np.isfinite(nll)
            nll = nll[kept]
        self.sums_["nll"] = self.sums_.get("nll", 0.0) + float(np.sum(nll))
        self.n_ += int(nll.size)
        self.n_left_out_ += int(truth.size - nll.size)
        return self

    def merge(self, other):
        """Add the sums and counts of ``other``; return ``self``."""
        super().merge(other)
        self.n_left_out_ += other.n_left_out_
        return self

    def result(self) -> dict[str, float]:
        """``{"nll": mean NLL over the voxels kept (NaN if none), "n": voxels kept, "n_left_out": voxels left out}``."""
        if self.n_ == 0 and self.n_left_out_ == 0:
            raise ValueError("no voxels accumulated yet; call update first")
        nll = self.sums_["nll"] / self.n_ if self.n_ else float("nan")
        return {"nll": nll, "n": int(self.n_), "n_left_out": int(self.n_left_out_)}


class IntervalAccumulator(_SumAccumulator):
    """Streaming coverage (PICP) and mean width of central intervals (see :func:`interval_scores`)."""

    def __init__(
        self,
        *,
        interval_fn: IntervalFn | None = None,
        levels: tuple[float, ...] = DEFAULT_INTERVAL_LEVELS,
        scale: float = 255.0,
    ) -> None:
        super().__init__()
        self.interval_fn = interval_fn
        self.levels = tuple(float(level) for level in levels)
        if not self.levels or any(not 0.0 < level < 1.0 for level in self.levels):
            raise ValueError(f"interval levels must lie in (0, 1), got {levels}")
        self.scale = scale

    def _batch_sums(self, truth, mean, std):
        interval_fn = self.interval_fn or gaussian_interval
        sums = {}
        for level in self.levels:
            lower, upper = interval_fn(mean, std, level)
            sums[f"inside {level!r}"] = np.count_nonzero((lower <= truth) & (truth <= upper))
            sums[f"width {level!r}"] = np.sum(upper - lower) * self.scale
        return sums

    def result(self) -> dict[str, dict[str, float]]:
        """``{"picp": {level: fraction}, "width": {level: mean width}, "n": voxels}``, levels as strings."""
        means = self._means()
        return {
            "picp": {level_key(level): means[f"inside {level!r}"] for level in self.levels},
            "width": {level_key(level): means[f"width {level!r}"] for level in self.levels},
            "n": int(self.n_),
        }
