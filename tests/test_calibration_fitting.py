"""Fitting calibrators on a stream of subjects (uqsynth.calibration.fitting): exact, and subject-aware on request."""

from __future__ import annotations

import numpy as np
import pytest

from uqsynth.calibration.base import Calibrator
from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.fitting import SubjectVoxels, fit_calibrators, takes_subjects
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling


def subjects(count: int = 3, voxels: int = 500) -> list[SubjectVoxels]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        std = rng.uniform(0.01, 0.1, voxels)
        std[:5] = 0.0  # round-off stds: fitted with the rest
        mean = rng.uniform(0, 1, voxels)
        out.append(SubjectVoxels(f"s{index}", mean, std, mean + (1 + index) * 0.05 * rng.standard_normal(voxels)))
    return out


class PerSubjectMean(Calibrator):
    """A calibrator whose unit is the subject: it records which subjects it saw and their voxel counts."""

    def fit(self, mean, std, target, subject=None):
        ids, counts = np.unique(np.asarray(subject, dtype=str), return_counts=True)
        self.seen_ = dict(zip(ids.tolist(), counts.tolist()))
        return self

    def cdf(self, mean, std, values):
        return np.full(np.shape(values), 0.5)

    def quantile(self, mean, std, q):
        return np.asarray(mean, dtype=float) + 0 * np.asarray(q)


class VoxelsOnly(Calibrator):
    """A third party's calibrator that knows nothing of subjects: called as before."""

    def fit(self, mean, std, target):
        self.n_ = np.asarray(np.size(mean))
        return self

    def cdf(self, mean, std, values):
        return np.full(np.shape(values), 0.5)

    def quantile(self, mean, std, q):
        return np.asarray(mean, dtype=float) + 0 * np.asarray(q)


def test_streamed_fit_over_subjects_equals_one_fit_on_all_voxels():
    batches = subjects()
    pooled = [np.concatenate([getattr(b, f) for b in batches]) for f in ("mean", "std", "truth")]
    for factory in (IsotonicCalibrator, SigmaScaling, ConformalCalibrator):
        streamed = {"c": factory()}
        assert fit_calibrators(streamed, iter(batches)) == sum(b.mean.size for b in batches)
        whole = factory().fit(*pooled)
        for name, value in whole.summary().items():
            np.testing.assert_array_equal(streamed["c"].summary()[name], value, err_msg=f"{factory.__name__}.{name}")


def test_subject_ids_reach_calibrators_that_ask_and_only_those():
    batches = subjects()
    calibrators = {"per_subject": PerSubjectMean(), "voxels": VoxelsOnly()}
    fit_calibrators(calibrators, batches)
    assert calibrators["per_subject"].seen_ == {"s0": 500, "s1": 500, "s2": 500}
    assert int(calibrators["voxels"].n_) == 1500
    assert takes_subjects(PerSubjectMean().fit) and not takes_subjects(VoxelsOnly().fit)
    assert not takes_subjects(IsotonicCalibrator().partial_fit)


def test_no_voxels_is_an_error_naming_the_calibrator():
    with pytest.raises(ValueError, match="voxels: no calibration voxels"):
        fit_calibrators({"voxels": VoxelsOnly()}, [])


class PerRegionCount(PerSubjectMean):
    """A Mondrian-style plugin: it asks for region labels too (0 where a subject has none)."""

    def fit(self, mean, std, target, subject=None, regions=None):
        self.labels_ = dict(zip(*(v.tolist() for v in np.unique(np.asarray(regions), return_counts=True))))
        return super().fit(mean, std, target, subject=subject)


def test_region_labels_reach_calibrators_that_ask_for_them():
    from uqsynth.calibration.risk import ConformalRiskControl

    batches = subjects(count=12)
    labelled = [SubjectVoxels(b.subject, b.mean, b.std, b.truth, None if i == 0 else (np.arange(500) % 3))
                for i, b in enumerate(batches)]
    calibrators = {"gathered": PerRegionCount(), "mondrian": ConformalRiskControl(regions=2), "voxels": VoxelsOnly()}
    fit_calibrators(calibrators, labelled)
    # The subject without labels counts as region 0 (none) in a gathered fit.
    assert calibrators["gathered"].labels_ == {0: 500 + 11 * 167, 1: 11 * 167, 2: 11 * 166}
    # Streamed per subject: region 1 and 2 were seen in the 11 labelled subjects, the brain in all 12.
    mondrian = calibrators["mondrian"]
    assert int(mondrian.n_subjects_) == 12 and mondrian.region_subjects_.tolist() == [11, 11]
    mean, std, truth = (np.concatenate([getattr(b, f) for b in labelled]) for f in ("mean", "std", "truth"))
    ids = np.repeat([b.subject for b in labelled], 500)
    labels = np.concatenate([np.zeros(500, dtype=int), *[b.regions for b in labelled[1:]]])
    whole = ConformalRiskControl(regions=2).fit(mean, std, truth, subject=ids, regions=labels)
    for name, value in whole.summary().items():
        np.testing.assert_array_equal(mondrian.summary()[name], value, err_msg=name)
