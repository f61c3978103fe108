"""Reading, validating and writing NIfTI volumes.

Every NIfTI dataset and ``uqsynth predict`` read through :func:`load_volume` /
:func:`load_pair`, so a broken file is reported the same way everywhere: one
:class:`~uqsynth.errors.DataError` line naming the subject and the file, never
a traceback from deep inside nibabel or, worse, a silent NaN in a loss.
Outputs are written by :func:`save_like` in the input's own grid and header,
so a radiologist can overlay them on the original scan.

A file is checked against its own header before its data are read
(:func:`_check_size`): a damaged header claiming a huge shape would otherwise
make the reader allocate that much memory before finding out. And every
subject's volumes are checked against what uqsynth assumes of them
(skull-stripped magnitude images, :mod:`uqsynth.data.assumptions`).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from uqsynth._files import atomic_path
from uqsynth.data.assumptions import InputWarning, MaskOrigin, check_inputs
from uqsynth.data.base import SubjectVolumes
from uqsynth.data.discovery import nifti_stem
from uqsynth.data.slices import axial_axis
from uqsynth.errors import DataError

#: Largest difference (mm, any affine entry) still accepted as "the same grid".
AFFINE_TOLERANCE_MM = 1e-4

#: Most voxels a header may claim: a 1024^3 grid, 0.2 mm isotropic over a
#: 20 cm head, beyond clinical and research MRI (and 4 GiB as float32 in memory).
MAX_VOXELS = 1024**3

#: Deflate expands data at most 1032-fold, so a .nii.gz of c bytes holds at
#: most 1032 c bytes, whatever its trailer says.
DEFLATE_MAX_RATIO = 1032

_GZIP_MAGIC = b"\x1f\x8b"

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


def _bytes(n: int) -> str:
    if n < 10**6:
        return f"{n:,} bytes"
    return f"{n / 1e6:,.1f} MB" if n < 10**9 else f"{n / 1e9:,.1f} GB"


def _decompressed_size(path: Path, enough: int) -> tuple[int, bool]:
    """Bytes the gzip file decompresses to (counting stops at ``enough``), and whether it ended early.

    Streams in chunks, every gzip member in turn, so memory stays small
    whatever the header claims.
    """
    total, inside = 0, False  # inside: a member has begun and not yet ended
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as handle:
        while total < enough:
            data = handle.read(1 << 20)
            if not data:
                break
            while data and total < enough:
                inside = True
                total += len(decompressor.decompress(data, 1 << 24))
                data = decompressor.unconsumed_tail
                if decompressor.eof:
                    rest, inside = decompressor.unused_data, False
                    decompressor = zlib.decompressobj(wbits=31)
                    # Another member follows, or padding that gzip readers ignore.
                    data = rest if rest and _GZIP_MAGIC.startswith(rest[:2]) else b""
    return total, inside and total < enough


def _held(path: Path, needed: int) -> tuple[int, str]:
    """An upper bound on the bytes ``path`` holds (exact when short of ``needed``), described for messages."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(2)
        handle.seek(max(size - 4, 0))
        trailer = handle.read(4)
    if magic != _GZIP_MAGIC:
        return size, _bytes(size)
    bound = DEFLATE_MAX_RATIO * size
    if needed > bound:
        return bound, f"{_bytes(size)} compressed, at most {_bytes(bound)} once decompressed"
    # The trailer's ISIZE is the last member's size mod 2**32: exact for the
    # usual one-member file under 4 GiB. Anything else (several members, a
    # bigger payload, a trailer that is short) is counted by decompressing.
    if needed < 2**32 and int.from_bytes(trailer, "little") >= needed:
        return needed, ""
    total, truncated = _decompressed_size(path, needed)
    ended = ", then ends (truncated gzip stream)" if truncated else ""
    return total, f"{_bytes(total)} once decompressed{ended}"


def _check_size(img: nib.Nifti1Pair, path: Path, prefix: str) -> None:
    """Refuse a header that claims more data than any MRI volume, or than the file holds."""
    shape = tuple(int(n) for n in img.header.get_data_shape())
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise DataError(f"{prefix}: its header claims shape {shape} ({voxels:.3g} voxels), more than any MRI "
                        f"volume (at most {MAX_VOXELS:.3g}); the header is damaged")
    dtype = img.get_data_dtype()
    offset = int(img.dataobj.offset)  # the image's own header copy has it reset to 0
    needed = offset + voxels * dtype.itemsize
    held, holds = _held(path, needed)
    if held < needed:
        raise DataError(f"{prefix}: its header claims shape {shape} of {dtype} ({_bytes(needed)} with the "
                        f"header), but the file holds {holds}; it is truncated or its header is damaged")


def _read(path: Path, role: str, subject_id: str | None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read the data with scaling applied; any reading failure becomes a DataError."""
    prefix = f"{_where(subject_id)}cannot read {role} file {path}"
    if not path.is_file():
        raise DataError(f"{prefix}: no such file")
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Pair):  # Nifti2 derives from Nifti1Pair too
            raise DataError(f"{prefix}: not a NIfTI image (nibabel read it as {type(img).__name__})")
        _check_size(img, path, prefix)
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


def load_labels(
    path: str | Path, *, role: str, subject_id: str, like: Volume | SubjectVolumes, like_path: str | Path
) -> np.ndarray:
    """Read a label image (e.g. a tumour segmentation) on the grid of a loaded volume.

    Checked as :func:`load_volume` checks images (readable, 3D, finite, a
    usable affine) except that it may be all zero (a subject without a
    tumour), and its values must be whole numbers.

    Args:
        path: The ``.nii`` or ``.nii.gz`` label file.
        role: What the file is, for messages (e.g. ``"seg"``).
        subject_id: The subject it belongs to, for messages.
        like: The volume whose grid (shape and affine) the labels must share.
        like_path: That volume's file, for messages.

    Returns:
        The labels as int32, in the file's own axis order.

    Raises:
        DataError: One line naming the file: unreadable, not 3D, NaN or
            infinite or fractional values, or another shape or affine than ``like``.
    """
    path = Path(path)
    data, img = _read(path, role, subject_id)
    data = _as_3d(data, path, role, subject_id)
    where = _where(subject_id)
    if not np.isfinite(data).all():
        raise DataError(f"{where}{role} file {path} has NaN or infinite voxels; expected integer labels")
    fractional = np.unique(data[data != np.round(data)])
    if fractional.size:
        shown = ", ".join(f"{v:g}" for v in fractional[:5]) + (", ..." if fractional.size > 5 else "")
        raise DataError(f"{where}{role} file {path} holds values that are not whole numbers ({shown}); "
                        "expected integer labels")
    affine = np.asarray(img.affine, dtype=np.float64)
    reference = like.array if isinstance(like, Volume) else like.source
    if data.shape != reference.shape:
        raise DataError(f"{where}{role} file {path} has shape {data.shape} but {like_path} has shape "
                        f"{reference.shape}; the labels must be on the image's grid")
    difference = float(np.max(np.abs(affine - like.affine))) if np.isfinite(affine).all() else math.inf
    if difference > AFFINE_TOLERANCE_MM:
        raise DataError(f"{where}{role} file {path} and {like_path} have different affines (largest difference "
                        f"{difference:.4g} mm); the labels must be on the image's grid")
    return data.astype(np.int32)


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
    mask_option: str = "the dataset's mask option",
) -> SubjectVolumes:
    """Load and cross-check one subject's co-registered source/target volumes.

    The brain mask is the nonzero voxels of the *source* unless ``mask_path``
    is given (then the nonzero voxels of that file). Source only, not the union
    with the target, because at prediction time the target does not exist and
    the mask must be the same in training, evaluation and prediction; the
    volumes are skull-stripped, so background is exactly zero in both anyway.
    That assumption is checked (:mod:`uqsynth.data.assumptions`): past its
    limits loading fails, near them the result carries ``warnings``.

    Args:
        source_path: The input contrast (e.g. T1w).
        target_path: The contrast to synthesize (e.g. T2w).
        subject_id: Named in every error message and stored in the result.
        mask_path: Optional brain mask file, same grid as the source.
        source_role: How messages call the source file (e.g. ``"T1w"``).
        target_role: How messages call the target file (e.g. ``"T2w"``).
        mask_option: Where the user gives a mask file, for messages (e.g. ``"mask_glob"``).

    Returns:
        The validated volumes; ``header`` is the source file's header (with
        the warnings in ``descrip``, when there are some).

    Raises:
        DataError: A file is unreadable or invalid, shapes/affines differ, or
            the volumes are far outside the assumptions.
    """
    source_path, target_path = Path(source_path), Path(target_path)
    source = load_volume(source_path, role=source_role, subject_id=subject_id)
    target = load_volume(target_path, role=target_role, subject_id=subject_id)
    _check_same_grid(source, target, (source_path, target_path), subject_id)
    if mask_path is None:
        mask = source.array != 0
        origin = MaskOrigin(source_path, source_role, f"skull-strip it, or give a brain mask file ({mask_option})")
    else:
        mask_path = Path(mask_path)
        mask_volume = load_volume(mask_path, role="mask", subject_id=subject_id)
        _check_same_grid(source, mask_volume, (source_path, mask_path), subject_id)
        mask = mask_volume.array != 0
        origin = MaskOrigin(mask_path, "mask", "give a mask of the brain only")
    warnings = check_inputs(subject_id=subject_id, mask=mask, origin=origin, axial=axial_axis(source.affine), images=[
        (source_role, source_path, source.array), (target_role, target_path, target.array)])
    return SubjectVolumes(
        subject_id=subject_id,
        source=source.array,
        target=target.array,
        mask=mask,
        affine=source.affine,
        header=_noting(source.header, warnings),
        source_path=source_path,
        target_path=target_path,
        info={"mask_path": Path(mask_path) if mask_path is not None else None},
        warnings=[warning.message for warning in warnings],
    )


def load_source(path: str | Path, *, subject_id: str, role: str = "T1w") -> SubjectVolumes:
    """One source volume without a target (``uqsynth predict``'s inputs), checked as :func:`load_pair` checks.

    The mask is the source's nonzero voxels, as in training.
    """
    path = Path(path)
    image = load_volume(path, role=role, subject_id=subject_id)
    return _source(image, path, subject_id=subject_id, role=role, source_path=path)


def source_from_array(
    array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, *, subject_id: str, role: str, where: str
) -> SubjectVolumes:
    """A source volume already in memory (a notebook's array or nibabel image), checked as :func:`load_source` checks.

    ``where`` names it in messages (a file name, or "the array").
    """
    data = _as_3d(np.asarray(array, dtype=np.float32), where, role, subject_id)
    _check_values(data, where, role, subject_id)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"{_where(subject_id)}{role} {where}: the affine has shape {affine.shape}; expected 4 x 4")
    _check_affine(affine, where, role, subject_id)
    header = header.copy() if isinstance(header, nib.Nifti1Header) else nib.Nifti1Header()
    return _source(Volume(data, affine, header), where, subject_id=subject_id, role=role, source_path=None)


def _source(image: Volume, where, *, subject_id: str, role: str, source_path: Path | None) -> SubjectVolumes:
    mask = image.array != 0
    origin = MaskOrigin(where, role, "skull-strip it (predict takes skull-stripped volumes)")
    warnings = check_inputs(subject_id=subject_id, mask=mask, origin=origin, axial=axial_axis(image.affine),
                            images=[(role, where, image.array)])
    return SubjectVolumes(
        subject_id=subject_id, source=image.array, target=None, mask=mask, affine=image.affine,
        header=_noting(image.header, warnings), source_path=source_path,
        warnings=[warning.message for warning in warnings],
    )


def _noting(header: nib.Nifti1Header, warnings: list[InputWarning]) -> nib.Nifti1Header:
    """The header, with the warnings in ``descrip`` (80 bytes) so every output written in its grid says them."""
    if not warnings:
        return header
    header = header.copy()
    text = "uqsynth input warning: " + "; ".join(warning.short for warning in warnings)
    header["descrip"] = text.encode("ascii", "replace")[:80]
    return header


def is_nifti(path: str | Path) -> bool:
    """Return whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``, in any case)."""
    return nifti_stem(Path(path).name) is not None


def nifti_like(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> nib.Nifti1Image:
    """``array`` as a float32 NIfTI image in a reference image's grid (what :func:`save_like` writes).

    The reference's header is copied (units, descriptions, qform/sform codes)
    so viewers place the output exactly over the input; its intensity scaling
    and display window are reset because they described the input's values,
    not ours.

    Args:
        array: 3D data in the reference's own axis order.
        affine: The reference's voxel-to-world affine.
        header: The reference's NIfTI header, or ``None`` for a fresh one.
    """
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
    return img


def save_like(
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    path: str | Path,
) -> Path:
    """Write ``array`` as float32 NIfTI in a reference image's grid (:func:`nifti_like`), atomically.

    The file appears complete or not at all (temporary file in the same
    directory, fsync, rename).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"output file {path} must end in .nii or .nii.gz")
    img = nifti_like(array, affine, header)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
