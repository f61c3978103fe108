"""Comparisons across subjects: the paired t-test between arms and volume triage by uncertainty.

Both take per-subject numbers keyed by subject id, so pairing is by id,
never by list position (a reordered or missing subject is an error, not a
silently wrong p-value).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

from uqsynth.metrics.levels import correlation


def _paired(a: Mapping[str, float], b: Mapping[str, float], names: tuple[str, str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same subject ids; "
            f"only in {names[0]}: {only_a}, only in {names[1]}: {only_b}"
        )
    if len(a) < 2:
        raise ValueError(f"need at least 2 subjects, got {len(a)}")
    ids = sorted(a)
    return ids, np.array([a[i] for i in ids], dtype=np.float64), np.array([b[i] for i in ids], dtype=np.float64)


def paired_ttest(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Two-sided paired t-test of per-subject values of two arms (the paper's Fig. 2: RMSE).

    The same test subjects go through both arms, so the test is paired
    (``scipy.stats.ttest_rel``) on the per-subject differences ``a - b``.
    The paper reports p = 0.0186 for MC against concrete dropout.

    Args:
        a: Subject id -> value for the first arm.
        b: Subject id -> value for the second arm, same ids.

    Returns:
        ``{"t", "p", "n", "mean_difference"}``; ``t > 0`` when ``a`` is
        larger on average. ``t`` and ``p`` are NaN when all differences are
        equal (no variance to test against).

    Raises:
        ValueError: Different subject ids, or fewer than 2 subjects.
    """
    _, x, y = _paired(a, b, ("a", "b"))
    difference = x - y
    if np.ptp(difference) == 0:
        t, p = np.nan, np.nan
    else:
        test = stats.ttest_rel(x, y)
        t, p = float(test.statistic), float(test.pvalue)
    return {"t": t, "p": p, "n": int(x.size), "mean_difference": float(difference.mean())}


def triage(nstd: Mapping[str, float], nrmse: Mapping[str, float]) -> dict:
    """Rank test volumes by uncertainty and say how well that ranks their true error.

    The paper's clinical use: with no ground truth at deployment, a reader
    checks the volumes with the largest nSTD first. That works as far as
    nSTD orders volumes like their nRMSE, which Spearman's rank correlation
    measures (1: the same order).

    Args:
        nstd: Subject id -> volume nSTD.
        nrmse: Subject id -> volume nRMSE, same ids.

    Returns:
        ``{"spearman", "spearman_p", "pearson", "pearson_p", "n", "ranking"}``;
        ``ranking`` lists ``{"id", "nstd", "nrmse", "nrmse_rank"}`` from the
        most uncertain volume down (ties by id), ``nrmse_rank`` 1 being the
        largest true error.

    Raises:
        ValueError: Different subject ids, or fewer than 2 subjects.
    """
    ids, s, e = _paired(nstd, nrmse, ("nstd", "nrmse"))
    result = correlation(s, e)
    error_rank = stats.rankdata(-e, method="min").astype(int)
    order = sorted(range(len(ids)), key=lambda i: (-s[i], ids[i]))
    ranking = [
        {"id": ids[i], "nstd": float(s[i]), "nrmse": float(e[i]), "nrmse_rank": int(error_rank[i])} for i in order
    ]
    return {
        "spearman": result["spearman"],
        "spearman_p": result["spearman_p"],
        "pearson": result["pearson"],
        "pearson_p": result["pearson_p"],
        "n": len(ids),
        "ranking": ranking,
    }
