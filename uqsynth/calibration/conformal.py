"""Split conformal prediction on std-normalized residuals, with a streaming score summary."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities
from uqsynth.config import Interval, Rule

#: Levels are rounded to this many decimals before the rank rule, so that
#: ``interval(mean, std, 0.9)`` and ``quantile(mean, std, 0.95)`` use the same
#: rank despite ``2 * 0.95 - 1`` not being exactly ``0.9`` in floating point.
_LEVEL_DECIMALS = 12


class ConformalCalibrator(StreamingCalibrator):
    """Split conformal intervals ``mean ± q_hat * std`` (Vovk et al. 2005; Lei et al. 2018).

    The nonconformity score of a calibration voxel is its normalized residual
    ``r = |y - mean| / std``. For a level ``a`` the interval is
    ``mean ± q_hat(a) * std`` with ``q_hat(a)`` the ``k``-th smallest score,
    ``k = ceil((n + 1) a)``; when ``k > n`` (too few calibration voxels for the
    level) no finite interval has the guarantee and the bounds are ``-inf``
    and ``+inf``.

    Guarantee: if the calibration voxels and a test voxel are exchangeable
    (e.g. drawn i.i.d.), then ``P(y in interval) >= a``, over the draw of both,
    whatever the model and the noise; and if the scores have no ties, also
    ``< a + 1 / (n + 1)``. Neighbouring voxels of one image are *not*
    exchangeable (errors are spatially correlated and a subject's voxels share
    its anatomy), so on images the guarantee holds only approximately, for a
    voxel drawn at random from a subject drawn like the calibration subjects.

    Streaming: the scores are summarized in a histogram with ``bins``
    log-spaced bins over ``[low, high]``, one bin for scores ``<= low`` and one
    for scores ``> high`` (``bins + 2`` integers whatever the number of voxels),
    which adds up over batches and processes (:meth:`partial_fit`,
    :meth:`merge`). Each score is replaced by its bin's *upper* edge
    (``+inf`` above ``high``); that can only enlarge ``q_hat``, so the coverage
    guarantee survives the binning, at a width cost below the relative bin
    width ``(high / low) ** (1 / bins) - 1`` (0.2 % at the defaults).

    Predictive distribution: the symmetric conformal distribution
    ``cdf(y) = 1/2 + sign(y - mean) / 2 * F_hat(|y - mean| / std)`` with
    ``F_hat(r) = #{scores <= r} / (n + 1)`` (so it stays below 1), and
    ``quantile(q) = mean + sign(q - 1/2) * std * q_hat(|2 q - 1|)`` with the
    same rank rule, so the central interval at level ``a`` is exactly
    ``(quantile((1 - a) / 2), quantile((1 + a) / 2))``. It is a step function:
    ``cdf(quantile(q))`` brackets ``q`` rather than equals it.

    Args:
        bins: Number of log-spaced bins between ``low`` and ``high``.
        low: Smallest resolved score; smaller ones count as ``low``.
        high: Largest resolved score; larger ones count as ``+inf``.

    Attributes:
        counts_: Score histogram, shape ``(bins + 2,)``; additive over voxels.
        n_: Number of calibration voxels.
    """

    _summary_names = ("counts_", "n_")
    param_rules = (Rule(lambda low, high: low < high, "low must be below high"),)

    def __init__(
        self,
        *,
        bins: Annotated[int, Interval(1, None)] = 10000,
        low: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-6,
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

    def _summarize(self, mean, std, target):
        upper = self.upper_edges()
        scores = (np.abs(target - mean) / std).ravel()
        # side="left": a score lands in the first bin whose upper edge is >= it,
        # so replacing it by that edge never makes it smaller.
        index = np.searchsorted(upper[:-1], scores, side="left")
        return {"counts_": np.bincount(index, minlength=upper.size).astype(np.int64)}

    def _finalize(self) -> None:
        pass  # the histogram is the whole fitted state

    def score_quantile(self, level: float | np.ndarray) -> np.ndarray:
        """``q_hat(level)``: the ``ceil((n + 1) level)``-th smallest score (upper bin edge).

        ``0`` for ``level == 0`` and ``+inf`` when that rank exceeds ``n``.
        """
        check_is_fitted(self)
        level = np.round(np.asarray(level, dtype=np.float64), _LEVEL_DECIMALS)
        n = int(self.n_)
        rank = np.ceil((n + 1) * level).astype(np.int64)
        cumulative = np.cumsum(self.counts_)
        upper = self.upper_edges()
        index = np.minimum(np.searchsorted(cumulative, rank, side="left"), upper.size - 1)
        result = upper[index]
        result = np.where(rank <= 0, 0.0, result)
        return np.where(rank > n, np.inf, result)

    def score_cdf(self, scores: np.ndarray) -> np.ndarray:
        """``F_hat(r) = #{calibration scores <= r} / (n + 1)``, scores at their upper bin edges."""
        check_is_fitted(self)
        cumulative = np.concatenate([[0], np.cumsum(self.counts_)])
        below = cumulative[np.searchsorted(self.upper_edges(), scores, side="right")]
        return below / (float(self.n_) + 1.0)

    def cdf(self, mean, std, values):
        """Symmetric conformal CDF at ``values``, in (0, 1)."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        residual = values - mean
        return 0.5 + 0.5 * np.sign(residual) * self.score_cdf(np.abs(residual) / std)

    def quantile(self, mean, std, q):
        """``mean + sign(q - 1/2) * std * q_hat(|2 q - 1|)``; infinite when the rank exceeds ``n``."""
        check_is_fitted(self)
        q = check_probabilities(q)
        # On q's own (usually scalar) shape, before broadcasting to voxels.
        # At q = 1/2 the sign is 0 and the score 0; never 0 * inf.
        offset = np.sign(q - 0.5) * self.score_quantile(np.abs(2.0 * q - 1.0))
        mean, std, _ = check_inputs(mean, std, q, other_name="q")
        return mean + std * offset

    def interval(self, mean, std, level):
        """``mean ± q_hat(level) * std``, holding the truth with probability >= ``level``.

        The guarantee and its assumptions are in the class docstring; the
        bounds are infinite when there are fewer than
        ``level / (1 - level)`` calibration voxels.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        half_width = std * self.score_quantile(level)
        return mean - half_width, mean + half_width
