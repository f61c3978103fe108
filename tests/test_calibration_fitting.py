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
