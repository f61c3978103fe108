"""Shared input handling: pick the voxels inside a brain mask, once, the same way everywhere."""

from __future__ import annotations

import numpy as np


def masked_voxels(mask: np.ndarray | None, *arrays: np.ndarray, names: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The voxels of each array inside ``mask``, flattened to float64.

    Why one helper: every metric is "inside the mask", and a silent shape
    mismatch or a NaN inside the brain would otherwise give a plausible but
    wrong number.

    Args:
        mask: Boolean mask of the arrays' shape, or None for all voxels.
        *arrays: Volumes of one shape.
        names: Names of the arrays, for error messages.

    Returns:
        One 1-D float64 array per input, in the order given.

    Raises:
        ValueError: Shapes differ, the mask is empty, or a value inside the
            mask is NaN or infinite.
    """
    names = names or tuple(f"array {i}" for i in range(len(arrays)))
    converted = [np.asarray(a) for a in arrays]
    shape = converted[0].shape
    for name, value in zip(names, converted):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} like {names[0]}")
    if mask is None:
        selected = [value.astype(np.float64, copy=False).ravel() for value in converted]
    else:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {shape} like {names[0]}")
        mask = mask.astype(bool, copy=False)
        selected = [value[mask].astype(np.float64, copy=False) for value in converted]
    if selected[0].size == 0:
        raise ValueError("the mask selects no voxels")
    for name, value in zip(names, selected):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values inside the mask")
    return selected


def level_key(level: float) -> str:
    """JSON key of a probability level: ``0.9 -> "0.9"`` (shortest round-tripping form)."""
    return repr(float(level))
