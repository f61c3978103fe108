"""All metrics of one test subject, and the cohort-level curves, in one streaming pass.

:func:`evaluate_subject` turns one subject's volumes (truth, predictive mean
and std, brain mask) into a JSON-ready dict of its numbers.
:class:`CohortEvaluator` calls it subject by subject and keeps only what the
cohort needs (those dicts, a plotting subsample of voxels, and the
accumulators of the calibration curves, scores and sparsification), so the
report can read the saved per-subject NIfTI volumes one at a time.

Uncalibrated predictions are scored as the paper's Gaussian N(mean, std^2);
each calibrator is given by its quantile and/or interval function (a
fitted :class:`~uqsynth.calibration.base.Calibrator`'s bound ``quantile``
and ``interval``), and optionally a per-voxel NLL function, keyed by a name.

Subjects with region labels (:mod:`uqsynth.metrics.regions`) also get the
coverage and width of the central 90 % interval per region, uncalibrated
and after each calibrator, pooled over the cohort.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from uqsynth.metrics._predictive import IntervalFn, QuantileFn
from uqsynth.metrics._voxels import masked_voxels
from uqsynth.metrics.accuracy import mae, psnr, rmse, ssim
from uqsynth.metrics.calibration import DEFAULT_LEVELS, CalibrationCurveAccumulator
from uqsynth.metrics.compare import triage
from uqsynth.metrics.levels import correlation, nrmse, nstd, slice_level, voxel_pairs
from uqsynth.metrics.regions import REGION_LEVELS, RegionIntervalAccumulator
from uqsynth.metrics.scores import (
    STD_FLOOR,
    DEFAULT_INTERVAL_LEVELS,
    CRPSAccumulator,
    IntervalAccumulator,
    NLLAccumulator,
)
from uqsynth.metrics.sparsification import SparsificationAccumulator, sparsification_curve


def _interval_from_quantiles(quantile_fn: QuantileFn) -> IntervalFn:
    """Central interval from a quantile function (what ``Calibrator.interval`` does by default)."""

    def interval(mean, std, level):
        tail = (1.0 - level) / 2.0
        return quantile_fn(mean, std, tail), quantile_fn(mean, std, 1.0 - tail)

    return interval


class _Settings:
    """Options shared by :func:`evaluate_subject` and :class:`CohortEvaluator`, validated once."""

    def __init__(self, *, interval_fns, quantile_fns, interval_levels, calibration_levels, scale, std_floor,
                 nll_fns=None, region_levels=REGION_LEVELS):
        self.interval_fns: dict[str, IntervalFn] = dict(interval_fns or {})
        self.quantile_fns: dict[str, QuantileFn] = dict(quantile_fns or {})
        self.nll_fns = dict(nll_fns or {})
        self.region_levels = tuple(float(level) for level in region_levels)
        self.interval_levels = tuple(float(level) for level in interval_levels)
        self.calibration_levels = np.asarray(calibration_levels, dtype=np.float64)
        self.scale = float(scale)
        if not std_floor > 0:
            raise ValueError(f"std_floor must be positive, got {std_floor}")
        self.std_floor = float(std_floor)
        self.names = list(self.quantile_fns) + [n for n in self.interval_fns if n not in self.quantile_fns]
        extra = sorted(set(self.nll_fns) - set(self.names))
        if extra:
            raise ValueError(f"nll_fns names {extra} have no quantile or interval function")

    def key(self) -> tuple:
        """What must match for two evaluators' sums to add up (the calibrators by name)."""
        return (tuple(self.names), self.interval_levels, tuple(self.calibration_levels.tolist()), self.scale,
                self.std_floor, tuple(sorted(self.nll_fns)), self.region_levels)

    def interval_fn(self, name: str) -> IntervalFn:
        """A calibrator's interval function (its own, or central intervals from its quantiles)."""
        return self.interval_fns.get(name) or _interval_from_quantiles(self.quantile_fns[name])

    def region_accumulators(self) -> dict[str, RegionIntervalAccumulator]:
        """Fresh per-region accumulators: ``"gaussian"`` and one per calibrator name."""
        groups = {"gaussian": RegionIntervalAccumulator(levels=self.region_levels, scale=self.scale)}
        for name in self.names:
            groups[name] = RegionIntervalAccumulator(
                interval_fn=self.interval_fn(name), levels=self.region_levels, scale=self.scale
            )
        return groups

    def accumulators(self) -> dict[str, dict[str, object]]:
        """Fresh accumulators: ``"gaussian"`` and one group per calibrator name."""
        groups = {
            "gaussian": {
                "calibration": CalibrationCurveAccumulator(levels=self.calibration_levels),
                "crps": CRPSAccumulator(std_floor=self.std_floor, scale=self.scale),
                "nll": NLLAccumulator(std_floor=self.std_floor, scale=self.scale),
                "intervals": IntervalAccumulator(levels=self.interval_levels, scale=self.scale),
            }
        }
        for name in self.names:
            group = {}
            quantile_fn = self.quantile_fns.get(name)
            if quantile_fn is not None:
                group["calibration"] = CalibrationCurveAccumulator(levels=self.calibration_levels, quantile_fn=quantile_fn)
                group["crps"] = CRPSAccumulator(quantile_fn=quantile_fn, scale=self.scale)
            if name in self.nll_fns:
                group["nll"] = NLLAccumulator(std_floor=self.std_floor, scale=self.scale, nll_fn=self.nll_fns[name])
            group["intervals"] = IntervalAccumulator(
                interval_fn=self.interval_fn(name), levels=self.interval_levels, scale=self.scale
            )
            groups[name] = group
        return groups


def _summary(group: Mapping[str, object], *, curve: bool) -> dict:
    """JSON numbers of one accumulator group; ``curve`` keeps the whole calibration curve."""
    out: dict = {}
    if "crps" in group:
        out["crps"] = group["crps"].result()["crps"]
    if "nll" in group:
        nll = group["nll"].result()
        out["nll"], out["nll_left_out"] = nll["nll"], nll["n_left_out"]
    intervals = group["intervals"].result()
    out["picp"], out["width"] = intervals["picp"], intervals["width"]
    if "calibration" in group:
        calibration = group["calibration"].result()
        if curve:
            out["calibration"] = calibration
        else:
            out["calibration_rms"] = calibration["rms"]
            out["miscalibration_area"] = calibration["miscalibration_area"]
    return out


def _region_summary(groups: Mapping[str, RegionIntervalAccumulator], names: list[str]) -> dict | None:
    """Region name -> voxels, subjects, and ``gaussian`` / ``calibrators`` PICP and width; None without regions."""
    gaussian = groups["gaussian"].result()
    if not gaussian:
        return None
    calibrated = {name: groups[name].result() for name in names}
    return {
        region: {
            "voxels": numbers["voxels"],
            "subjects": numbers["subjects"],
            "gaussian": {"picp": numbers["picp"], "width": numbers["width"]},
            "calibrators": {
                name: {"picp": calibrated[name][region]["picp"], "width": calibrated[name][region]["width"]}
                for name in names
            },
        }
        for region, numbers in gaussian.items()
    }


def _evaluate(
    truth, mean, std, mask, *, axis: int, settings: _Settings, regions=None, region_names=None
) -> tuple[dict, dict, dict | None]:
    """Per-subject numbers and the filled accumulators (for the cohort): scores, and per region (or None)."""
    t, m, s = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
    if (s < 0).any():
        raise ValueError("std holds negative values inside the mask")
    scale = settings.scale
    sparsity = sparsification_curve(t, m, s, scale=scale)
    result = {
        "n_voxels": int(t.size),
        "rmse": rmse(t, m, scale=scale),
        "mae": mae(t, m, scale=scale),
        "psnr": psnr(t, m),
        "ssim": ssim(truth, mean, mask, axis=axis),
        "nrmse": nrmse(t, m),
        "nstd": nstd(s, scale=scale),
        "std_mean": float(np.mean(s)) * scale,
        "std_below_floor": int(np.count_nonzero(s < settings.std_floor)),
        "slices": slice_level(truth, mean, std, mask, axis=axis, scale=scale),
        "voxel_correlation": correlation(np.abs(m - t), s),
        "ause": sparsity["ause"],
        "ause_normalized": sparsity["ause_normalized"],
    }
    # Calibrators see the raw std: they fit a floor of their own, so a voxel every MC sample
    # agreed on gets their width. The uncalibrated Gaussian's scores see std >= std_floor (a
    # point mass has no distribution to score), but for its NLL, which leaves such voxels out and counts them.
    s_floored = np.maximum(s, settings.std_floor)
    groups = settings.accumulators()
    for name, group in groups.items():
        for key, accumulator in group.items():
            raw = name != "gaussian" or key == "nll"
            accumulator.update(t, m, s if raw else s_floored)
    result["gaussian"] = _summary(groups["gaussian"], curve=False)
    result["calibrators"] = {name: _summary(groups[name], curve=False) for name in settings.names}
    region_groups = None
    if regions is not None:
        labels = np.asarray(regions)
        if labels.shape != np.shape(truth):
            raise ValueError(f"regions has shape {labels.shape}, expected {np.shape(truth)} like truth")
        labels = labels[np.asarray(mask, dtype=bool)]
        region_groups = settings.region_accumulators()
        for name, accumulator in region_groups.items():
            accumulator.update(t, m, s_floored if name == "gaussian" else s, labels, dict(region_names or {}))
        result["regions"] = _region_summary(region_groups, settings.names)
    return result, groups, region_groups


def evaluate_subject(
    truth: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mask: np.ndarray,
    *,
    axis: int,
    interval_fns: Mapping[str, IntervalFn] | None = None,
    quantile_fns: Mapping[str, QuantileFn] | None = None,
    interval_levels: tuple[float, ...] = DEFAULT_INTERVAL_LEVELS,
    calibration_levels: np.ndarray = DEFAULT_LEVELS,
    scale: float = 255.0,
    std_floor: float = STD_FLOOR,
    nll_fns: Mapping[str, object] | None = None,
    regions: np.ndarray | None = None,
    region_names: Mapping[int, str] | None = None,
    region_levels: tuple[float, ...] = REGION_LEVELS,
) -> dict:
    """Every per-subject metric, as a JSON-ready dict.

    Args:
        truth: True volume, normalized to [0, 1].
        mean: Predictive mean (the synthesized image), same shape.
        std: Predictive std (the uncertainty), same shape, >= 0.
        mask: Boolean brain mask, same shape; every metric is computed inside it.
        axis: Slice axis (axial).
        interval_fns: Calibrator name -> ``interval(mean, std, level)``.
        quantile_fns: Calibrator name -> ``quantile(mean, std, q)``. A name
            given only here gets central intervals from its quantiles.
        interval_levels: Levels of PICP and width.
        calibration_levels: Grid of the calibration curve.
        scale: Intensity scale of reported errors, stds, CRPS and widths (the paper's 255).
        std_floor: Floor on std (normalized scale) for the probabilistic
            scores; the Gaussian NLL leaves voxels below it out instead.
        nll_fns: Calibrator name -> ``nll(mean, std, truth)``, the per-voxel NLL
            (normalized scale) of its calibrated predictive, where it has a density.
        regions: Integer region labels, same shape (0 = no region), or None.
        region_names: Label -> region name for every nonzero label inside the mask.
        region_levels: Levels of the per-region PICP and width.

    Returns:
        A dict with ``n_voxels``, ``rmse``, ``mae`` (both on [0, scale]),
        ``psnr`` (dB), ``ssim``, ``nrmse``, ``nstd``, ``std_mean`` (mean std
        on [0, scale]), ``std_below_floor`` (voxels with std < ``std_floor``),
        ``slices`` (``index``,
        ``nrmse``, ``nstd`` lists), ``voxel_correlation`` (``pearson``,
        ``pearson_p``, ``spearman``, ``spearman_p``, ``n``: |error| vs std
        over all brain voxels), ``ause`` and ``ause_normalized`` (exact
        sparsification), ``gaussian`` (``crps``, ``nll`` and ``nll_left_out``
        (the point-mass voxels it leaves out), ``picp`` and ``width`` keyed
        by level as ``"0.9"``, ``calibration_rms``, ``miscalibration_area``),
        ``calibrators`` (name -> the same; ``nll`` only for names in
        ``nll_fns``, ``crps`` and the calibration keys only for names with a
        quantile function) and, with ``regions``, ``regions`` (name ->
        ``voxels``, ``subjects``, ``gaussian`` and ``calibrators`` with
        ``picp`` and ``width`` at ``region_levels``; None if no brain voxel
        has a region).
    """
    settings = _Settings(
        interval_fns=interval_fns,
        quantile_fns=quantile_fns,
        interval_levels=interval_levels,
        calibration_levels=calibration_levels,
        scale=scale,
        std_floor=std_floor,
        nll_fns=nll_fns,
        region_levels=region_levels,
    )
    return _evaluate(
        truth, mean, std, mask, axis=axis, settings=settings, regions=regions, region_names=region_names
    )[0]


class CohortEvaluator:
    """Per-subject metrics plus the cohort-level curves, fed one subject at a time.

    Memory holds one subject's volumes at a time plus bounded summaries:
    calibration counts per grid point, score sums, the sparsification
    histograms, the per-region interval sums, and a subsample of
    (|error|, std) pairs per subject for the voxel-level scatter plot.

    Args:
        axis: Slice axis of the volumes.
        interval_fns, quantile_fns, interval_levels, calibration_levels, scale, std_floor, nll_fns, region_levels:
            As in :func:`evaluate_subject`.
        sparsification_bins, key_range: Histogram of :class:`SparsificationAccumulator`.
        voxel_points: Size of the per-subject (|error|, std) subsample kept for plots.
        seed: Seed of that subsample.

    Attributes:
        subjects_: Subject id -> :func:`evaluate_subject` dict, in order added.
        voxel_pairs_: Subject id -> ``(abs_error, std)`` arrays on [0, scale].
        accumulators_: ``"gaussian"`` and calibrator name -> accumulators.
        regions_: ``"gaussian"`` and calibrator name -> :class:`RegionIntervalAccumulator`
            (empty until a subject with region labels is added).
        sparsification_: The cohort :class:`SparsificationAccumulator`.
    """

    def __init__(
        self,
        *,
        axis: int,
        interval_fns: Mapping[str, IntervalFn] | None = None,
        quantile_fns: Mapping[str, QuantileFn] | None = None,
        interval_levels: tuple[float, ...] = DEFAULT_INTERVAL_LEVELS,
        calibration_levels: np.ndarray = DEFAULT_LEVELS,
        scale: float = 255.0,
        std_floor: float = STD_FLOOR,
        nll_fns: Mapping[str, object] | None = None,
        region_levels: tuple[float, ...] = REGION_LEVELS,
        sparsification_bins: int = 4096,
        key_range: tuple[float, float] = (1e-6, 1.0),
        voxel_points: int = 20000,
        seed: int = 0,
    ) -> None:
        self.axis = axis
        self._settings = _Settings(
            interval_fns=interval_fns,
            quantile_fns=quantile_fns,
            interval_levels=interval_levels,
            calibration_levels=calibration_levels,
            scale=scale,
            std_floor=std_floor,
            nll_fns=nll_fns,
            region_levels=region_levels,
        )
        self.voxel_points = voxel_points
        self.seed = seed
        self.subjects_: dict[str, dict] = {}
        self.voxel_pairs_: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.accumulators_ = self._settings.accumulators()
        self.regions_ = self._settings.region_accumulators()
        self.sparsification_ = SparsificationAccumulator(bins=sparsification_bins, key_range=key_range, scale=scale)

    def add(
        self,
        subject_id: str,
        truth: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        mask: np.ndarray,
        *,
        regions: np.ndarray | None = None,
        region_names: Mapping[int, str] | None = None,
    ) -> dict:
        """Evaluate one subject, fold it into the cohort, and return its dict.

        ``regions`` and ``region_names`` (as in :func:`evaluate_subject`) add
        the subject's voxels to the per-region sums; a cohort may mix
        subjects with and without them.

        Raises:
            ValueError: The id was added before, or the inputs are invalid.
        """
        subject_id = str(subject_id)
        if subject_id in self.subjects_:
            raise ValueError(f"subject {subject_id!r} was added already")
        result, groups, region_groups = _evaluate(
            truth, mean, std, mask, axis=self.axis, settings=self._settings, regions=regions, region_names=region_names
        )
        for name, group in groups.items():
            for key, accumulator in group.items():
                self.accumulators_[name][key].merge(accumulator)
        for name, accumulator in (region_groups or {}).items():
            self.regions_[name].merge(accumulator)
        self.sparsification_.update(truth, mean, std, mask)
        self.voxel_pairs_[subject_id] = voxel_pairs(
            truth, mean, std, mask, max_points=self.voxel_points, seed=self.seed, scale=self._settings.scale
        )
        self.subjects_[subject_id] = result
        return result

    def merge(self, other: CohortEvaluator, order: Sequence[str] | None = None) -> CohortEvaluator:
        """Fold in ``other``'s subjects (same settings, other subjects), e.g. one shard per process; return ``self``.

        Per-subject results are kept as they are and the cohort summaries
        add up, so the result is that of one evaluator fed every subject, up
        to the order of floating-point sums. ``order`` lists the subject ids
        in the order the cohort should report them (default: ``self``'s, then ``other``'s).

        Raises:
            ValueError: The slice axes or the settings differ, a subject is in
                both, or ``order`` does not list exactly the merged subjects.
        """
        if other.axis != self.axis or other._settings.key() != self._settings.key():
            raise ValueError("cannot merge evaluators built with different slice axes or settings")
        shared = sorted(set(self.subjects_) & set(other.subjects_))
        if shared:
            raise ValueError(f"cannot merge evaluators that both hold subject(s) {shared}")
        for name, group in other.accumulators_.items():
            for key, accumulator in group.items():
                self.accumulators_[name][key].merge(accumulator)
        for name, accumulator in other.regions_.items():
            self.regions_[name].merge(accumulator)
        self.sparsification_.merge(other.sparsification_)
        subjects = {**self.subjects_, **other.subjects_}
        pairs = {**self.voxel_pairs_, **other.voxel_pairs_}
        ids = list(subjects) if order is None else [str(i) for i in order]
        if sorted(ids) != sorted(subjects):
            raise ValueError(f"order lists {sorted(ids)}, but the merged subjects are {sorted(subjects)}")
        self.subjects_ = {i: subjects[i] for i in ids}
        self.voxel_pairs_ = {i: pairs[i] for i in ids}
        return self

    def result(self) -> dict:
        """Cohort numbers and curves, JSON-ready.

        Returns:
            A dict with ``n_subjects``; ``subjects`` (id -> per-subject
            dict); ``rmse_per_subject`` (id -> RMSE); the means over
            subjects ``rmse_mean``, ``mae_mean``, ``psnr_mean``,
            ``ssim_mean``, ``nrmse_mean``, ``nstd_mean``; ``levels`` with
            ``voxel`` (``pearson``, ``spearman``: means of the per-subject
            correlations), ``slice`` (correlation over all slices of all
            subjects) and ``volume`` (over subjects); ``triage`` (see
            :func:`~uqsynth.metrics.compare.triage`; None with fewer than 2
            subjects); ``gaussian`` and ``calibrators`` (name -> ...) with
            ``crps``, ``picp``, ``width`` (``nll`` for the Gaussian only)
            pooled over all test voxels and ``calibration`` (the pooled
            curve: ``expected``, ``observed``, ``rms``,
            ``miscalibration_area``, ``n``); and ``sparsification``
            (pooled curves over all test voxels, binned: ``recall``,
            ``rmse``, ``rmse_oracle``, ``ause``, ``ause_normalized``, ``n``);
            ``std`` (``mean``: the mean std over all brain voxels on [0, scale],
            ``below_floor``: brain voxels with std below ``std_floor``,
            ``voxels``, ``floor``); and ``regions`` (region name -> ``voxels``,
            ``subjects``, ``gaussian`` and ``calibrators`` with ``picp`` and
            ``width`` at the region levels, pooled over the subjects that have
            region labels; None when none has).
        """
        if not self.subjects_:
            raise ValueError("no subjects added yet; call add first")
        subjects = self.subjects_
        ids = list(subjects)

        def mean_of(key: str) -> float:
            return float(np.mean([subjects[i][key] for i in ids]))

        slice_nrmse = [v for i in ids for v in subjects[i]["slices"]["nrmse"]]
        slice_nstd = [v for i in ids for v in subjects[i]["slices"]["nstd"]]
        slice_rmse = [v for i in ids for v in subjects[i]["slices"]["rmse"]]
        volume_nrmse = {i: subjects[i]["nrmse"] for i in ids}
        volume_nstd = {i: subjects[i]["nstd"] for i in ids}
        voxels = sum(subjects[i]["n_voxels"] for i in ids)
        return {
            "n_subjects": len(ids),
            "subjects": subjects,
            "rmse_per_subject": {i: subjects[i]["rmse"] for i in ids},
            **{f"{key}_mean": mean_of(key) for key in ("rmse", "mae", "psnr", "ssim", "nrmse", "nstd")},
            "levels": {
                "voxel": {
                    "pearson": float(np.mean([subjects[i]["voxel_correlation"]["pearson"] for i in ids])),
                    "spearman": float(np.mean([subjects[i]["voxel_correlation"]["spearman"] for i in ids])),
                    "n_subjects": len(ids),
                },
                "slice": correlation(slice_nrmse, slice_nstd),
                "volume": correlation(list(volume_nrmse.values()), list(volume_nstd.values())),
                # The paper's nRMSE is relative (error / truth norm), its nSTD absolute: a slice of
                # bright tissue has more std and a smaller relative error. The same correlations of
                # the absolute RMSE with nSTD (both on [0, 255]) say whether the std tracks the error.
                "slice_absolute": correlation(slice_rmse, slice_nstd),
                "volume_absolute": correlation([subjects[i]["rmse"] for i in ids], list(volume_nstd.values())),
            },
            "triage": triage(volume_nstd, volume_nrmse) if len(ids) >= 2 else None,
            "gaussian": _summary(self.accumulators_["gaussian"], curve=True),
            "calibrators": {name: _summary(self.accumulators_[name], curve=True) for name in self._settings.names},
            "sparsification": self.sparsification_.result(),
            "std": {
                "mean": sum(subjects[i]["std_mean"] * subjects[i]["n_voxels"] for i in ids) / voxels,
                "below_floor": sum(subjects[i]["std_below_floor"] for i in ids),
                "voxels": voxels,
                "floor": self._settings.std_floor,
            },
            "regions": _region_summary(self.regions_, self._settings.names),
        }
