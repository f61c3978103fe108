"""Isotonic recalibration of the PIT (Kuleshov, Fenner and Ermon 2018), fitted by streaming, on an effective scale.

The paper's recalibration: with ``F_t`` the predictive CDF of voxel ``t``,
the probability integral transform (PIT) values ``p_t = F_t(y_t)`` of a
calibrated model are uniform. Their empirical CDF ``P_hat(p)`` (the fraction
of ``p_t <= p``) says how far they are from it, and the monotone map
``R: p -> P_hat(p)`` repairs it: the calibrated CDF is ``R(F_t(y))`` and the
calibrated ``q``-quantile is ``F_t^{-1}(R^{-1}(q))``.

For a Gaussian ``F_t(y) = Phi((y - mean_t) / sigma_t)`` the PIT is a monotone
function of the standardized residual ``z_t = (y_t - mean_t) / sigma_t``, so
``R(p) = G(Phi^{-1}(p))`` with ``G`` the (isotonic) empirical CDF of the
``z_t``; the calibrated CDF is ``G(z)`` and the calibrated quantile
``mean + sigma * G^{-1}(q)``. This module fits and stores ``G``.

Which ``sigma_t``: not the raw std. A voxel whose std is round-off has
``z = r / std`` of 1e6 or infinity, which says nothing about the shape of
the errors, and ``mean + std * G^{-1}(q)`` would give it a zero-width
interval. ``sigma_t`` is the effective scale ``sqrt(std^2 + floor_^2)``
with ``floor_`` the fitted floor ``c / s`` of the variance function
``(s std)^2 + c^2`` (:mod:`uqsynth.calibration._scale`; ``s`` drops out
because ``G`` absorbs any common factor). So ``z`` stays bounded
(``|z| <= |r| / floor_``), a zero std gets a data-driven width, and voxels
whose std is resolved keep essentially their own ``z``.

Format change (uqsynth-calibrator-2): the summary is no longer a histogram
of ``r / std`` alone but also one by std (to place ``z`` for a floor known
only at the end); files of the earlier format are refused when loaded.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import numpy as np
from scipy.special import ndtri
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration import _scale
from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities
from uqsynth.config import Interval

#: Above this fraction of clamped residuals, fitting warns (and ``fit_report`` says how many).
CLAMP_WARNING = 1e-3

#: Target width of the coarse bins of ``z`` (asinh units, about 28 % of ``|z|`` in the tails).
_COARSE_STEP = 0.25

#: A std bin is "resolved" (its voxels keep ``z_eff = z`` to the fine resolution) when
#: ``std / sqrt(std^2 + floor^2) >= 1 - _RESOLVED * fine step`` over the whole bin.
_RESOLVED = 0.1


class IsotonicCalibrator(StreamingCalibrator):
    """Kuleshov et al. (2018) isotonic recalibration of ``z = r / sqrt(std^2 + floor_^2)``, fitted from histograms.

    Summary (integers, so batches, subjects and processes add up exactly:
    :meth:`partial_fit`, :meth:`merge`; :meth:`fit` is a fresh
    :meth:`partial_fit`):

    - ``counts_``: a fine histogram of ``z = r / std`` (voxels with a
      resolved std), ``bins`` bins uniform in ``asinh(z)`` over
      ``|z| <= z_max``, plus one bin below and one above. Why asinh:
      MC-dropout models are overconfident and pile their PIT values up next
      to 0 and 1; bins uniform in ``asinh(z)`` are 0.15 % of ``|z|`` wide in
      the tails (and 0.0015 wide near 0, at the defaults), so no bin holds
      much more than 0.1 % of the voxels whether the model is calibrated,
      overconfident or underconfident.
    - ``counts2d_``: the voxels by std bin (log-spaced, a row for std 0) and
      a coarse bin of ``z`` (every few fine bins, continued beyond ``z_max``
      up to 1e18), from which the floor is fitted and each voxel's
      ``z_eff = z * std / sqrt(std^2 + floor^2)`` is placed once the floor is known.

    The map. The floor ``floor_ = c / s`` is fitted by the robust Gaussian
    likelihood of :func:`uqsynth.calibration._scale.fit_scale` on
    ``counts2d_``. ``G`` is then the CDF of ``z_eff`` over all voxels, on the
    fine grid: voxels of std bins where the floor changes ``z`` by less than
    a tenth of a fine bin contribute their fine histogram exactly (within
    each coarse bin they are spread like the fine histogram); the others
    (std comparable to or below the floor, std 0 included) are spread, per
    coarse bin, like the fine histogram there (or evenly beyond ``z_max``),
    scaled by their std bin's ``std / sqrt(std^2 + floor^2)``. ``G`` is
    piecewise linear between the fine edges (each bin's mass spread evenly,
    as the exact fit spreads it between two PIT values); its knots
    ``map_x_``, ``map_y_`` run from the last edge below every ``z_eff`` to
    the first above all of them, so its range is the data's.

    Clamping. ``z_eff`` beyond ``±z_max`` is counted at ``±z_max``, which
    bounds the calibrated quantiles to ``mean ± z_max * sigma_eff`` (always
    finite). With the floor, ``|z_eff| <= |r| / floor_``, so at the default
    ``z_max = 1e6`` nothing is clamped unless residuals are a million floors
    wide; the fraction clamped is ``clamped_fraction_`` (in
    :meth:`fit_report`), and fitting warns when it exceeds 0.1 %.

    Resolution: where every voxel's std is resolved, the streamed map and
    the exact fit (isotonic regression on every sorted PIT value) agree at
    the bin edges up to ``1 / n``, and in between differ by at most the
    share of voxels in one bin: ``max |R - R_exact| <= max(counts_) / n_ + 1 / n_``.
    Voxels whose std is at or below the floor are placed to the width of a
    std bin (a factor 1.47) and a coarse ``z`` bin; they are spread evenly
    over that range, so the map's error from them is second order in it.

    Args:
        bins: Number of fine bins, uniform in ``asinh(z)`` over ``[-z_max, z_max]``
            (rounded up to an even number, so 0 is an edge).
        z_max: Largest resolved ``|z_eff|``, in units of the effective std.

    Attributes:
        counts_: Fine histogram of ``z``, shape ``(bins + 2,)``; additive.
        counts2d_: Voxels by std row and coarse signed ``z`` bin; additive.
        n_: Number of voxels seen.
        floor_: The fitted floor (units of the target), > 0.
        clamped_fraction_: Fraction of voxels whose ``|z_eff|`` exceeded ``z_max``.
        map_x_: Knots of ``G`` in ``z_eff`` (the PIT knots are ``Phi(map_x_)``), increasing.
        map_y_: ``G`` at the knots, increasing from 0 to 1.
    """

    _summary_names = ("counts_", "counts2d_", "n_")

    def __init__(
        self,
        *,
        bins: Annotated[int, Interval(1, None)] = 20000,
        z_max: Annotated[float, Interval(0.0, None, closed="neither")] = 1e6,
    ) -> None:
        self.bins = bins
        self.z_max = z_max

    # --- grids -------------------------------------------------------------------------------

    def _half(self) -> int:
        self._validate_params()
        return max(1, (int(self.bins) + 1) // 2)

    def edges(self) -> np.ndarray:
        """The fine bin edges in ``z``: uniform in ``asinh(z)`` on ``[-z_max, z_max]``, 0 included."""
        half = self._half()
        positive = np.sinh(np.linspace(0.0, float(np.arcsinh(float(self.z_max))), half + 1))
        positive[0], positive[-1] = 0.0, float(self.z_max)
        return np.concatenate([-positive[:0:-1], positive])

    def coarse_edges(self) -> np.ndarray:
        """Positive edges of the coarse grid: every few fine edges up to ``z_max``, then on to ``Z_FAR``."""
        half = self._half()
        fine = self.edges()[half:]
        u_max = float(np.arcsinh(float(self.z_max)))
        step = u_max / half
        every = max(1, int(round(_COARSE_STEP / step)))
        inside = fine[np.unique(np.concatenate([np.arange(0, half + 1, every), [half]]))]
        u_far = float(np.arcsinh(_scale.Z_FAR))
        if u_far <= u_max:
            return inside
        outside = np.sinh(np.arange(u_max + every * step, u_far, every * step))
        outside = outside[outside > float(self.z_max)]
        return np.concatenate([inside, outside, [_scale.Z_FAR]])

    # --- streaming ---------------------------------------------------------------------------

    def _summarize(self, mean, std, target):
        rows = _scale.sigma_rows(std.ravel())
        z = _scale.coordinate(mean.ravel(), std.ravel(), target.ravel(), rows)
        fine = self.edges()
        resolved = rows > 0
        counts = np.bincount(_scale.signed_bin(z[resolved], fine), minlength=fine.size + 1).astype(np.int64)
        signed = _scale.signed_edges(self.coarse_edges())
        counts2d = _scale.histogram2d(rows, _scale.signed_bin(z, signed), signed.size + 1)
        return {"counts_": counts, "counts2d_": counts2d}

    def _finalize(self) -> None:
        positive = self.coarse_edges()
        signed = _scale.signed_edges(positive)
        counts2d = np.asarray(self.counts2d_, dtype=np.float64)
        fit = _scale.fit_scale(_scale.fold_signed(self.counts2d_, signed, positive), positive)
        floor = fit.c / max(fit.s, 1e-300)
        self.floor_ = np.asarray(floor)

        fine = self.edges()
        half = self._half()
        fine_step = float(np.arcsinh(float(self.z_max))) / half
        # The extended grid: fine edges inside [-z_max, z_max], coarse ones beyond.
        extended = np.concatenate([signed[signed < fine[0]], fine, signed[signed > fine[-1]]])
        # Each extended bin (same convention as signed_bin) lies in one coarse bin.
        upper = np.concatenate([extended, [np.inf]])
        coarse_of = _scale.signed_bin(upper, signed)
        inside = (upper > fine[0]) & (upper <= fine[-1])
        fine_counts = np.zeros(upper.size)
        first = int(np.searchsorted(extended, fine[0]))  # extended index of -z_max
        fine_counts[first + 1 : first + fine.size] = np.asarray(self.counts_, dtype=np.float64)[1:-1]
        resolved_total = counts2d[1:].sum(axis=0)  # what the fine histogram holds, per coarse bin
        lower = np.concatenate([[-np.inf], extended])
        width = np.where(inside, upper - lower, 1.0)
        width_total = np.bincount(coarse_of, weights=np.where(inside, width, 0.0), minlength=signed.size + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            shape_fine = np.where(inside, fine_counts / resolved_total[coarse_of], 1.0)
            shape_even = np.where(inside, width / width_total[coarse_of], 1.0)
        empty = inside & ~(resolved_total[coarse_of] > 0)
        shape_fine[empty] = shape_even[empty]

        rho_low, rho_high = _scale.floor_factor(floor)
        occupied = np.nonzero(counts2d.sum(axis=1))[0]
        bulk = (occupied > 0) & (rho_low[occupied] >= 1.0 - _RESOLVED * fine_step)
        total = np.zeros(fine.size)
        bulk_rows = occupied[bulk]
        if bulk_rows.size:
            mass = counts2d[bulk_rows].sum(axis=0)[coarse_of] * shape_fine
            total += np.interp(fine, extended, np.cumsum(mass)[:-1])
        for row in occupied[~bulk]:
            shape = shape_even if row == 0 else shape_fine
            cumulative = np.cumsum(counts2d[row][coarse_of] * shape)[:-1]
            low, high = rho_low[row], rho_high[row]
            for factor, weight in ((low, 0.25), (np.sqrt(low * high), 0.5), (high, 0.25)):
                total += weight * np.interp(fine / factor, extended, cumulative)

        n = float(self.n_)
        self.clamped_fraction_ = np.asarray(max(total[0] + (n - total[-1]), 0.0) / n)
        cdf = np.clip(total / n, 0.0, 1.0)
        cdf[0], cdf[-1] = 0.0, 1.0  # clamped voxels join the outermost fine bins
        cdf = np.maximum.accumulate(cdf)
        keep = np.concatenate([[True], cdf[1:] != cdf[:-1]])  # the first knot of each flat run...
        bottom = int(np.searchsorted(cdf, 0.0, side="right")) - 1
        keep[:bottom] = False  # ...but the last of the run at 0, so the map starts where the data does
        keep[bottom] = True
        self.map_x_ = fine[keep]
        self.map_y_ = cdf[keep]
        if float(self.clamped_fraction_) > CLAMP_WARNING:
            warnings.warn(
                f"IsotonicCalibrator: {float(self.clamped_fraction_):.2%} of standardized residuals were beyond "
                f"z_max = {float(self.z_max):g} and clamped to it (raise z_max)",
                stacklevel=2,
            )

    # --- the map -----------------------------------------------------------------------------

    def effective_std(self, std: np.ndarray) -> np.ndarray:
        """``sqrt(std^2 + floor_^2)``, > 0 for every std >= 0."""
        check_is_fitted(self)
        return np.hypot(np.asarray(std, dtype=np.float64), float(self.floor_))

    def fit_report(self) -> dict[str, float]:
        """``floor`` (the fitted floor) and ``clamped_fraction`` (voxels beyond ``±z_max``)."""
        check_is_fitted(self)
        return {"floor": float(self.floor_), "clamped_fraction": float(self.clamped_fraction_)}

    def residual_cdf(self, z: np.ndarray) -> np.ndarray:
        """The fitted CDF ``G`` of standardized residuals at ``z``."""
        check_is_fitted(self)
        return np.interp(z, self.map_x_, self.map_y_)

    def residual_quantile(self, q: np.ndarray) -> np.ndarray:
        """The generalized inverse ``G^{-1}(q) = min{z : G(z) >= q}`` for ``q`` in (0, 1).

        Why not ``np.interp`` with the axes swapped: ``G`` may have flat
        parts, where that would be ill-defined. Taking the smallest ``z``
        that reaches ``q`` is the quantile convention and keeps
        ``G(G^{-1}(q)) = q`` exactly.
        """
        check_is_fitted(self)
        x, y = self.map_x_, self.map_y_
        q = np.asarray(q, dtype=np.float64)
        # y[0] = 0 < q < 1 = y[-1] and y increases strictly, so the first knot
        # with y >= q has index k in [1, len - 1] and y[k - 1] < q <= y[k].
        k = np.clip(np.searchsorted(y, q, side="left"), 1, y.size - 1)
        y0, y1, x0, x1 = y[k - 1], y[k], x[k - 1], x[k]
        return x0 + (q - y0) / (y1 - y0) * (x1 - x0)

    def recalibrate(self, p: np.ndarray) -> np.ndarray:
        """The paper's map ``R(p) = P_hat(p)`` at PIT values ``p`` in [0, 1] (for plots)."""
        return self.residual_cdf(ndtri(np.asarray(p, dtype=np.float64)))

    def cdf(self, mean, std, values):
        """Calibrated CDF ``G((values - mean) / sigma_eff)``, in [0, 1]."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        return self.residual_cdf((values - mean) / self.effective_std(std))

    def quantile(self, mean, std, q):
        """Calibrated quantile ``mean + sigma_eff * G^{-1}(q)``, within ``mean ± z_max * sigma_eff``."""
        check_is_fitted(self)
        q = check_probabilities(q)
        z = self.residual_quantile(q)  # on q's own (usually scalar) shape, before broadcasting to voxels
        mean, std, _ = check_inputs(mean, std, q, other_name="q")
        return mean + self.effective_std(std) * z

    def moments(self, mean, std):
        """Mean and std of the calibrated distribution, exact for the piecewise-linear ``G``."""
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        x0, x1, dy = self.map_x_[:-1], self.map_x_[1:], np.diff(self.map_y_)
        first = float(np.sum(dy * (x0 + x1) / 2.0))
        second = float(np.sum(dy * (x0 * x0 + x0 * x1 + x1 * x1) / 3.0))
        scale = self.effective_std(std)
        return mean + scale * first, scale * np.sqrt(max(second - first * first, 0.0))
