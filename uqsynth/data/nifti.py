"""Reading, validating and writing NIfTI volumes.

Every NIfTI dataset and ``uqsynth predict`` read through :func:`load_volume` /
:func:`load_pair`, so a broken file is reported the same way everywhere: one
:class:`~uqsynth.errors.DataError` line naming the subject and the file, never
a traceback from deep inside nibabel or, worse, a silent NaN in a loss.
Outputs are written by :func:`save_like` in the input's own grid and header,
so a radiologist can overlay them on the original scan.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from uqsynth._files import atomic_path
from uqsynth.data.base import SubjectVolumes
from uqsynth.errors import DataError

#: Largest difference (mm, any affine entry) still accepted as "the same grid".
AFFINE_TOLERANCE_MM = 1e-4

#: File name endings recognized as NIfTI.
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Everything nibabel / gzip / the OS raise for a file that cannot be read as an image.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


class Volume(NamedTuple):
    """One validated image: data in float32, the voxel-to-world affine, the header."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header


def _where(subject_id: str | None) -> str:
    return f"subject {subject_id}: " if subject_id is not None else ""


def _one_line(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "truncated gzip stream (the file ended before the end of its compressed data)"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _read(path: Path, role: str, subject_id: str | None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read the data with scaling applied; any reading failure becomes a DataError."""
    prefix = f"{_where(subject_id)}cannot read {role} file {path}"
    if not path.is_file():
        raise DataError(f"{prefix}: no such file")
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Pair):  # Nifti2 derives from Nifti1Pair too
            raise DataError(f"{prefix}: not a NIfTI image (nibabel read it as {type(img).__name__})")
        # The proxy applies scl_slope/scl_inter, and decompresses lazily, so a
        # truncated .nii.gz only fails here.
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise DataError(f"{prefix}: {_one_line(error)}") from error
    return data, img


def _as_3d(data: np.ndarray, path: Path, role: str, subject_id: str | None) -> np.ndarray:
    # Some tools write a 3D scan as 4D with one volume; that is still one volume.
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{_where(subject_id)}{role} file {path} has shape {shape}; expected a 3D volume"
        )
    return data


def _check_values(data: np.ndarray, path: Path, role: str, subject_id: str | None) -> None:
    # NaN/Inf would propagate silently through normalization into the loss.
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    if n_nan or n_inf:
        raise DataError(
            f"{_where(subject_id)}{role} file {path} has {n_nan} NaN and {n_inf} infinite voxels"
        )
    if not np.any(data):
        raise DataError(f"{_where(subject_id)}{role} file {path} is all zeros")


def _check_affine(affine: np.ndarray, path: Path, role: str, subject_id: str | None) -> None:
    # A singular affine has no orientation, and slicing needs one.
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(
            f"{_where(subject_id)}{role} file {path} has an unusable affine "
            f"(non-finite or singular): {np.round(affine[:3], 4).tolist()}"
        )


def load_volume(path: str | Path, *, role: str, subject_id: str | None) -> Volume:
    """Read one NIfTI file and check that it is a usable 3D image.

    Checks, each failing with a one-line :class:`DataError` naming the subject
    and file: readable (not truncated, really a NIfTI), 3D (a trailing
    singleton 4th dimension is squeezed away), finite values, not all zero,
    and a non-singular affine.

    Args:
        path: The ``.nii`` or ``.nii.gz`` file.
        role: What the file is, for messages (e.g. ``"T1w"``, ``"source"``, ``"mask"``).
        subject_id: The subject it belongs to, for messages (``None`` if unknown).

    Returns:
        The data as float32 (``scl_slope``/``scl_inter`` applied), the affine and the header.
    """
    path = Path(path)
    data, img = _read(path, role, subject_id)
    data = _as_3d(data, path, role, subject_id)
    _check_values(data, path, role, subject_id)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, path, role, subject_id)
    return Volume(data, affine, img.header)


def _check_same_grid(
    first: Volume, second: Volume, paths: tuple[Path, Path], subject_id: str
) -> None:
    if first.array.shape != second.array.shape:
        raise DataError(
            f"subject {subject_id}: {paths[0]} has shape {first.array.shape} but "
            f"{paths[1]} has shape {second.array.shape}"
        )
    difference = float(np.max(np.abs(first.affine - second.affine)))
    if difference > AFFINE_TOLERANCE_MM:
        raise DataError(
            f"subject {subject_id}: {paths[0]} and {paths[1]} have different affines "
            f"(largest difference {difference:.4g} mm); the volumes must be co-registered "
            "on the same grid"
        )


def load_pair(
    source_path: str | Path,
    target_path: str | Path,
    *,
    subject_id: str,
    mask_path: str | Path | None = None,
    source_role: str = "source",
    target_role: str = "target",
) -> SubjectVolumes:
    """Load and cross-check one subject's co-registered source/target volumes.

    The brain mask is the nonzero voxels of the *source* unless ``mask_path``
    is given (then the nonzero voxels of that file). Source only, not the union
    with the target, because at prediction time the target does not exist and
    the mask must be the same in training, evaluation and prediction; the
    volumes are skull-stripped, so background is exactly zero in both anyway.

    Args:
        source_path: The input contrast (e.g. T1w).
        target_path: The contrast to synthesize (e.g. T2w).
        subject_id: Named in every error message and stored in the result.
        mask_path: Optional brain mask file, same grid as the source.
        source_role: How messages call the source file (e.g. ``"T1w"``).
        target_role: How messages call the target file (e.g. ``"T2w"``).

    Returns:
        The validated volumes; ``header`` is the source file's header.

    Raises:
        DataError: A file is unreadable or invalid, or shapes/affines differ.
    """
    source_path, target_path = Path(source_path), Path(target_path)
    source = load_volume(source_path, role=source_role, subject_id=subject_id)
    target = load_volume(target_path, role=target_role, subject_id=subject_id)
    _check_same_grid(source, target, (source_path, target_path), subject_id)
    if mask_path is None:
        mask = source.array != 0
    else:
        mask_path = Path(mask_path)
        mask_volume = load_volume(mask_path, role="mask", subject_id=subject_id)
        _check_same_grid(source, mask_volume, (source_path, mask_path), subject_id)
        mask = mask_volume.array != 0
    return SubjectVolumes(
        subject_id=subject_id,
        source=source.array,
        target=target.array,
        mask=mask,
        affine=source.affine,
        header=source.header,
        source_path=source_path,
        target_path=target_path,
        info={"mask_path": Path(mask_path) if mask_path is not None else None},
    )


def is_nifti(path: str | Path) -> bool:
    """Return whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    return str(path).endswith(NIFTI_SUFFIXES)


def save_like(
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    path: str | Path,
) -> Path:
    """Write ``array`` as float32 NIfTI in a reference image's grid, atomically.

    The reference's header is copied (units, descriptions, qform/sform codes)
    so viewers place the output exactly over the input; its intensity scaling
    and display window are reset because they described the input's values,
    not ours. The file appears complete or not at all (temporary file in the
    same directory, fsync, rename).

    Args:
        array: 3D data in the reference's own axis order.
        affine: The reference's voxel-to-world affine.
        header: The reference's NIfTI header, or ``None`` for a fresh one.
        path: Destination ending in ``.nii`` or ``.nii.gz``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"output file {path} must end in .nii or .nii.gz")
    array = np.asarray(array, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    new_header = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header=new_header)
    sform_code = int(header["sform_code"]) if header is not None else 0
    qform_code = int(header["qform_code"]) if header is not None else 0
    # Nifti1Image resets the codes when the affine differs from the header's;
    # set both explicitly so the reference's codes survive (aligned if it had none).
    img.set_sform(affine, code=sform_code or (0 if qform_code else 2))
    img.set_qform(affine, code=qform_code)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0.0
    img.header["cal_max"] = 0.0
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
