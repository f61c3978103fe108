"""Accuracy of the predicted image inside the brain: RMSE, MAE, PSNR, SSIM.

Conventions (the paper's): intensities come normalized to [0, 1] (each
slice scaled to that range before synthesis), and errors are reported after
scaling to [0, 255], so :func:`rmse` and :func:`mae` multiply by
``scale=255``. PSNR and SSIM are scale-free once their data range matches
the scale: on the normalized scale the data range is 1.0, and the same
images on [0, 255] with data range 255 give exactly the same numbers.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from uqsynth.metrics._voxels import masked_voxels

# skimage's Gaussian SSIM window (sigma 1.5, truncate 3.5, as Wang et al. 2004):
# radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5
_SSIM_WIN = 2 * _SSIM_RADIUS + 1


def rmse(truth: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None, *, scale: float = 255.0) -> float:
    """Root mean squared error inside ``mask``, on the ``[0, scale]`` intensity scale.

    Same number as :func:`uqsynth.baselines.masked_rmse`; the paper's Fig. 2
    box plots show it per subject (``scale=255``).

    Args:
        truth: True image, normalized to [0, 1].
        prediction: Predicted image (the predictive mean), same shape.
        mask: Brain mask; None for every voxel.
        scale: Factor applied to both images first.
    """
    truth, prediction = masked_voxels(mask, truth, prediction, names=("truth", "prediction"))
    return float(np.sqrt(np.mean((prediction - truth) ** 2)) * scale)


def mae(truth: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None, *, scale: float = 255.0) -> float:
    """Mean absolute error inside ``mask``, on the ``[0, scale]`` scale (the limit of CRPS as std -> 0)."""
    truth, prediction = masked_voxels(mask, truth, prediction, names=("truth", "prediction"))
    return float(np.mean(np.abs(prediction - truth)) * scale)


def psnr(
    truth: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = 1.0
) -> float:
    """Peak signal-to-noise ratio in dB inside ``mask``: ``10 log10(data_range^2 / MSE)``.

    ``data_range=1.0`` is the range of the normalized images; PSNR on the
    [0, 255] scale with data range 255 is the same number (the ratio is
    scale-free). The MSE is over brain voxels only, so the background does
    not inflate the score. Identical images give ``inf``.
    """
    truth, prediction = masked_voxels(mask, truth, prediction, names=("truth", "prediction"))
    mse = np.mean((prediction - truth) ** 2)
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(data_range**2 / mse))


def ssim(
    truth: np.ndarray,
    prediction: np.ndarray,
    mask: np.ndarray,
    *,
    axis: int,
    data_range: float = 1.0,
) -> float:
    """Structural similarity inside the brain: the mean of 2-D SSIM maps over all brain voxels.

    Uses ``skimage.metrics.structural_similarity`` (Gaussian 11-tap window,
    sigma 1.5, population covariances, K1 0.01, K2 0.03: the settings of
    Wang et al. 2004) on each slice along ``axis`` that holds brain, with
    ``data_range=1.0`` for normalized images (255 on the [0, 255] scale gives
    the same map). Why these choices:

    - 2-D slices, because the model synthesizes slice by slice (and slices
      are normalized one by one), so 3-D windows would mix slices whose
      intensity scales were set independently.
    - Both images are set to 0 outside the mask first, so voxels outside the
      brain cannot change the score (the truth is skull-stripped, i.e.
      already 0 there).
    - The local SSIM map is averaged over brain voxels (every brain voxel
      weighs the same, so a slice at the top of the head with few brain
      voxels does not count as much as a central one). Each slice is cropped
      to its brain's bounding box plus the window radius, which leaves the
      map at brain voxels unchanged.

    Args:
        truth: True volume, normalized to [0, 1].
        prediction: Predicted volume, same shape.
        mask: Boolean brain mask, same shape.
        axis: Slice axis (the axial axis the model works on).
        data_range: Range of the intensities.

    Raises:
        ValueError: Shapes differ, the mask is empty, or a slice is smaller
            than the 11 x 11 window.
    """
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    masked_voxels(mask, truth, prediction, names=("truth", "prediction"))  # validates
    if truth.ndim < 3:
        raise ValueError(f"ssim needs a volume (3-D), got shape {truth.shape}")
    truth = np.moveaxis(np.where(mask, truth, 0.0), axis, 0)
    prediction = np.moveaxis(np.where(mask, prediction, 0.0), axis, 0)
    mask = np.moveaxis(mask, axis, 0)
    if min(truth.shape[1:]) < _SSIM_WIN:
        raise ValueError(f"ssim needs slices of at least {_SSIM_WIN} x {_SSIM_WIN} voxels, got {truth.shape[1:]}")
    total, count = 0.0, 0
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        box = _padded_box(mask[k])
        _, ssim_map = structural_similarity(
            truth[k][box],
            prediction[k][box],
            data_range=data_range,
            gaussian_weights=True,
            sigma=_SSIM_SIGMA,
            use_sample_covariance=False,
            full=True,
        )
        inside = mask[k][box]
        total += float(ssim_map[inside].sum())
        count += int(inside.sum())
    return total / count


def _padded_box(mask2d: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``mask2d`` grown by the SSIM radius and to at least the window size."""
    box = []
    for dim, size in enumerate(mask2d.shape):
        hits = np.flatnonzero(mask2d.any(axis=1 - dim))
        start = max(0, min(int(hits[0]) - _SSIM_RADIUS, size - _SSIM_WIN))
        stop = min(size, max(int(hits[-1]) + 1 + _SSIM_RADIUS, start + _SSIM_WIN))
        box.append(slice(start, stop))
    return tuple(box)
