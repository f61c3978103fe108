"""The evaluate stage: every metric of every arm, from the saved predictions.

Reads ``RUN/<arm>/predictions/<id>_{mean,std}.nii.gz`` (``_std`` is the
total std; ``_std_epistemic`` and ``_std_aleatoric``, where a run wrote
them, are kept for the example figure) and the fitted calibrators, takes
the truth and the region labels from the dataset (the normalized T2w the
model was trained to produce), and feeds one subject at a time to a
:class:`~uqsynth.metrics.CohortEvaluator`, so it never samples again and
never holds more than one volume. ``uqsynth report RUN`` reruns exactly this.

Outputs ``RUN/metrics.json`` (the keys of issue 5 under ``arms.<arm>``,
each test subject's fraction of brain voxels outside every interval under
``arms.<arm>.subject_miscoverage``, PICP-90 and 90 % interval width per
region under ``arms.<arm>.regions``
when the dataset labels regions, the per-subject linear-map baseline under
``baselines.linear_map``, the paired t-test between the first two arms,
which subjects the calibrators were fitted on, timing) and
``RUN/metrics.csv`` (one row per arm and subject).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from uqsynth._files import atomic_write_text, write_csv
from uqsynth.baselines import linear_map_prediction, masked_rmse
from uqsynth.calibration.io import load_calibrator
from uqsynth.config import Config
from uqsynth.data.base import Dataset
from uqsynth.data.slices import EvalVolume, axial_axis
from uqsynth.errors import DataError
from uqsynth.metrics import CohortEvaluator, paired_ttest
from uqsynth.metrics._voxels import level_key
from uqsynth.run_directory import ArmPaths

#: Central interval levels scored in metrics.json (PICP and width at each).
INTERVAL_LEVELS = (0.5, 0.8, 0.9, 0.95)

#: Optional per-subject std components a run may write next to ``<id>_std.nii.gz`` (the total).
STD_COMPONENTS = ("std_epistemic", "std_aleatoric")

#: The level of the per-region coverage and width, and its key in ``metrics.json`` (``picp_90``, ``width_90``).
REGION_LEVEL = 0.9
_REGION_SUFFIX = "90"


@dataclass
class ArmEvaluation:
    """One arm's cohort evaluator, its numbers, and the volumes kept for the example figure."""

    evaluator: CohortEvaluator
    result: dict
    learned_p: list[float]
    example: dict[str, np.ndarray] = field(default_factory=dict)
    calibrator_fit: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> its fit_report()
    guarantees: dict[str, dict] = field(default_factory=dict)  # name -> its guarantee(REGION_LEVEL)


def read_prediction(path: Path) -> np.ndarray:
    """A saved prediction volume, refusing a missing or unreadable file with a one-line error."""
    if not path.is_file():
        raise DataError(f"{path}: missing prediction (rerun `uqsynth run` with the same --out to sample it)")
    try:
        return np.asanyarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(f"{path}: cannot read the prediction: {exc}") from None


class _CalibratedNLL:
    """``nll(mean, std, truth)`` of a calibrator's predictive; a class, so sharded evaluation can pickle it."""

    def __init__(self, calibrator) -> None:
        self.calibrator = calibrator

    def __call__(self, mean, std, truth):
        from uqsynth.predictive import GaussianPredictive

        return self.calibrator.calibrate(GaussianPredictive(mean, std)).nll(truth)


def _calibrated_nll(calibrator) -> object | None:
    """``nll(mean, std, truth)`` of the calibrator's predictive where it has a density, else None.

    Through :meth:`Calibrator.calibrate` and :class:`uqsynth.predictive.GaussianPredictive`;
    a predictive without a density (``nll`` raising ``NotImplementedError``
    on a probe: isotonic's step function, conformal's bounded intervals)
    gives None, so the report shows no calibrated NLL rather than a wrong one.
    """
    if getattr(calibrator, "calibrate", None) is None:
        return None
    nll = _CalibratedNLL(calibrator)
    try:
        probe = np.asarray(nll(np.full(2, 0.5), np.full(2, 0.1), np.array([0.5, 0.6])), dtype=np.float64)
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return None
    return nll if probe.shape == (2,) else None


def _components(predictions: ArmPaths, subject_id: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The std components the run wrote for the subject (none for runs before they existed)."""
    found = {}
    for name in STD_COMPONENTS:
        path = predictions.prediction(subject_id, name)
        if path.is_file():
            found[name] = read_prediction(path)
            if found[name].shape != shape:
                raise DataError(f"{path}: shape {found[name].shape}, the subject {shape}")
    return found


def evaluate_arm(
    config: Config, dataset: Dataset, test_ids: list[str], arm_dir: Path, learned_p: list[float]
) -> ArmEvaluation:
    """All metrics of one arm over the test subjects, before and after each fitted calibrator.

    Subjects whose dataset gives region labels are also scored per region
    (PICP and width of the 90 % interval); the first subject's volumes (with
    its epistemic and aleatoric std, where the run wrote them) are kept for
    the example figure.
    """
    paths = ArmPaths(arm_dir)
    calibrators = dict(load_calibrator(paths.calibrator(name), arm=paths.name)
                       for name in paths.fitted([spec.name for spec in config.calibration.calibrators]))
    nll_fns = {name: fn for name, fn in ((n, _calibrated_nll(c)) for n, c in calibrators.items()) if fn is not None}
    evaluator: CohortEvaluator | None = None
    example: dict[str, np.ndarray] = {}
    for subject_id in test_ids:
        volumes = dataset.load(subject_id)
        evaluation = EvalVolume(volumes, image_size=config.data.image_size)
        mean = read_prediction(paths.prediction(subject_id, "mean"))
        std = read_prediction(paths.prediction(subject_id, "std"))
        if mean.shape != evaluation.shape or std.shape != evaluation.shape:
            raise DataError(f"{paths.predictions}: {subject_id}'s maps have shape {mean.shape}, "
                            f"the subject {evaluation.shape}")
        axis = axial_axis(volumes.affine)
        if evaluator is None:
            evaluator = CohortEvaluator(
                axis=axis,
                quantile_fns={name: c.quantile for name, c in calibrators.items()},
                interval_fns={name: c.interval for name, c in calibrators.items()},
                interval_levels=INTERVAL_LEVELS,
                nll_fns=nll_fns,
                region_levels=(REGION_LEVEL,),
            )
        truth, mask = evaluation.normalized_target(), evaluation.native_mask()
        regions = evaluation.native_regions()
        evaluator.add(subject_id, truth, mean, std, mask, regions=regions, region_names=evaluation.region_names)
        if not example:
            example = {"source": evaluation.normalized_source(), "truth": truth, "mean": mean, "std": std,
                       **_components(paths, subject_id, evaluation.shape),
                       "mask": mask, "axis": np.array(axis), "subject": np.array(subject_id)}
    if evaluator is None:
        raise DataError("no test subjects to evaluate")
    fits = {name: {key: float(value) for key, value in calibrator.fit_report().items()}
            for name, calibrator in calibrators.items()}
    guarantees = {name: calibrator.guarantee(REGION_LEVEL) for name, calibrator in calibrators.items()}
    return ArmEvaluation(evaluator, evaluator.result(), learned_p, example, fits, guarantees)


def evaluate_linear_baseline(config: Config, dataset: Dataset, test_ids: list[str]) -> dict[str, float]:
    """Per-subject RMSE of the linear-map shortcut (:mod:`uqsynth.baselines`), on the arms' scale.

    The map ``a * T1w + b`` is fitted by least squares to each subject's own
    normalized target inside its brain mask, so it sees the truth it is
    scored on: a model that does not beat it has learned no more than a
    global intensity inversion.
    """
    rmse = {}
    for subject_id in test_ids:
        evaluation = EvalVolume(dataset.load(subject_id), image_size=config.data.image_size)
        source, truth, mask = evaluation.normalized_source(), evaluation.normalized_target(), evaluation.native_mask()
        rmse[subject_id] = masked_rmse(linear_map_prediction(source, truth, mask), truth, mask)
    return rmse


def merge_evaluations(parts: list[ArmEvaluation | None], test_ids: list[str]) -> ArmEvaluation:
    """One arm's evaluation from the parts of several processes (None: a process with no subjects).

    Subjects are reported in ``test_ids`` order; the example figure's
    volumes come from the part that has them (the first test subject's).
    """
    present = [part for part in parts if part is not None]
    if not present:
        raise DataError("no test subjects to evaluate")
    evaluator = present[0].evaluator
    for index, part in enumerate(present[1:], start=2):
        evaluator.merge(part.evaluator, order=test_ids if index == len(present) else None)
    example = next((part.example for part in present if part.example), {})
    first = present[0]
    return ArmEvaluation(evaluator, evaluator.result(), first.learned_p, example, first.calibrator_fit, first.guarantees)


def region_summary(result: dict) -> dict | None:
    """``arms.<arm>.regions``: region name -> voxels, subjects, PICP-90 and mean 90 % width (uncalibrated, per calibrator).

    None when no test subject has region labels (the key is then left out).
    """
    regions = result.get("regions")
    if not regions:
        return None
    key = level_key(REGION_LEVEL)
    out = {}
    for name, numbers in regions.items():
        groups = {"uncalibrated": numbers["gaussian"], **numbers["calibrators"]}
        out[name] = {
            "voxels": numbers["voxels"],
            "subjects": numbers["subjects"],
            f"picp_{_REGION_SUFFIX}": {group: values["picp"][key] for group, values in groups.items()},
            f"width_{_REGION_SUFFIX}": {group: values["width"][key] for group, values in groups.items()},
        }
    return out


def subject_miscoverage(result: dict) -> dict:
    """``arms.<arm>.subject_miscoverage``: per interval, the fraction of each test subject's brain voxels outside it.

    What the subject-level calibrators promise is about this number (its
    expectation over new subjects is at most ``alpha = 1 - level``); pooled
    PICP, the voxel average, can look right while some subjects are far off.
    Keyed like ``picp_after``: ``uncalibrated`` and each calibrator, then the
    level (``"0.9"``), with ``alpha``, ``per_subject`` (id -> fraction, in
    test order), ``mean``, ``max`` and ``above_alpha`` (how many subjects
    exceed ``alpha``).
    """
    subjects = result["subjects"]
    groups = {"uncalibrated": lambda s: s["gaussian"]}
    groups.update({name: (lambda s, name=name: s["calibrators"][name]) for name in result["calibrators"]})
    out: dict = {}
    for group, numbers_of in groups.items():
        per_level = {}
        for level in INTERVAL_LEVELS:
            key, alpha = level_key(level), round(1.0 - level, 12)
            outside = {i: 1.0 - float(numbers_of(s)["picp"][key]) for i, s in subjects.items()}
            values = np.array(list(outside.values()))
            per_level[key] = {"alpha": alpha, "per_subject": outside, "mean": float(values.mean()),
                              "max": float(values.max()), "above_alpha": int((values > alpha).sum())}
        out[group] = per_level
    return out


def arm_summary(evaluation: ArmEvaluation) -> dict:
    """The per-arm block of ``metrics.json``."""
    result = evaluation.result
    gaussian = result["gaussian"]
    calibrated = result["calibrators"]
    std = result["std"]
    summary = {
        "rmse_per_subject": result["rmse_per_subject"],
        "rmse_mean": result["rmse_mean"],
        "mae_mean": result["mae_mean"],
        "psnr_mean": result["psnr_mean"],
        "ssim_mean": result["ssim_mean"],
        "calibration_rms_before": gaussian["calibration"]["rms"],
        "calibration_rms_after": {name: c["calibration"]["rms"] for name, c in calibrated.items() if "calibration" in c},
        "miscalibration_area_before": gaussian["calibration"]["miscalibration_area"],
        "miscalibration_area_after": {
            name: c["calibration"]["miscalibration_area"] for name, c in calibrated.items() if "calibration" in c
        },
        "crps": gaussian["crps"],
        "crps_after": {name: c["crps"] for name, c in calibrated.items() if "crps" in c},
        "nll": gaussian["nll"],
        "nll_left_out_voxels": gaussian["nll_left_out"],
        "nll_after": {name: c["nll"] for name, c in calibrated.items() if "nll" in c},
        "std_mean": std["mean"],
        "std_below_floor_voxels": std["below_floor"],
        "std_floor": std["floor"],
        "brain_voxels": std["voxels"],
        "picp": gaussian["picp"],
        "picp_after": {name: c["picp"] for name, c in calibrated.items()},
        "interval_width": gaussian["width"],
        "ause": result["sparsification"]["ause"],
        "ause_normalized": result["sparsification"]["ause_normalized"],
        "levels": result["levels"],
        "volume_spearman": result["levels"]["volume"]["spearman"],
        "triage": result["triage"],
        "learned_p": evaluation.learned_p,
        # What each fitted calibrator learned of the voxels (its floor; isotonic's clamped fraction, ...).
        "calibrator_fit": evaluation.calibrator_fit,
        "subject_miscoverage": subject_miscoverage(result),
        # What each calibrator's 90 % interval promises (unit voxel or subject, or none), in one sentence each.
        "guarantees": evaluation.guarantees,
    }
    regions = region_summary(result)
    if regions is not None:
        summary["regions"] = regions
    return summary


def calibration_record(subjects: str, subject_ids: list[str], slice_stride: int = 1) -> dict:
    """``metrics.json``'s ``calibration``: which subjects the calibrators were fitted on, how many, which slices.

    Args:
        subjects: ``config.calibration.subjects``: ``"train"`` (the paper: the
            training subjects) or ``"held_out"`` (a separate calibration split).
        subject_ids: The subjects used (``split.json``'s ``calibration`` role).
        slice_stride: ``config.calibration.slice_stride``: one axial slice in this many.
    """
    return {"subjects": subjects, "count": len(subject_ids), "ids": list(subject_ids), "slice_stride": slice_stride}


def metrics_document(
    evaluations: dict[str, ArmEvaluation],
    timing: dict[str, float],
    linear_baseline: dict[str, float],
    input_warnings: dict[str, list[str]] | None = None,
    calibration: dict | None = None,
) -> dict:
    """``metrics.json``: per-arm blocks, the linear-map baseline, paired t-tests (the first two arms', every pair's), timing.

    Args:
        evaluations: Each arm's evaluation.
        timing: Seconds per stage.
        linear_baseline: Subject id -> RMSE of :func:`evaluate_linear_baseline`, in test-set order.
        input_warnings: Subject id -> the warnings its inputs raised
            (:mod:`uqsynth.data.assumptions`), kept so numbers computed on
            suspect inputs say so; ``None``: not known (the key is left out).
        calibration: Which subjects the calibrators were fitted on
            (:func:`calibration_record`); ``None``: not known (the key is left out).
    """
    arms = {name: arm_summary(evaluation) for name, evaluation in evaluations.items()}
    baseline = {
        "rmse_per_subject": linear_baseline,
        "rmse_mean": float(np.mean(list(linear_baseline.values()))) if linear_baseline else None,
        "method": "per-subject least-squares a * source + b fitted to the subject's own target in the brain mask",
    }
    document: dict = {"arms": arms, "baselines": {"linear_map": baseline}, "paired_ttest": None, "timing": timing,
                      "scale": "intensities normalized per slice to [0, 1], errors reported on [0, 255]"}
    if calibration is not None:
        document["calibration"] = dict(calibration)
    if input_warnings is not None:
        document["input_warnings"] = {subject: list(lines) for subject, lines in input_warnings.items()}
    names = list(evaluations)
    if len(names) >= 2 and len(arms[names[0]]["rmse_per_subject"]) >= 2:
        # The paper's comparison is of the first two arms; every other pair too, so a third arm
        # (the main job's concrete_laplace) is compared with each of the paper's.
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        tests = [{"arms": [a, b], **paired_ttest(arms[a]["rmse_per_subject"], arms[b]["rmse_per_subject"])}
                 for a, b in pairs]
        document["paired_ttest"] = tests[0]
        document["paired_ttests"] = tests
    return _finite(document)


def metrics_rows(evaluations: dict[str, ArmEvaluation]) -> list[dict]:
    """``metrics.csv``: one row per arm and subject."""
    rows = []
    for arm, evaluation in evaluations.items():
        for subject_id, numbers in evaluation.result["subjects"].items():
            row = {"arm": arm, "subject": subject_id}
            for key in ("rmse", "mae", "psnr", "ssim", "nrmse", "nstd", "ause", "std_mean", "std_below_floor"):
                row[key] = numbers[key]
            gaussian = numbers["gaussian"]
            row["crps"], row["nll"] = gaussian["crps"], gaussian["nll"]
            row["calibration_rms"] = gaussian["calibration_rms"]
            for level in INTERVAL_LEVELS:
                row[f"picp_{level_key(level)}"] = gaussian["picp"][level_key(level)]
            for name, calibrated in numbers["calibrators"].items():
                if "calibration_rms" in calibrated:
                    row[f"calibration_rms_{name}"] = calibrated["calibration_rms"]
            rows.append(row)
    return rows


def write_metrics(out_dir: Path, document: dict, rows: list[dict]) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` atomically."""
    atomic_write_text(out_dir / "metrics.json", json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_csv(out_dir / "metrics.csv", rows)


def _finite(value):
    """NaN and infinities become ``None`` (JSON has neither)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

