"""Interval coverage (PICP) and width per region: does the uncertainty fail exactly in the lesion?

A cohort's PICP can be right on average and wrong where it matters: a
90 % interval that holds the truth in 91 % of healthy voxels and 40 % of
tumour voxels still covers about 90 % of the brain. Datasets that know
each voxel's region (:attr:`uqsynth.data.base.SubjectVolumes.regions`: the
phantom's tissues, a BraTS segmentation) let :class:`RegionIntervalAccumulator`
count, per region, the voxels, the truths inside the central interval and
the summed interval widths, pooled over subjects like the other streaming
scores (sums, so parts from several processes add up with ``merge``).

Regions are keyed by name, not label: label values differ between
datasets (BraTS 2018's enhancing tumour is 4, 2023's is 3) while a name
means the same thing everywhere. Label 0 means "no region" and is not
counted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from uqsynth.metrics._predictive import IntervalFn, gaussian_interval
from uqsynth.metrics._voxels import level_key, masked_voxels

REGION_LEVELS = (0.9,)
"""Central interval levels reported per region by default (the PICP-90)."""


class RegionIntervalAccumulator:
    """Streaming per-region coverage and mean width of central intervals, pooled over subjects.

    Args:
        interval_fn: ``interval_fn(mean, std, level) -> (lower, upper)``; the
            Gaussian's by default, or a fitted calibrator's ``interval``.
        levels: Interval levels, each in (0, 1).
        scale: Intensity scale of the widths (the paper's 255).

    Attributes:
        voxels_: Region name -> voxels counted.
        subjects_: Region name -> subjects that had voxels in it.
        inside_: Region name -> level -> truths inside the interval.
        width_: Region name -> level -> summed width on ``[0, scale]``.
        labels_: Region name -> its (smallest) label, for a stable order.
    """

    def __init__(
        self, *, interval_fn: IntervalFn | None = None, levels: tuple[float, ...] = REGION_LEVELS, scale: float = 255.0
    ) -> None:
        self.interval_fn = interval_fn
        self.levels = tuple(float(level) for level in levels)
        if not self.levels or any(not 0.0 < level < 1.0 for level in self.levels):
            raise ValueError(f"interval levels must lie in (0, 1), got {levels}")
        self.scale = float(scale)
        self.voxels_: dict[str, int] = {}
        self.subjects_: dict[str, int] = {}
        self.inside_: dict[str, dict[float, int]] = {}
        self.width_: dict[str, dict[float, float]] = {}
        self.labels_: dict[str, int] = {}

    def update(
        self,
        truth: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        labels: np.ndarray,
        names: Mapping[int, str],
        mask: np.ndarray | None = None,
    ) -> RegionIntervalAccumulator:
        """Add one subject's voxels inside ``mask``, counted by their region; return ``self``.

        Args:
            truth, mean, std: Volumes on the normalized scale.
            labels: Integer region labels, same shape (0 = no region).
            names: Label -> region name, for every nonzero label inside the mask.
            mask: Brain mask, or None for all voxels.

        Raises:
            ValueError: Shapes differ, values are not finite, labels are not
                whole numbers, or a label inside the mask has no name.
        """
        labels = np.asarray(labels)
        if labels.shape != np.shape(truth):
            raise ValueError(f"region labels have shape {labels.shape}, expected {np.shape(truth)} like truth")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError("region labels must be whole numbers")
            labels = labels.astype(np.int64)
        truth, mean, std = masked_voxels(mask, truth, mean, std, names=("truth", "mean", "std"))
        labels = labels.ravel() if mask is None else labels[np.asarray(mask, dtype=bool)]
        values, index = np.unique(labels, return_inverse=True)
        unnamed = [int(v) for v in values if v != 0 and int(v) not in names]
        if unnamed:
            raise ValueError(f"region label(s) {unnamed} have no name; names are given for {sorted(names)}")
        counts = np.bincount(index, minlength=values.size)
        interval_fn = self.interval_fn or gaussian_interval
        inside, width = {}, {}
        for level in self.levels:
            lower, upper = interval_fn(mean, std, level)
            lower, upper = np.broadcast_to(lower, truth.shape), np.broadcast_to(upper, truth.shape)
            hit = (lower <= truth) & (truth <= upper)
            inside[level] = np.bincount(index, weights=hit.astype(np.float64), minlength=values.size)
            width[level] = np.bincount(index, weights=(upper - lower).astype(np.float64), minlength=values.size)
        seen: set[str] = set()
        for k, value in enumerate(values):
            if value == 0:
                continue
            name = str(names[int(value)])
            self._add(name, int(value), int(counts[k]), {level: int(round(inside[level][k])) for level in self.levels},
                      {level: float(width[level][k]) * self.scale for level in self.levels})
            seen.add(name)
        for name in seen:
            self.subjects_[name] = self.subjects_.get(name, 0) + 1
        return self

    def _add(self, name: str, label: int, voxels: int, inside: dict, width: dict) -> None:
        self.labels_[name] = min(label, self.labels_.get(name, label))
        self.voxels_[name] = self.voxels_.get(name, 0) + voxels
        inside_sums = self.inside_.setdefault(name, {level: 0 for level in self.levels})
        width_sums = self.width_.setdefault(name, {level: 0.0 for level in self.levels})
        for level in self.levels:
            inside_sums[level] += inside[level]
            width_sums[level] += width[level]

    def merge(self, other: RegionIntervalAccumulator) -> RegionIntervalAccumulator:
        """Add the sums of ``other`` (same levels and scale, e.g. another process's subjects); return ``self``."""
        if not isinstance(other, RegionIntervalAccumulator) or other.levels != self.levels or other.scale != self.scale:
            raise ValueError("cannot merge region accumulators with different levels or scales")
        for name in other.voxels_:
            self._add(name, other.labels_[name], other.voxels_[name], other.inside_[name], other.width_[name])
            self.subjects_[name] = self.subjects_.get(name, 0) + other.subjects_[name]
        return self

    def result(self) -> dict[str, dict]:
        """Region name -> ``{"voxels", "subjects", "picp": {level: fraction}, "width": {level: mean width}}``.

        Ordered by label (then name), so the order does not depend on which
        subject or process saw a region first; levels keyed as ``"0.9"``.
        Empty when no voxel had a region.
        """
        out = {}
        for name in sorted(self.voxels_, key=lambda n: (self.labels_[n], n)):
            n = self.voxels_[name]
            out[name] = {
                "voxels": n,
                "subjects": self.subjects_[name],
                "picp": {level_key(level): self.inside_[name][level] / n for level in self.levels},
                "width": {level_key(level): self.width_[name][level] / n for level in self.levels},
            }
        return out
