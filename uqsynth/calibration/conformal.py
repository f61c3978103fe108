"""Split conformal prediction on residuals normalized by a fitted effective scale, with a streaming score summary.

Format change (uqsynth-calibrator-2): the score is ``|r| / sqrt(std^2 + c^2)``
rather than ``|r| / std``, with ``c`` fitted on a separate share of the
voxels, and the summary holds a score histogram per candidate floor; files
of the earlier format are refused when loaded.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration import _scale
from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities, promise
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.config import Interval, Rule

#: Levels are rounded to this many decimals before the rank rule, so that
#: ``interval(mean, std, 0.9)`` and ``quantile(mean, std, 0.95)`` use the same
#: rank despite ``2 * 0.95 - 1`` not being exactly ``0.9`` in floating point.
_LEVEL_DECIMALS = 12

#: The floors a score histogram is kept for (units of the target): eight per decade from 1e-6 to 1e4.
FLOOR_CANDIDATES = 10.0 ** (np.arange(-48, 33) / 8.0)

#: Every voxel whose hash falls in this share goes to fitting the floor, the rest to the scores.
SCALE_SHARE = 0.25

_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that scrambles every bit into every other."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX[0]
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX[1]
    return x ^ (x >> np.uint64(31))


def in_scale_share(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Which voxels fit the floor (the rest give the scores): a hash of their three float64 values.

    Why a hash of the values and not of positions or batches: it assigns a
    voxel the same way whatever batch it arrives in and whichever process
    sees it, so ``fit``, ``partial_fit`` over batches and ``merge`` of parts
    agree exactly; and, being a pseudo-random function (splitmix64's mixer
    of the values' bits), it acts as an independent coin flip per voxel that
    favours neither large nor small residuals, as split conformal needs.
    """
    bits = [np.ascontiguousarray(a, dtype=np.float64).ravel().view(np.uint64) for a in (mean, std, target)]
    with np.errstate(over="ignore"):
        hashed = _mix(bits[0] ^ _mix(bits[1] ^ _mix(bits[2])))
    return hashed < np.uint64(int(SCALE_SHARE * 2.0**64))


def upper_bin(scores: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The first bin whose upper edge is >= each score (so replacing it by that edge never makes it smaller).

    ``np.searchsorted(upper[:-1], scores, side="left")`` for log-spaced edges
    (``upper``: ``bins + 1`` of them from ``low`` to ``high``, then ``+inf``),
    computed from the log of the score and then corrected by exact
    comparisons with the edges: the same bins, several times faster.
    """
    edges = upper[:-1]
    low, step = edges[0], np.log(edges[-1] / edges[0]) / (edges.size - 1)
    with np.errstate(divide="ignore"):
        guess = np.ceil(np.log(np.maximum(scores, 0.0) / low) / step)
    index = np.clip(np.nan_to_num(guess, nan=0.0, neginf=0.0, posinf=edges.size), 0, edges.size).astype(np.int64)
    # Exact: index is the first i with edges[i] >= score; the guess is off by at most one either way.
    above = index < edges.size
    index[above] += scores[above] > edges[index[above]]
    below = index > 0
    index[below] -= scores[below] <= edges[index[below] - 1]
    return index


def floor_share_histograms(
    mean: np.ndarray,
    std: np.ndarray,
    target: np.ndarray,
    floors: np.ndarray,
    upper: np.ndarray,
    labels: np.ndarray | None = None,
    slots: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The summary of the split of :class:`ConformalCalibrator` (and of the subject-level calibrators).

    Voxels outside :func:`in_scale_share` are scored ``|y - mean| / sqrt(std^2
    + floor^2)`` for every candidate floor and counted by :func:`upper_bin`;
    the share's voxels are counted by std and standardized residual, for
    fitting the floor (:func:`nearest_floor`).

    Args:
        mean, std, target: 1D arrays of voxels.
        floors: Candidate floors.
        upper: Upper bin edges (``upper_edges()``).
        labels: Integer region label per voxel, for per-region histograms, or None.
        slots: Region labels ``1..slots`` get histograms of their own.

    Returns:
        ``counts`` of shape ``(1 + slots, len(floors), len(upper))``, slot 0 holding
        every scored voxel and slot ``r`` those labelled ``r``; and the floor share's ``scale_counts``.
    """
    share = in_scale_share(mean, std, target)
    residual, scored_std = np.abs(target - mean)[~share], std[~share]
    slot = np.zeros(residual.size, dtype=np.int64)
    if labels is not None and slots:
        scored_labels = np.asarray(labels).ravel()[~share]
        slot = np.where((scored_labels >= 1) & (scored_labels <= slots), scored_labels, 0).astype(np.int64)
    counts = np.zeros((1 + slots, floors.size, upper.size), dtype=np.int64)
    for k, floor in enumerate(floors):
        index = upper_bin(residual / np.hypot(scored_std, floor), upper)
        by_slot = np.bincount(slot * upper.size + index, minlength=(1 + slots) * upper.size).reshape(1 + slots, -1)
        counts[0, k] = by_slot.sum(axis=0)  # every voxel: slot 0 held those without a tracked label
        counts[1:, k] = by_slot[1:]
    positive = SigmaScaling.positive_edges()
    rows = _scale.sigma_rows(std[share])
    z = _scale.coordinate(mean[share], std[share], target[share], rows)
    return counts, _scale.histogram2d(rows, _scale.positive_bin(z, positive), positive.size)


def nearest_floor(scale_counts: np.ndarray, floors: np.ndarray) -> tuple[float, int]:
    """The floor ``c / s`` fitted on the share's histogram, and the index of the nearest candidate in log.

    With no voxel to fit it on, the geometric middle of the candidates: any
    floor keeps the guarantees, only widths depend on it.
    """
    if int(np.sum(scale_counts)) > 0:
        fit = _scale.fit_scale(scale_counts, SigmaScaling.positive_edges())
        fitted = fit.c / max(fit.s, 1e-300)
    else:
        fitted = float(np.sqrt(floors[0] * floors[-1]))
    return fitted, int(np.argmin(np.abs(np.log(floors) - np.log(fitted))))


class ConformalCalibrator(StreamingCalibrator):
    """Split conformal intervals ``mean ± q_hat * sigma_eff`` with ``sigma_eff = sqrt(std^2 + floor_^2)``.

    (Vovk et al. 2005; Lei et al. 2018.) The nonconformity score of a
    calibration voxel is its residual normalized by an effective scale,
    ``r = |y - mean| / sqrt(std^2 + c^2)``. Why not ``|y - mean| / std``: a voxel
    whose std is round-off (every MC sample agreed) has a score of 1e6 or
    infinity, so a few percent of them make ``q_hat`` at 95 % infinite for
    every voxel, and a voxel with std 0 would get a zero-width interval.

    The split: a quarter of the voxels (chosen by a hash of their values,
    :func:`in_scale_share`) fit the floor: ``c / s`` of the variance function
    ``(s std)^2 + c^2`` by robust Gaussian likelihood
    (:func:`uqsynth.calibration._scale.fit_scale`), rounded in log to the
    nearest of :data:`FLOOR_CANDIDATES` (1e-6 to 1e4, eight per decade, so
    within a factor 1.16; a fit outside takes the nearest end: the
    guarantee holds for any floor, only widths suffer). That is ``floor_``. The scores and
    ``q_hat`` come from the other three quarters (``n_quantile_`` of them). For
    a level ``a`` the interval is ``mean ± q_hat(a) * sigma_eff`` with
    ``q_hat(a)`` the ``k``-th smallest score, ``k = ceil((n + 1) a)``,
    ``n = n_quantile_``; when ``k > n`` (too few voxels for the level) no
    finite interval has the guarantee and the bounds are ``-inf`` and ``+inf``.

    Guarantee: if the calibration voxels and a test voxel are exchangeable
    (e.g. drawn i.i.d.), then ``P(y in interval) >= a`` over the draw of all
    of them, whatever the model, the noise and the share of zero stds; and if
    the scores have no ties, also ``< a + 1 / (n + 1)`` (before binning). It
    holds because the score function (through ``c``) depends only on voxels
    disjoint from those whose scores give ``q_hat``, so given the first share
    the scores of the second and of the test voxel are exchangeable (split
    conformal). Neighbouring voxels of one image are *not* exchangeable
    (errors are spatially correlated and a subject's voxels share its
    anatomy), so on images the guarantee holds only approximately, for a
    voxel drawn at random from a subject drawn like the calibration subjects.

    Streaming: the floor is only known at the end, so the scores' share is
    summarized for every candidate floor: a histogram of its scores with
    ``bins`` log-spaced bins over ``[low, high]``, one bin for scores
    ``<= low`` and one for scores ``> high`` (``counts_``, one row per
    candidate); the floor's share by a histogram of voxels by std and
    standardized residual (``scale_counts_``). Both are integers whatever the
    number of voxels, so they add up over batches and processes
    (:meth:`partial_fit`, :meth:`merge`). Each score is replaced by its bin's
    *upper* edge (``+inf`` above ``high``); that can only enlarge ``q_hat``, so
    the coverage guarantee survives the binning, at a width cost below the
    relative bin width ``(high / low) ** (1 / bins) - 1`` (1.4 % at the
    defaults; raise ``bins`` for less, at 650 bytes per bin).

    Predictive distribution: the symmetric conformal distribution
    ``cdf(y) = 1/2 + sign(y - mean) / 2 * F_hat(|y - mean| / sigma_eff)`` with
    ``F_hat(r) = #{scores <= r} / (n + 1)`` (so it stays below 1), and
    ``quantile(q) = mean + sign(q - 1/2) * sigma_eff * q_hat(|2 q - 1|)`` with
    the same rank rule, so the central interval at level ``a`` is exactly
    ``(quantile((1 - a) / 2), quantile((1 + a) / 2))``. It is a step function:
    ``cdf(quantile(q))`` brackets ``q`` rather than equals it.

    Args:
        bins: Number of log-spaced bins between ``low`` and ``high``.
        low: Smallest resolved score; smaller ones count as ``low``.
        high: Largest resolved score; larger ones count as ``+inf``.

    Attributes:
        counts_: Score histograms of the scores' share, one per candidate floor,
            shape ``(len(FLOOR_CANDIDATES), bins + 2)``; additive over voxels.
        scale_counts_: The floor's share by std row and ``|z|`` bin; additive.
        n_: Number of calibration voxels (both shares).
        fitted_floor_: ``c / s`` as fitted (before rounding to a candidate).
        floor_: The floor used: the candidate nearest ``fitted_floor_``.
        floor_index_: Its index in :data:`FLOOR_CANDIDATES`.
        n_quantile_: Voxels in the scores' share.
    """

    _summary_names = ("counts_", "scale_counts_", "n_")
    param_rules = (Rule(lambda low, high: low < high, "low must be below high"),)

    def __init__(
        self,
        *,
        bins: Annotated[int, Interval(1, None)] = 1000,
        low: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-3,
        high: Annotated[float, Interval(0.0, None, closed="neither")] = 1e3,
    ) -> None:
        self.bins = bins
        self.low = low
        self.high = high

    def upper_edges(self) -> np.ndarray:
        """Upper edge of every histogram bin, ``low`` first and ``+inf`` last."""
        self._validate_params()
        edges = np.geomspace(float(self.low), float(self.high), int(self.bins) + 1)
        return np.concatenate([edges, [np.inf]])

    # --- streaming ---------------------------------------------------------------------------

    def _summarize(self, mean, std, target):
        counts, scale_counts = floor_share_histograms(mean.ravel(), std.ravel(), target.ravel(), FLOOR_CANDIDATES,
                                                      self.upper_edges())
        return {"counts_": counts[0], "scale_counts_": scale_counts}

    def _finalize(self) -> None:
        fitted, index = nearest_floor(self.scale_counts_, FLOOR_CANDIDATES)
        self.fitted_floor_ = np.asarray(fitted)
        self.floor_ = np.asarray(FLOOR_CANDIDATES[index])
        self.floor_index_ = np.asarray(index, dtype=np.int64)
        self.n_quantile_ = np.asarray(int(np.sum(self.counts_[index])), dtype=np.int64)

    # --- scores ------------------------------------------------------------------------------

    def effective_std(self, std: np.ndarray) -> np.ndarray:
        """``sigma_eff = sqrt(std^2 + floor_^2)``, > 0 for every std >= 0."""
        check_is_fitted(self)
        return np.hypot(np.asarray(std, dtype=np.float64), float(self.floor_))

    def fit_report(self) -> dict[str, float]:
        """``floor`` (used), ``fitted_floor``, ``quantile_voxels`` and ``scale_voxels`` (the two shares)."""
        check_is_fitted(self)
        return {"floor": float(self.floor_), "fitted_floor": float(self.fitted_floor_),
                "quantile_voxels": float(self.n_quantile_),
                "scale_voxels": float(int(self.n_) - int(self.n_quantile_))}

    def _scores(self) -> np.ndarray:
        return np.asarray(self.counts_)[int(self.floor_index_)]

    def score_quantile(self, level: float | np.ndarray) -> np.ndarray:
        """``q_hat(level)``: the ``ceil((n + 1) level)``-th smallest score (upper bin edge).

        ``0`` for ``level == 0`` and ``+inf`` when that rank exceeds ``n``.
        """
        check_is_fitted(self)
        level = np.round(np.asarray(level, dtype=np.float64), _LEVEL_DECIMALS)
        n = int(self.n_quantile_)
        rank = np.ceil((n + 1) * level).astype(np.int64)
        cumulative = np.cumsum(self._scores())
        upper = self.upper_edges()
        index = np.minimum(np.searchsorted(cumulative, rank, side="left"), upper.size - 1)
        result = upper[index]
        result = np.where(rank <= 0, 0.0, result)
        return np.where(rank > n, np.inf, result)

    def score_cdf(self, scores: np.ndarray) -> np.ndarray:
        """``F_hat(r) = #{calibration scores <= r} / (n + 1)``, scores at their upper bin edges."""
        check_is_fitted(self)
        cumulative = np.concatenate([[0], np.cumsum(self._scores())])
        below = cumulative[np.searchsorted(self.upper_edges(), scores, side="right")]
        return below / (float(self.n_quantile_) + 1.0)

    def cdf(self, mean, std, values):
        """Symmetric conformal CDF at ``values``, in (0, 1)."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        residual = values - mean
        return 0.5 + 0.5 * np.sign(residual) * self.score_cdf(np.abs(residual) / self.effective_std(std))

    def quantile(self, mean, std, q):
        """``mean + sign(q - 1/2) * sigma_eff * q_hat(|2 q - 1|)``; infinite when the rank exceeds ``n``."""
        check_is_fitted(self)
        q = check_probabilities(q)
        # On q's own (usually scalar) shape, before broadcasting to voxels.
        # At q = 1/2 the sign is 0 and the score 0; never 0 * inf.
        offset = np.sign(q - 0.5) * self.score_quantile(np.abs(2.0 * q - 1.0))
        mean, std, _ = check_inputs(mean, std, q, other_name="q")
        return mean + self.effective_std(std) * offset

    def moments(self, mean, std):
        """``(mean, sigma_eff * rms(q_hat))``: the distribution is symmetric about the mean.

        The rms of the scores is taken at the midpoint levels (99, as
        :func:`uqsynth.predictive.moments_from_quantiles`); infinite when the
        scores' share is too small for the outermost level.
        """
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        from uqsynth.predictive import MIDPOINT_LEVELS

        rms = float(np.sqrt(np.mean(self.score_quantile(MIDPOINT_LEVELS) ** 2)))
        return mean, self.effective_std(std) * rms

    def guarantee(self, level: float) -> dict[str, object]:
        """Voxel-level marginal coverage (the class docstring), not a promise about one subject."""
        return promise("voxel", f"a voxel drawn at random from a subject drawn like the calibration subjects lies "
                       f"in its interval with probability >= {level:g}, if calibration and test voxels are "
                       "exchangeable (voxels of one image are not, so this holds only approximately, and says "
                       "nothing about one subject)", level)

    def interval(self, mean, std, level):
        """``mean ± q_hat(level) * sigma_eff``, holding the truth with probability >= ``level``.

        The guarantee and its assumptions are in the class docstring; the
        bounds are infinite when there are fewer than about
        ``level / (1 - level)`` voxels in the scores' share.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        half_width = self.effective_std(std) * self.score_quantile(level)
        return mean - half_width, mean + half_width
