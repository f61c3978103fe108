"""What uqsynth assumes of an input volume, and the one rule that checks it.

The brain mask is the nonzero voxels of the source unless a mask file is
given (:func:`uqsynth.data.nifti.load_pair`, ``uqsynth predict``), and
intensities are magnitudes, normalized per slice to [0, 1] with negatives
clipped to 0 (:mod:`uqsynth.data.slices`). Both hold for skull-stripped
magnitude MRI, and both fail without a sound otherwise: a head that is not
skull-stripped becomes a 95 % "brain", scored and calibrated over skull,
scalp and air. :func:`check_inputs` measures three figures and compares
them with what skull-stripped magnitude images give:

=================  ====================================================  =======  =====
figure             what real data give                                   warning  error
=================  ====================================================  =======  =====
box fill: mask     skull-stripped BraTS brains 10-25 % of their          >= 50 %  >= 85 %
voxels / voxels    240x240x155 box, the built-in phantom 11-21 %, the
of the volume      tests' ellipsoid 32 %; a brain cropped to its
                   bounding box ~50 % (an ellipsoid fills pi/6 = 52 %);
                   MNI152 with its head ~95 %, a raw scanner T1 (noisy
                   air) ~100 %
faces: mask        skull-stripped: 0 (air all round the brain); a tight  >= 5 %   >= 50 %
voxels on the      crop touches them in patches; a head or a noisy
in-plane faces     background covers most of them (the top and bottom
                   faces do not count: limited coverage, a slab of a
                   few thick slices, cuts through the brain there)
negative: mask     magnitude MRI is >= 0; resampling undershoot at the   >= 1 %   >= 20 %
voxels below 0     brain's rim stays near 1 %; z-scored, phase or
(source, target)   difference images ~50 %
=================  ====================================================  =======  =====

Past an error threshold the result would be meaningless (the "brain" is
the box, or the values are not magnitudes) and loading stops with a
:class:`~uqsynth.errors.DataError` naming subject, file, the measured
figure and what to do. Between the thresholds the input is suspect: the
warning travels on :attr:`SubjectVolumes.warnings
<uqsynth.data.base.SubjectVolumes.warnings>`, ``uqsynth run`` prints it
(``warning: ...``) and ``metrics.json`` keeps it, and every NIfTI written in
the subject's grid carries it in its header's ``descrip``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from uqsynth.errors import DataError

#: Share of the volume the mask may fill: (warning, error).
FILL = (0.50, 0.85)
#: Share of the outer-face voxels the mask may cover: (warning, error).
FACES = (0.05, 0.50)
#: Share of mask voxels that may be negative, per image: (warning, error).
NEGATIVE = (0.01, 0.20)


class InputWarning(NamedTuple):
    """A suspect input: the full one-line message, and a few words for a NIfTI header."""

    message: str
    short: str


class MaskOrigin(NamedTuple):
    """Where the brain mask came from, for messages.

    Attributes:
        path: The file whose nonzero voxels are the mask.
        role: What that file is (``"T1w"``, ``"mask"``).
        remedy: What the user can do about a mask that is the whole head.
    """

    path: Path | None
    role: str
    remedy: str


def box_figures(mask: np.ndarray, axial: int | None = None) -> tuple[float, float]:
    """The mask's share of the volume and of its outer faces (but the two across ``axial``, the slice axis)."""
    faces = [face for axis in range(3) if axis != axial
             for face in (np.take(mask, 0, axis=axis), np.take(mask, -1, axis=axis))]
    on_faces = sum(int(face.sum()) for face in faces) / sum(face.size for face in faces)
    return float(mask.mean()), on_faces


def check_inputs(
    *,
    subject_id: str,
    mask: np.ndarray,
    origin: MaskOrigin,
    images: list[tuple[str, Path | None, np.ndarray]],
    axial: int | None = None,
) -> list[InputWarning]:
    """Check a subject's mask and images against :mod:`this module's <uqsynth.data.assumptions>` table.

    Args:
        subject_id: Named in every message.
        mask: The brain mask (bool, the images' shape).
        origin: The file the mask was taken from, and the remedy to suggest.
        images: ``(role, path, array)`` of each intensity image (source, target).
        axial: The array axis running inferior-superior: its two faces are
            not counted (``None``: all six are).

    Returns:
        The warnings, in the table's order.

    Raises:
        DataError: A figure past its error threshold.
    """
    found: list[InputWarning] = []
    fill, faces = box_figures(mask, axial)
    where = f"subject {subject_id}: {origin.role} file {origin.path}"
    figures = (f"its nonzero voxels (taken as the brain mask) fill {fill:.0%} of the volume and {faces:.0%} of "
               "its in-plane outer faces (a skull-stripped brain: 10-25%, faces empty)")
    if fill >= FILL[1] or faces >= FACES[1]:
        raise DataError(f"{where} is not skull-stripped (or its background is not zero): {figures}, so "
                        f"scores and calibration would cover the whole head; {origin.remedy}")
    if fill >= FILL[0] or faces >= FACES[0]:
        found.append(InputWarning(
            f"{where} may not be skull-stripped: {figures}; if skull or neck remain, {origin.remedy}",
            f"mask {fill:.0%} of box, {faces:.0%} of faces",
        ))
    for role, path, array in images:
        values = array[mask]
        negative = float(np.mean(values < 0)) if values.size else 0.0
        if negative == 0.0:
            continue
        figure = f"{negative:.1%} of its brain voxels are negative (down to {float(values.min()):.4g})"
        where = f"subject {subject_id}: {role} file {path}"
        if negative >= NEGATIVE[1]:
            raise DataError(f"{where}: {figure}, but magnitude MRI is nonnegative: a z-scored, phase or "
                            "difference image? normalization would clip them to 0; give magnitude images")
        if negative >= NEGATIVE[0]:
            found.append(InputWarning(
                f"{where}: {figure}, more than resampling undershoot leaves; magnitude MRI is nonnegative "
                "and normalization clips them to 0",
                f"{negative:.1%} negative {role}",
            ))
    return found
