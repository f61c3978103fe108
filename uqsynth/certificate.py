"""The certificate beside every map set: what its intervals promise, made by which model, and the volume's summary.

A synthesized T2w and its std map say nothing by themselves about how far
to trust them. ``<stem>_uncertainty.json``, written by ``uqsynth predict``
beside each volume's maps and by ``uqsynth run`` beside each test
subject's predictions, says it in one file a person or a pipeline can
read:

- ``model``: the arm, the sha256 of its ``generator.safetensors``, its
  likelihood, the number of MC samples and the seed;
- ``intervals``: for the interval the maps hold (``predict``), or for every
  calibrator the run fitted (``run``), the calibrator and its parameters,
  the sha256 of its file, the level, and its promise from
  :meth:`uqsynth.calibration.base.Calibrator.guarantee` (unit: voxel or
  subject or none; one sentence; alpha, delta, the number of calibration
  subjects), with the volume's mean interval width;
- ``volume``: brain voxels, nSTD (the RMS of the std, the paper's volume
  uncertainty, what triage ranks new patients by) and the mean std;
- the uqsynth version.

Widths, nSTD and std are on the [0, 255] scale of the normalized
intensities, as in ``metrics.json``, whatever ``--rescale-like`` did to the
maps: the numbers of two scanners' volumes then rank alike. An interval
that is infinite (a calibrator with too few calibration subjects for the
level says so rather than narrow it) has ``mean_width`` null and counts its
``infinite_voxels``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

import uqsynth
from uqsynth._files import atomic_write_text
from uqsynth.calibration.base import Calibrator, promise
from uqsynth.metrics.levels import nstd
from uqsynth.model_files import sha256_of

#: Ending of a certificate's file name, after the volume's stem.
SUFFIX = "_uncertainty.json"

#: The layout of a certificate; changes when a key changes meaning.
FORMAT = "uqsynth-certificate-1"

#: Intensity scale of the widths and stds reported (the paper's, as in ``metrics.json``).
SCALE = 255.0


def certificate_path(out_dir: Path, stem: str) -> Path:
    """Where the certificate of the volume ``stem`` goes: ``<out_dir>/<stem>_uncertainty.json``."""
    return out_dir / f"{stem}{SUFFIX}"


def gaussian_guarantee(level: float) -> dict[str, object]:
    """The promise of an uncalibrated Gaussian interval ``mean ± z std``: none, said plainly."""
    return promise(None, f"no guarantee: the Gaussian {level:g} interval of the predicted std, not calibrated "
                         "(fit a calibrator with `uqsynth run` to get one)", level)


def interval_entry(
    level: float,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    name: str | None = None,
    calibrator: Calibrator | None = None,
    calibrator_file: Path | None = None,
) -> dict[str, object]:
    """One entry of ``intervals``: who made the interval, what it promises, and its width in this volume.

    Args:
        level: The central interval's level.
        lower, upper: Its bounds over the brain voxels (normalized scale).
        name: The calibrator's registered name; None for the uncalibrated Gaussian interval.
        calibrator: The fitted calibrator (its parameters and :meth:`~Calibrator.guarantee`).
        calibrator_file: Its saved file, whose sha256 is recorded.
    """
    width = np.asarray(upper, dtype=np.float64) - np.asarray(lower, dtype=np.float64)
    finite = np.isfinite(width)
    entry: dict[str, object] = {
        "calibrator": name,
        "params": calibrator.get_params(deep=False) if calibrator is not None else None,
        "calibrator_sha256": sha256_of(calibrator_file) if calibrator_file is not None else None,
        "level": float(level),
        **(calibrator.guarantee(level) if calibrator is not None else gaussian_guarantee(level)),
        "mean_width": float(width.mean() * SCALE) if width.size and finite.all() else None,
        "infinite_voxels": int((~finite).sum()),
    }
    return entry


def volume_summary(std: np.ndarray) -> dict[str, object]:
    """The volume's uncertainty in numbers: brain voxels, nSTD and mean std (over the brain voxels given)."""
    std = np.asarray(std, dtype=np.float64)
    return {
        "brain_voxels": int(std.size),
        "nstd": nstd(std, scale=SCALE) if std.size else None,
        "std_mean": float(std.mean() * SCALE) if std.size else None,
        "scale": "normalized intensities on [0, 255], as in metrics.json",
    }


def certificate(
    *,
    volume: str,
    arm: str,
    generator_file: Path,
    likelihood: str,
    sampling: Mapping[str, object],
    seed: int,
    std: np.ndarray,
    intervals: Sequence[Mapping[str, object]],
    maps: Mapping[str, str] | None = None,
    region_names: Mapping[int, str] | None = None,
) -> dict[str, object]:
    """The certificate of one volume's map set, JSON-ready.

    Args:
        volume: The volume's stem (subject id) its maps are named after.
        arm: The trained arm that made them.
        generator_file: Its ``generator.safetensors`` (sha256 recorded).
        likelihood: The arm's likelihood (``l1``, ``laplace``, ...).
        sampling: How the MC samples were drawn (:meth:`SamplerOptions.record
            <uqsynth.posterior.SamplerOptions.record>`: T, or the adaptive rule), and seed the seed.
        std: The total std over the brain voxels (normalized scale).
        intervals: :func:`interval_entry` dicts.
        maps: Map name -> file name beside the certificate, where it sits beside maps.
        region_names: Region label -> name, where the volume's dataset labels regions (what a
            Mondrian calibrator's per-region promises, keyed by label, are about).
    """
    document: dict[str, object] = {
        "format": FORMAT,
        "uqsynth_version": uqsynth.__version__,
        "volume": volume,
        "model": {"arm": arm, "generator_sha256": sha256_of(generator_file), "likelihood": likelihood,
                  **sampling, "seed": int(seed)},
        "intervals": [dict(entry) for entry in intervals],
        "summary": volume_summary(std),
    }
    if maps is not None:
        document["maps"] = dict(maps)
    if region_names:
        document["region_names"] = {str(label): str(name) for label, name in sorted(region_names.items())}
    return document


def write_certificate(path: Path, document: Mapping[str, object]) -> Path:
    """Write a certificate atomically; strict JSON (no NaN or Infinity: an unbounded width is null)."""
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path
