"""Evaluation metrics of the paper (Figs. 2-7) and of uncertainty tools in general.

Inputs are per-subject volumes on the normalized [0, 1] intensity scale
(truth, predictive mean, predictive std) and a boolean brain mask; every
metric is computed inside the mask, and numbers in intensity units are
reported on [0, 255] (``scale=255``) as in the paper. Functions that need a
predictive distribution take quantile / interval functions with the
signatures of :class:`uqsynth.calibration.base.Calibrator` (the Gaussian's
by default), so a fitted calibrator plugs in as ``calibrator.quantile``.

Modules, one concept each: :mod:`.accuracy` (RMSE, MAE, PSNR, SSIM),
:mod:`.levels` (error vs uncertainty per voxel, slice, volume),
:mod:`.calibration` (calibration curve, RMS, miscalibration area),
:mod:`.scores` (CRPS, NLL, PICP and width), :mod:`.regions` (PICP and
width per region label), :mod:`.sparsification`
(sparsification curve, oracle, AUSE), :mod:`.compare` (paired t-test,
triage) and :mod:`.evaluate` (everything for a subject and a cohort).
"""

from uqsynth.metrics._predictive import gaussian_interval, gaussian_quantile
from uqsynth.metrics.accuracy import mae, psnr, rmse, ssim
from uqsynth.metrics.calibration import (
    DEFAULT_LEVELS,
    CalibrationCurveAccumulator,
    calibration_curve,
    calibration_rms,
    miscalibration_area,
)
from uqsynth.metrics.compare import paired_ttest, triage
from uqsynth.metrics.evaluate import CohortEvaluator, evaluate_subject
from uqsynth.metrics.levels import correlation, nrmse, nstd, slice_level, voxel_pairs
from uqsynth.metrics.regions import REGION_LEVELS, RegionIntervalAccumulator
from uqsynth.metrics.scores import (
    STD_FLOOR,
    CRPSAccumulator,
    IntervalAccumulator,
    NLLAccumulator,
    crps_from_quantiles,
    crps_gaussian,
    crps_levels,
    gaussian_nll,
    interval_scores,
)
from uqsynth.metrics.sparsification import SparsificationAccumulator, ause, sparsification_curve

__all__ = [
    "DEFAULT_LEVELS",
    "REGION_LEVELS",
    "STD_FLOOR",
    "CRPSAccumulator",
    "CalibrationCurveAccumulator",
    "CohortEvaluator",
    "IntervalAccumulator",
    "NLLAccumulator",
    "RegionIntervalAccumulator",
    "SparsificationAccumulator",
    "ause",
    "calibration_curve",
    "calibration_rms",
    "correlation",
    "crps_from_quantiles",
    "crps_gaussian",
    "crps_levels",
    "evaluate_subject",
    "gaussian_interval",
    "gaussian_nll",
    "gaussian_quantile",
    "interval_scores",
    "mae",
    "miscalibration_area",
    "nrmse",
    "nstd",
    "paired_ttest",
    "psnr",
    "rmse",
    "slice_level",
    "sparsification_curve",
    "ssim",
    "triage",
    "voxel_pairs",
]
