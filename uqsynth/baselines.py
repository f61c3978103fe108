"""Reference predictors a synthesis model has to beat.

The per-subject linear map is the shortcut a network could fall back on:
predict T2w as ``a * T1w + b`` with ``a, b`` fitted by least squares inside
the brain mask of the very subject being predicted (so it even sees the
truth). On MRI it fails where contrast inverts (CSF is dark on T1w and
bright on T2w), which is exactly what a model of the anatomy should get right.
"""

from __future__ import annotations

import numpy as np


def linear_map_prediction(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least-squares ``a * source + b`` fitted to ``target`` inside ``mask``; zero outside.

    Args:
        source: Source-contrast volume.
        target: Target-contrast volume, same shape.
        mask: Boolean brain mask, same shape; at least two voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.sum() < 2:
        raise ValueError("the mask needs at least two voxels to fit a line")
    x = source[mask].astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, target[mask].astype(np.float64), rcond=None)
    prediction = np.zeros(source.shape, dtype=np.float64)
    prediction[mask] = slope * x + intercept
    return prediction


def masked_rmse(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, *, scale: float = 255.0) -> float:
    """RMSE inside ``mask`` after multiplying both images by ``scale`` (the paper reports [0, 255])."""
    mask = np.asarray(mask, dtype=bool)
    difference = (prediction[mask].astype(np.float64) - target[mask].astype(np.float64)) * scale
    return float(np.sqrt(np.mean(difference**2)))
