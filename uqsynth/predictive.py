"""Per-voxel predictive distributions: one interface for the model's Gaussian and every calibrated one.

A :class:`Predictive` holds one distribution per voxel (arrays of any
shape) and answers what metrics, intervals and maps ask of it: its mean
and std, CDF, quantiles, central intervals, negative log density and CRPS.
The model's MC sampling gives a :class:`GaussianPredictive`; a fitted
calibrator maps a predictive to another
(:meth:`uqsynth.calibration.base.Calibrator.calibrate`, which returns a
:class:`CalibratedPredictive`), so built-in and plugin calibrators, and
the uncalibrated Gaussian, are used through one path.

Arguments broadcast against the voxels' shape: ``predictive.cdf(values)``
with ``values`` of the voxels' shape gives one probability per voxel, and
``predictive.quantile(q)`` with a scalar ``q`` one quantile per voxel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy.special import ndtr, ndtri

try:  # a dependency (pyproject.toml); the closed form below is the same formula
    import properscoring
except ImportError:  # pragma: no cover
    properscoring = None

#: Quantile levels of the default CRPS and moments of a predictive known only by its quantiles:
#: the midpoints ``(k - 0.5) / 99``, within 0.04 % of the exact Gaussian CRPS.
MIDPOINT_LEVELS = (np.arange(1, 100) - 0.5) / 99


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _check_q(q: float | np.ndarray, *, closed: bool = False) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    outside = ~((q >= 0.0) & (q <= 1.0)) if closed else ~((q > 0.0) & (q < 1.0))
    if outside.any():
        raise ValueError(f"q must lie in {'[0, 1]' if closed else '(0, 1)'}, got {q[outside].flat[0]}")
    return q


def gaussian_crps(target: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-voxel CRPS of N(mean, std^2) at ``target`` (properscoring's closed form); ``|target - mean|`` where std is 0."""
    target, mean, std = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (target, mean, std)))
    point = std == 0
    safe = np.where(point, 1.0, std)
    if properscoring is not None:
        crps = np.asarray(properscoring.crps_gaussian(target, mean, safe), dtype=np.float64)
    else:  # pragma: no cover - Gneiting and Raftery (2007), eq. 5
        z = (target - mean) / safe
        pdf = np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
        crps = safe * (z * (2.0 * ndtr(z) - 1.0) + 2.0 * pdf - 1.0 / np.sqrt(np.pi))
    return np.where(point, np.abs(target - mean), crps)


def crps_from_quantiles(quantile, target: np.ndarray, levels: np.ndarray = MIDPOINT_LEVELS) -> np.ndarray:
    """Per-voxel CRPS from a quantile function: ``2 * mean_k pinball_{tau_k}(target - quantile(tau_k))``.

    The midpoint rule on ``CRPS = 2 * integral_0^1 pinball_tau dtau`` (Gneiting
    and Raftery 2007, eq. 22), as :func:`uqsynth.metrics.crps_from_quantiles`;
    one level at a time, so memory stays that of one quantile map.

    Args:
        quantile: ``quantile(tau) -> array`` of the voxels' shape.
        target: The truth.
        levels: Midpoints of equal cells of (0, 1).
    """
    target = np.asarray(target, dtype=np.float64)
    total = None
    for tau in levels:
        u = target - np.asarray(quantile(float(tau)), dtype=np.float64)
        loss = np.maximum(tau * u, (tau - 1.0) * u)
        total = loss if total is None else total + loss
    return 2.0 * total / len(levels)


def moments_from_quantiles(quantile, levels: np.ndarray = MIDPOINT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of a distribution known by its quantile function, by the midpoint rule over ``levels``.

    An approximation: it leaves out the outer ``1 / len(levels)`` of the
    mass, so the std of a Gaussian comes out about 2 % small with the default.
    """
    first = second = None
    for tau in levels:
        x = np.asarray(quantile(float(tau)), dtype=np.float64)
        first = x if first is None else first + x
        second = x * x if second is None else second + x * x
    mean = first / len(levels)
    with np.errstate(invalid="ignore"):
        variance = np.maximum(second / len(levels) - mean * mean, 0.0)
    return mean, np.sqrt(variance)


class Predictive(ABC):
    """A predictive distribution per voxel.

    Subclasses implement :attr:`mean`, :attr:`std`, :meth:`cdf` and
    :meth:`quantile`; :meth:`interval` and :meth:`crps` follow from
    :meth:`quantile`, and :meth:`nll` raises ``NotImplementedError`` unless
    the distribution has a (useful) density.
    """

    @property
    @abstractmethod
    def mean(self) -> np.ndarray:
        """The mean of each voxel's distribution."""

    @property
    @abstractmethod
    def std(self) -> np.ndarray:
        """The standard deviation of each voxel's distribution."""

    @abstractmethod
    def cdf(self, values: np.ndarray) -> np.ndarray:
        """Probability that the truth is at or below ``values`` (in [0, 1])."""

    @abstractmethod
    def quantile(self, q: float | np.ndarray) -> np.ndarray:
        """The ``q``-quantile, ``q`` in (0, 1)."""

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Central interval ``(quantile((1 - level) / 2), quantile((1 + level) / 2))`` holding ``level`` of the mass."""
        level = _check_level(level)
        tail = (1.0 - level) / 2.0
        if 1.0 - tail == 1.0:
            raise ValueError(f"level {level!r} is too close to 1: the upper tail {tail:.1e} is below float64 resolution")
        return self.quantile(tail), self.quantile(1.0 - tail)

    def nll(self, target: np.ndarray) -> np.ndarray:
        """Per-voxel negative log density at ``target``.

        Raises:
            NotImplementedError: The distribution has no density (a step
                function, a point mass) or none worth scoring.
        """
        raise NotImplementedError(f"{type(self).__name__} has no density to score")

    def crps(self, target: np.ndarray) -> np.ndarray:
        """Per-voxel continuous ranked probability score at ``target`` (units of the target).

        Default: the quantile midpoint rule (:func:`crps_from_quantiles`, 99 levels).
        """
        return crps_from_quantiles(self.quantile, target)


class GaussianPredictive(Predictive):
    """N(mean, std^2) per voxel: the model's predictive before calibration.

    ``std`` may be 0 where the caller accepts a point mass at the mean
    there (the uncalibrated model says so for voxels whose MC samples all
    agree): its CDF is then a step at the mean, its quantiles and interval
    bounds are the mean, its CRPS is the absolute error and its NLL is
    infinite (no density). Calibrate such voxels
    (:meth:`uqsynth.calibration.base.Calibrator.calibrate`) to give them a
    width.

    Args:
        mean: Predictive means.
        std: Predictive standard deviations, >= 0 (NaN passes through, as in numpy).

    Raises:
        ValueError: A negative std, or shapes that do not broadcast.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        try:
            mean, std = np.broadcast_arrays(mean, std)
        except ValueError:
            raise ValueError(f"shapes do not match: mean {mean.shape}, std {std.shape}") from None
        if (std < 0).any():
            raise ValueError(f"std must be >= 0, but {int((std < 0).sum())} value(s) are negative")
        self._mean, self._std = mean, std

    @property
    def mean(self) -> np.ndarray:
        return self._mean

    @property
    def std(self) -> np.ndarray:
        return self._std

    def cdf(self, values):
        """``Phi((values - mean) / std)``; a step at the mean where std is 0."""
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (values - self._mean) / self._std
        point = np.broadcast_to(self._std == 0, z.shape)
        return np.where(point, (values >= self._mean).astype(np.float64), ndtr(z))

    def quantile(self, q):
        """``mean + std * Phi^-1(q)``; ``q`` = 0 and 1 give -inf and +inf (the mean where std is 0)."""
        with np.errstate(invalid="ignore"):
            value = self._mean + self._std * ndtri(_check_q(q, closed=True))
        if np.isnan(value).any():  # only 0 * inf, where std is 0 and q is 0 or 1
            value = np.where(self._std == 0, self._mean, value)
        return value

    def interval(self, level):
        """``mean -/+ Phi^-1(1/2 + level/2) * std``."""
        half = float(ndtri(0.5 + _check_level(level) / 2.0))
        return self._mean - half * self._std, self._mean + half * self._std

    def nll(self, target):
        """``0.5 log(2 pi std^2) + (target - mean)^2 / (2 std^2)``; infinite where std is 0."""
        target = np.asarray(target, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = 0.5 * np.log(2.0 * np.pi * self._std**2) + 0.5 * ((target - self._mean) / self._std) ** 2
        point = np.broadcast_to(self._std == 0, value.shape)
        return np.where(point, np.inf, value)

    def crps(self, target):
        """Exact Gaussian CRPS (:func:`gaussian_crps`)."""
        return gaussian_crps(target, self._mean, self._std)


class CalibratedPredictive(Predictive):
    """The predictive a fitted calibrator makes of another one (what :meth:`Calibrator.calibrate` returns).

    A calibrator learns from (mean, std) summaries, so it sees the
    predictive it recalibrates (``base``) through ``base.mean`` and
    ``base.std``. ``cdf``, ``quantile`` and ``interval`` are the calibrator's
    (``calibrator.cdf(mean, std, values)`` and so on); ``nll``, ``crps`` and
    the moments are the calibrator's ``nll``, ``crps`` and ``moments`` where
    it has them (every :class:`~uqsynth.calibration.base.Calibrator` does,
    by default from its quantiles), else computed from its quantiles here.

    Args:
        calibrator: A fitted calibrator.
        base: The predictive it recalibrates.
    """

    def __init__(self, calibrator, base: Predictive) -> None:
        self.calibrator = calibrator
        self.base = base
        self._moments: tuple[np.ndarray, np.ndarray] | None = None

    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        return self.base.mean, self.base.std

    def _calibrated_moments(self) -> tuple[np.ndarray, np.ndarray]:
        if self._moments is None:
            moments = getattr(self.calibrator, "moments", None)
            if moments is not None:
                self._moments = tuple(np.asarray(a, dtype=np.float64) for a in moments(*self._base()))
            else:
                self._moments = moments_from_quantiles(self.quantile)
        return self._moments

    @property
    def mean(self) -> np.ndarray:
        """The calibrated distribution's mean."""
        return self._calibrated_moments()[0]

    @property
    def std(self) -> np.ndarray:
        """The calibrated distribution's std."""
        return self._calibrated_moments()[1]

    def cdf(self, values):
        return self.calibrator.cdf(*self._base(), values)

    def quantile(self, q):
        return self.calibrator.quantile(*self._base(), q)

    def interval(self, level):
        return self.calibrator.interval(*self._base(), level)

    def nll(self, target):
        nll = getattr(self.calibrator, "nll", None)
        if nll is None:
            raise NotImplementedError(f"{type(self.calibrator).__name__} gives no density")
        return nll(*self._base(), target)

    def crps(self, target):
        crps = getattr(self.calibrator, "crps", None)
        if crps is None:
            return crps_from_quantiles(self.quantile, target)
        return crps(*self._base(), target)

    def __repr__(self) -> str:
        return f"CalibratedPredictive({self.calibrator!r}, {type(self.base).__name__})"
