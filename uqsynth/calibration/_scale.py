"""What every built-in calibrator shares: a streamable residual histogram and the effective scale fitted on it.

The effective scale. MC-dropout std is often too small by a factor, and
some voxels have none at all: every MC sample agreed, so the std is
round-off (below 1e-6 on the [0, 1] scale, or exactly 0). Dividing a
residual by such a std gives a standardized residual of 1e4 or infinity,
which wrecks any fit made on standardized residuals, and a zero std gives
a zero-width interval. The built-in calibrators therefore work with

    sigma_eff^2 = (s * std)^2 + c^2,

the variance function of a model whose error has a part proportional to
the predicted std and a floor ``c`` that does not depend on it (the error a
voxel makes however sure the network is: noise, interpolation, round-off).
``s`` and ``c`` are fitted together by Gaussian maximum likelihood
(:func:`fit_scale`), so a zero std gets the width ``c`` that the residuals of
voxels with (near) zero std call for, and voxels whose std is resolved are
barely touched (``c`` is small next to their ``s * std``). ``c`` is kept
above ``1e-3`` times the median absolute residual, so it stays positive even
when the calibration set has no voxel that needs it.

Robustness. A few voxels with huge residuals (a misregistered rim, a
lesion the model never saw) would dominate a Gaussian likelihood and
inflate ``s``: 1 % of voxels at ``z ~ 1e4`` make ``mean(z^2) ~ 1e6``. The
likelihood is therefore that of a contaminated Gaussian (Huber's
epsilon-contamination): with probability ``1 - eps`` the residual is
``N(0, sigma_eff^2)``, with probability ``eps`` a gross error spread
log-uniformly over the whole range of residuals the histogram resolves.
``eps`` is fitted with ``s`` and ``c``; gross errors then cost the Gaussian
nothing. Heavy (but not gross) tails are left to the Gaussian: the
background's density is low enough that only residuals beyond about 4 to 5
``sigma_eff`` are taken for gross errors (so on Student-t errors the 90 %
interval still holds about 90 %; the 50 % one more).

The summary. Fitting must stream (a batch at a time, summaries that add up
over processes), but ``c`` is only known at the end, and the standardized
residual ``z_eff = r / sigma_eff`` depends on it. The summary is therefore a
two-dimensional histogram of voxels by their std (:data:`SIGMA_PER_DECADE`
log bins per decade from :data:`SIGMA_MIN` to :data:`SIGMA_MAX`, one row for
std below :data:`SIGMA_MIN`, zero included, and one above :data:`SIGMA_MAX`)
and by their residual in units of their std (``z = r / std``; for the row of
(near) zero std, ``r / SIGMA_MIN``), on a coarse grid of ``|z|`` (or of ``z``)
reaching :data:`Z_FAR`. :func:`fit_scale` fits ``(s, c, eps)`` on it, and
from it, for any ``c``, one can place each voxel's
``z_eff = z * std / sigma_eff``, to the width of a std bin (a factor 1.47)
where the floor matters. Sigma scaling needs nothing else; isotonic adds a
fine histogram of ``z`` for the voxels the floor leaves alone; conformal,
whose guarantee needs exact scores, keeps a score histogram per candidate
floor instead and fits ``c`` on a share of voxels held apart (see each).
Counts are integers, so a fit on all voxels, ``partial_fit`` over batches
and ``merge`` of parts give identical summaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_ndtr

#: Stds below this (zero included) form the "unresolved" row of the histogram: treated as 0.
SIGMA_MIN = 1e-12

#: Stds above this form the last row (never affected by the floor ``c``).
SIGMA_MAX = 1e8

#: Log-spaced std bins per decade between :data:`SIGMA_MIN` and :data:`SIGMA_MAX`.
SIGMA_PER_DECADE = 6

#: Largest ``|z|`` resolved by the coarse grids; beyond it, one overflow bin.
Z_FAR = 1e18

#: Smallest ``|z|`` resolved by the sigma-scaling grid (smaller residuals are one bin).
Z_LOW = 1e-4

#: Coarse ``|z|`` bins per decade for the likelihood fit of sigma scaling.
Z_PER_DECADE = 10

#: ``c`` is kept at or above this fraction of the median absolute residual.
FLOOR_FRACTION = 1e-3


def sigma_edges() -> np.ndarray:
    """Edges of the std bins: log-spaced from :data:`SIGMA_MIN` to :data:`SIGMA_MAX`."""
    decades = int(round(np.log10(SIGMA_MAX / SIGMA_MIN)))
    return np.geomspace(SIGMA_MIN, SIGMA_MAX, decades * SIGMA_PER_DECADE + 1)


def sigma_rows(std: np.ndarray) -> np.ndarray:
    """Row of each std: 0 below :data:`SIGMA_MIN`, then one per bin, the last at or above :data:`SIGMA_MAX`."""
    return np.searchsorted(sigma_edges(), std, side="right")


def row_count() -> int:
    """Number of rows of the histograms (std bins plus the two outer rows)."""
    return sigma_edges().size + 1


def row_sigma_range() -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` std of each row (row 0: ``[0, SIGMA_MIN)``, last row: ``[SIGMA_MAX, inf)``)."""
    edges = sigma_edges()
    return np.concatenate([[0.0], edges]), np.concatenate([edges, [np.inf]])


def row_sigma_representative() -> np.ndarray:
    """The std a row stands for in likelihoods: 0 for row 0, the geometric centre of a bin, one bin beyond the last."""
    edges = sigma_edges()
    ratio = edges[1] / edges[0]
    return np.concatenate([[0.0], np.sqrt(edges[:-1] * edges[1:]), [edges[-1] * np.sqrt(ratio)]])


def coordinate(mean: np.ndarray, std: np.ndarray, target: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The residual in the units of its row: ``(target - mean) / std``, or ``/ SIGMA_MIN`` in row 0."""
    unit = np.where(rows == 0, SIGMA_MIN, std)
    return (target - mean) / unit


def row_unit() -> np.ndarray:
    """What the coordinate of each row is multiplied by to give the residual (its std; :data:`SIGMA_MIN` in row 0)."""
    representative = row_sigma_representative()
    return np.concatenate([[SIGMA_MIN], representative[1:]])


def floor_factor(c: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the range of ``z_eff / coordinate`` for ``sigma_eff = sqrt(std^2 + c^2)``: ``(low, high)``.

    Rows with a std bin: ``std / sqrt(std^2 + c^2)`` over the bin. Row 0
    (coordinate ``r / SIGMA_MIN``, std in ``[0, SIGMA_MIN)``):
    ``SIGMA_MIN / sqrt(std^2 + c^2)`` over that range.
    """
    low, high = row_sigma_range()
    with np.errstate(invalid="ignore"):
        rho_low = low / np.sqrt(low**2 + c**2)
        rho_high = np.where(np.isinf(high), 1.0, high / np.sqrt(high**2 + c**2))
    rho_low[0] = SIGMA_MIN / np.sqrt(SIGMA_MIN**2 + c**2)
    rho_high[0] = SIGMA_MIN / c
    return rho_low, rho_high


def positive_bin(value: np.ndarray, positive_edges: np.ndarray) -> np.ndarray:
    """Bin of ``|value|`` on ``0 = P[0] < P[1] < ... < P[K]``: bin ``k`` is ``(P[k], P[k+1]]`` (bin 0 holds 0), ``K`` is ``> P[K]``."""
    return np.searchsorted(positive_edges[1:], np.abs(value), side="left")


def signed_edges(positive_edges: np.ndarray) -> np.ndarray:
    """The symmetric edges ``-P[K], ..., -P[1], 0, P[1], ..., P[K]``."""
    return np.concatenate([-positive_edges[:0:-1], positive_edges])


def signed_bin(value: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of ``value`` on increasing ``edges``: 0 is ``<= edges[0]``, ``k`` is ``(edges[k-1], edges[k]]``, the last ``> edges[-1]``."""
    return np.searchsorted(edges, value, side="left")


def histogram2d(rows: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Integer counts of (row, bin) pairs, shape ``(row_count(), n_bins)``."""
    flat = rows.astype(np.int64) * n_bins + bins.astype(np.int64)
    return np.bincount(flat.ravel(), minlength=row_count() * n_bins).astype(np.int64).reshape(row_count(), n_bins)


def fold_signed(counts: np.ndarray, edges: np.ndarray, positive_edges: np.ndarray) -> np.ndarray:
    """Fold a histogram on :func:`signed_edges` ``(positive_edges)`` into one on ``|z|`` (same positive edges)."""
    k = positive_edges.size - 1  # positive bins (P[j], P[j+1]], j < k, plus the overflow k
    folded = np.zeros((counts.shape[0], k + 1), dtype=counts.dtype)
    # Signed bins: 0 is <= -P[K] (overflow), 1..K are the negative bins from -P[K] to 0, then the positive ones.
    folded[:, k] += counts[:, 0] + counts[:, -1]
    negative = counts[:, 1 : k + 1][:, ::-1]  # (-P[j+1], -P[j]] for j = 0..K-1
    positive = counts[:, k + 1 : 2 * k + 1]
    folded[:, :k] += negative + positive
    return folded


@dataclass(frozen=True)
class ScaleFit:
    """The fitted variance function ``sigma_eff^2 = (s * std)^2 + c^2`` and the share of gross errors."""

    s: float
    c: float
    eps: float
    nll: float


def fit_scale(counts: np.ndarray, positive_edges: np.ndarray, *, min_scale: float = 1e-12) -> ScaleFit:
    """Maximum-likelihood ``(s, c, eps)`` of the contaminated Gaussian (module docstring) on a ``|z|`` histogram.

    The likelihood of binned data: each cell's probability under the model,
    with every voxel of a row at the row's representative std. Binned
    likelihood is unbiased however coarse the bins; coarse bins only cost
    precision (at 10 bins per decade, under 1 % of the information).

    Args:
        counts: ``(row_count(), K + 1)`` counts on ``|z|`` bins of ``positive_edges``.
        positive_edges: ``0 = P[0] < ... < P[K]``.
        min_scale: Lower bound on ``s``.

    Returns:
        The fit; ``c`` is at least :data:`FLOOR_FRACTION` times the median absolute residual.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k = positive_edges.size - 1
    upper = np.concatenate([positive_edges[1:], [np.inf]])
    lower = np.concatenate([positive_edges[:k], [positive_edges[k]]])
    rows, cols = np.nonzero(counts)
    n = counts[rows, cols]
    total = float(n.sum())
    if total <= 0:
        return ScaleFit(1.0, SIGMA_MIN, 0.0, 0.0)
    unit = row_unit()[rows]
    sigma = row_sigma_representative()[rows]
    r_low, r_high = unit * lower[cols], unit * upper[cols]

    # The gross-error background: uniform in log |r| over the resolved range
    # (the overflow bin counts as one decade, the bin of |z| near 0 as none).
    span = np.log(positive_edges[k] / positive_edges[1]) + np.log(10.0)
    log_width = np.full(n.shape, np.log(np.log(10.0)))
    inner = (cols > 0) & (cols < k)
    log_width[inner] = np.log(np.log(upper[cols[inner]] / lower[cols[inner]]))
    log_width[cols == 0] = -np.inf
    log_out = log_width - np.log(span)

    # Representative absolute residuals, for the floor and the starting point.
    r_mid = np.sqrt(r_low * np.where(cols == k, 100.0 * r_low, r_high))
    r_mid[cols == 0] = 0.5 * r_high[cols == 0]
    order = np.argsort(r_mid)
    median_r = float(r_mid[order][np.searchsorted(np.cumsum(n[order]), 0.5 * total)])
    c_floor = max(FLOOR_FRACTION * median_r, 1e-300)
    finite_high = r_high[np.isfinite(r_high)]
    c_cap = max(10.0 * float(finite_high.max()) if finite_high.size else 1.0, 10.0 * c_floor)

    def nll(theta: np.ndarray) -> float:
        s, c, eps = np.exp(theta[0]), np.exp(theta[1]), theta[2]
        tau = np.sqrt((s * sigma) ** 2 + c**2)
        a, b = r_low / tau, r_high / tau
        upper_tail, lower_tail = log_ndtr(-a), log_ndtr(-b)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_in = np.log(2.0) + upper_tail + np.log(-np.expm1(lower_tail - upper_tail))
        log_in = np.where(np.isnan(log_in), -np.inf, log_in)
        with np.errstate(divide="ignore"):
            mixed = np.logaddexp(np.log1p(-eps) + log_in, np.log(eps) + log_out) if eps > 0 else log_in
        value = -float(np.sum(n * mixed)) / total
        return value if np.isfinite(value) else 1e300

    # Starting points: a robust scale from the median |z| of the rows with a std, and three floors.
    resolved = rows > 0
    if resolved.any():
        z_mid = r_mid[resolved] / unit[resolved]
        weights = n[resolved]
        z_order = np.argsort(z_mid)
        median_z = float(z_mid[z_order][np.searchsorted(np.cumsum(weights[z_order]), 0.5 * weights.sum())])
        s0 = max(median_z / 0.6745, min_scale)
        sigma_order = np.argsort(sigma[resolved])
        median_sigma = float(sigma[resolved][sigma_order][np.searchsorted(np.cumsum(weights[sigma_order]),
                                                                          0.5 * weights.sum())])
    else:
        s0, median_sigma = 1.0, 0.0
    unresolved = ~resolved
    floors = [10.0 * c_floor, s0 * median_sigma]
    if unresolved.any():
        floors.append(float(np.median(r_mid[unresolved])) / 0.6745)
    log_s_bounds = (np.log(max(min_scale, 1e-300)), np.log(max(1e12, min_scale)))
    log_c_bounds = (np.log(c_floor), np.log(c_cap))
    best = None
    for c0 in floors:
        start = np.array([
            np.clip(np.log(s0), *log_s_bounds),
            np.clip(np.log(max(c0, c_floor)), *log_c_bounds),
            0.01,
        ])
        result = minimize(nll, start, method="L-BFGS-B", bounds=[log_s_bounds, log_c_bounds, (0.0, 0.5)])
        candidate = (float(result.fun), result.x)
        if best is None or candidate[0] < best[0]:
            best = candidate
    value, theta = best
    return ScaleFit(float(np.exp(theta[0])), float(np.exp(theta[1])), float(theta[2]), value)
