"""Fitting calibrators on a stream of subjects, on one process or many (``STYLE.md``: fitting belongs here, not in a stage).

The calibrate stage samples each calibration subject and hands its brain
voxels here, one :class:`SubjectVoxels` at a time; :func:`fit_calibrators`
feeds every calibrator and finishes the fit across processes:

- a :class:`~uqsynth.calibration.base.StreamingCalibrator` takes each
  subject through ``partial_fit`` (memory of one subject), and under
  torchrun the ranks' additive summaries are summed, which is exact;
- any other calibrator gets every voxel at once, gathered on rank 0.

Which subject a voxel came from is passed on to calibrators that ask for
it, as scikit-learn passes ``sample_weight`` only to estimators whose
``fit`` takes it (``has_fit_parameter``): a ``partial_fit`` (or ``fit``)
with a ``subject`` parameter gets the subject's id with each batch (``fit``:
one id per voxel), so a calibrator whose unit is the subject, not the
voxel, can be written as a plugin; calibrators without it are called as
before, unchanged. A ``regions`` parameter likewise gets each voxel's region
label (None, or 0 in ``fit``, for subjects without labels): Mondrian
calibrators give each region its own scale.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from uqsynth.calibration.base import Calibrator, StreamingCalibrator
from uqsynth.distributed import SINGLE, World, all_reduce_calibrator


@dataclass(frozen=True)
class SubjectVoxels:
    """One calibration subject's brain voxels: predictive mean and std, the truth, and region labels (1D arrays).

    ``regions`` is None for a subject whose dataset labels no regions.
    """

    subject: str
    mean: np.ndarray
    std: np.ndarray
    truth: np.ndarray
    regions: np.ndarray | None = None


def takes_parameter(method, name: str) -> bool:
    """Whether a calibrator's ``partial_fit`` or ``fit`` has a parameter ``name`` (then it is given that)."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        return False


def takes_subjects(method) -> bool:
    """Whether a calibrator's ``partial_fit`` or ``fit`` has a ``subject`` parameter (then it is given the ids)."""
    return takes_parameter(method, "subject")


def _extra(method, batch: SubjectVoxels) -> dict[str, object]:
    """The keyword arguments a calibrator's method asks for: the subject's id, its region labels."""
    extra: dict[str, object] = {}
    if takes_subjects(method):
        extra["subject"] = batch.subject
    if takes_parameter(method, "regions"):
        extra["regions"] = batch.regions
    return extra


def fit_calibrators(
    calibrators: Mapping[str, Calibrator], subjects: Iterable[SubjectVoxels], world: World = SINGLE
) -> int:
    """Fit every calibrator on the subjects this process was given; under torchrun, on all ranks' subjects.

    Returns:
        The number of voxels this process fed (the caller sums them over ranks).
    """
    gathered: dict[str, list[SubjectVoxels]] = {
        name: [] for name, calibrator in calibrators.items() if not isinstance(calibrator, StreamingCalibrator)
    }
    voxels = 0
    for batch in subjects:
        for name, calibrator in calibrators.items():
            if name in gathered:
                gathered[name].append(batch)
            else:
                calibrator.partial_fit(batch.mean, batch.std, batch.truth, **_extra(calibrator.partial_fit, batch))
        voxels += int(batch.mean.size)
    for name, calibrator in calibrators.items():
        if name not in gathered:
            all_reduce_calibrator(calibrator, world)
            continue
        parts = world.gather(gathered[name])
        if not world.is_main:
            continue
        batches = [batch for part in parts for batch in part]
        if not batches:
            raise ValueError(f"{name}: no calibration voxels to fit on")
        arrays = [np.concatenate([getattr(b, field) for b in batches]) for field in ("mean", "std", "truth")]
        extra: dict[str, object] = {}
        if takes_subjects(calibrator.fit):
            extra["subject"] = np.concatenate([np.full(b.mean.size, b.subject, dtype=object) for b in batches])
        if takes_parameter(calibrator.fit, "regions"):  # 0, no region, for subjects without labels
            extra["regions"] = np.concatenate([np.zeros(b.mean.size, dtype=np.int64) if b.regions is None
                                               else np.asarray(b.regions, dtype=np.int64) for b in batches])
        calibrator.fit(*arrays, **extra)
    return voxels
