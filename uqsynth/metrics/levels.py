"""Error against uncertainty at the paper's three levels (its Fig. 4): voxel, slice, volume.

The paper's point: the std of one voxel is a weak clue to that voxel's
error, but aggregated over a slice or a volume the relation gets strong.
Each level gives pairs (error, uncertainty) and their Pearson (linear) and
Spearman (rank) correlations:

- voxel: ``|mean - truth|`` against ``std``, every brain voxel of a subject
  (:func:`voxel_pairs` gives a deterministic subsample for plotting);
- slice: per slice with brain, ``nRMSE`` against ``nSTD`` (:func:`slice_level`);
- volume: the same over the whole brain (:func:`nrmse`, :func:`nstd`).

``nRMSE = ||mean - truth||_2,Omega / ||truth||_2,Omega`` is scale-free;
``nSTD = ||std||_2,Omega / sqrt(N_Omega)`` (the RMS of the std) is reported on
the ``[0, scale]`` scale like the paper's RMSE.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from uqsynth.metrics._voxels import masked_voxels


def nrmse(truth: np.ndarray, mean: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``||mean - truth||_2 / ||truth||_2`` over the mask: the paper's nRMSE (scale-free).

    Returns ``inf`` when the truth is zero on the whole mask (not the case
    for a brain mask of nonzero voxels).
    """
    truth, mean = masked_voxels(mask, truth, mean, names=("truth", "mean"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.linalg.norm(mean - truth) / np.linalg.norm(truth))


def nstd(std: np.ndarray, mask: np.ndarray | None = None, *, scale: float = 255.0) -> float:
    """``||std||_2 / sqrt(N)`` over the mask (the RMS of the std), on the ``[0, scale]`` scale."""
    (std,) = masked_voxels(mask, std, names=("std",))
    return float(np.sqrt(np.mean(std**2)) * scale)


def slice_level(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray,
    *,
    axis: int,
    scale: float = 255.0,
) -> dict[str, list]:
    """Per-slice nRMSE and nSTD, for each slice along ``axis`` that holds brain.

    Returns:
        ``{"index": [...], "nrmse": [...], "nstd": [...], "rmse": [...]}``:
        the slice indices along ``axis`` (slices without brain are left out,
        as they have no nRMSE) and the values per slice, as plain lists
        (``rmse`` on the ``[0, scale]`` scale, as ``nstd``).
    """
    mask = np.asarray(mask)
    masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))  # validates
    volumes = [np.moveaxis(np.asarray(value), axis, 0) for value in (truth, mean, std, mask)]
    result: dict[str, list] = {"index": [], "nrmse": [], "nstd": [], "rmse": []}
    for k in range(volumes[0].shape[0]):  # slice by slice: memory of one slice, not of the volume
        inside = volumes[3][k].astype(bool)
        if inside.any():
            result["index"].append(k)
            result["nrmse"].append(nrmse(volumes[0][k], volumes[1][k], inside))
            result["nstd"].append(nstd(volumes[2][k], inside, scale=scale))
            error = volumes[1][k][inside] - volumes[0][k][inside]
            result["rmse"].append(float(np.sqrt(np.mean(np.square(error, dtype=np.float64))) * scale))
    return result


def voxel_pairs(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    max_points: int = 20000,
    seed: int = 0,
    scale: float = 255.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(|mean - truth|, std)`` of brain voxels on the ``[0, scale]`` scale, at most ``max_points`` of them.

    Why subsample: a brain holds ~10^6 voxels, more than a scatter plot can
    show. The subsample is uniform without replacement from a generator
    seeded with ``seed``, so the same inputs always give the same points;
    with fewer voxels than ``max_points`` all are returned, in mask order.
    Correlations should be computed on all voxels (:func:`correlation`),
    not on this subsample.
    """
    truth, mean, std = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    if truth.size > max_points:
        index = np.sort(np.random.default_rng(seed).choice(truth.size, size=max_points, replace=False))
        truth, mean, std = truth[index], mean[index], std[index]
    return np.abs(mean - truth) * scale, std * scale


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of paired values, with their two-sided p-values.

    Pearson measures a linear relation, Spearman a monotone one (what a
    ranking by uncertainty needs). With fewer than two pairs or a constant
    input the correlation is undefined and NaN is returned instead of a
    warning.

    Returns:
        ``{"pearson", "pearson_p", "spearman", "spearman_p", "n"}``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must pair up, got {x.size} and {y.size} values")
    result = {"pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan, "spearman_p": np.nan, "n": int(x.size)}
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n = 2 (p undefined) is reported as NaN p below
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    result.update(
        pearson=float(pearson.statistic),
        pearson_p=float(pearson.pvalue),
        spearman=float(spearman.statistic),
        spearman_p=float(spearman.pvalue),
    )
    return result
