"""The evaluate stage on a hand-made run: coverage per region, std components, calibration subjects, the report."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from uqsynth.calibration.io import save_calibrator
from uqsynth.config import Config, PluginSpec
from uqsynth.data.base import Dataset, SubjectVolumes
from uqsynth.data.slices import EvalVolume
from uqsynth.evaluation import (
    arm_summary,
    calibration_record,
    evaluate_arm,
    merge_evaluations,
    metrics_document,
    metrics_rows,
    write_metrics,
)
from uqsynth.plugins import get_host

SHAPE = (18, 20, 12)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
NAMES = {1: "healthy brain", 2: "lesion"}
IDS = ["s0", "s1", "s2", "s3"]


class LabelledDataset(Dataset):
    """Ellipsoid brains whose right-anterior corner is a 'lesion'; ``labels=False`` drops the region labels."""

    def __init__(self, labels: bool = True) -> None:
        self.labels = labels

    def subject_ids(self) -> list[str]:
        return list(IDS)

    def load(self, subject_id: str) -> SubjectVolumes:
        rng = np.random.default_rng(IDS.index(subject_id))
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
        mask = sum(g**2 for g in grid) < 0.9
        source = np.where(mask, rng.uniform(200, 800, SHAPE), 0).astype(np.float32)
        target = np.where(mask, rng.uniform(100, 900, SHAPE), 0).astype(np.float32)
        regions = np.where(mask, 1, 0).astype(np.int16)
        regions[mask & (grid[0] > 0.3) & (grid[1] > 0.2)] = 2
        volumes = SubjectVolumes(subject_id, source, target, mask, AFFINE)
        if self.labels:
            volumes.regions, volumes.region_names = regions, dict(NAMES)
        return volumes


def write_predictions(arm_dir, dataset: Dataset, *, components: bool = False, zero_std: int = 0) -> None:
    """Predictions whose 90 % intervals hold in the healthy brain and miss the lesion (mean 4 std off there)."""
    out = arm_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    for subject_id in IDS:
        volumes = LabelledDataset().load(subject_id)
        evaluation = EvalVolume(volumes, image_size=16)
        truth, mask = evaluation.normalized_target(), evaluation.native_mask()
        rng = np.random.default_rng(100 + IDS.index(subject_id))
        std = np.where(mask, rng.uniform(0.01, 0.03, SHAPE), 0).astype(np.float32)
        mean = truth + std * rng.standard_normal(SHAPE)
        mean[volumes.regions == 2] += 4 * std[volumes.regions == 2]
        std.flat[np.flatnonzero(mask)[:zero_std]] = 0.0
        maps = {"mean": mean, "std": std}
        if components:
            maps["std_epistemic"], maps["std_aleatoric"] = 0.6 * std, 0.8 * std
        for name, volume in maps.items():
            nib.save(nib.Nifti1Image(volume.astype(np.float32), AFFINE), out / f"{subject_id}_{name}.nii.gz")


@pytest.fixture
def config():
    config = Config()
    config.data.image_size = 16
    config.calibration.calibrators = [PluginSpec("sigma_scaling")]
    return config


@pytest.fixture
def run(tmp_path):
    """A run directory with two arms: ``a`` wrote the std components, ``b`` (an older run) did not."""
    dataset = LabelledDataset()
    rng = np.random.default_rng(7)
    std = rng.uniform(0.01, 0.03, 5000)
    mean = rng.uniform(0.2, 0.8, 5000)
    calibrator = get_host()["calibrator"].create("sigma_scaling").fit(mean, std, mean + std * rng.standard_normal(5000))
    for arm, components in (("a", True), ("b", False)):
        write_predictions(tmp_path / arm, dataset, components=components, zero_std=3 if arm == "a" else 0)
        (tmp_path / arm / "calibrators").mkdir()
        save_calibrator(calibrator, tmp_path / arm / "calibrators" / "sigma_scaling.safetensors",
                        name="sigma_scaling", arm=arm)
    return tmp_path


def evaluate(config, run, dataset=None, ids=IDS):
    dataset = dataset or LabelledDataset()
    return {arm: evaluate_arm(config, dataset, ids, run / arm, []) for arm in ("a", "b")}


def test_metrics_json_gives_picp_and_width_per_region_before_and_after_calibration(config, run, tmp_path):
    evaluations = evaluate(config, run)
    document = metrics_document(evaluations, {}, {}, None, calibration_record("held_out", ["c1", "c2"]))
    write_metrics(tmp_path, document, metrics_rows(evaluations))  # strict JSON: nothing infinite or NaN
    written = json.loads((tmp_path / "metrics.json").read_text())
    for arm in ("a", "b"):
        regions = written["arms"][arm]["regions"]
        assert list(regions) == ["healthy brain", "lesion"]
        for numbers in regions.values():
            assert set(numbers) == {"voxels", "subjects", "picp_90", "width_90"}
            assert list(numbers["picp_90"]) == list(numbers["width_90"]) == ["uncalibrated", "sigma_scaling"]
            assert numbers["subjects"] == 4 and numbers["width_90"]["uncalibrated"] > 0
        assert regions["healthy brain"]["picp_90"]["uncalibrated"] == pytest.approx(0.9, abs=0.03)
        assert regions["lesion"]["picp_90"]["uncalibrated"] < 0.15
        assert regions["lesion"]["picp_90"]["sigma_scaling"] < 0.5
        brain = sum(LabelledDataset().load(s).mask.sum() for s in IDS)
        assert regions["healthy brain"]["voxels"] + regions["lesion"]["voxels"] == brain
        assert written["arms"][arm]["brain_voxels"] == brain
    assert written["calibration"] == {"subjects": "held_out", "count": 2, "ids": ["c1", "c2"], "slice_stride": 1}


def test_each_test_subjects_miscoverage_is_the_fraction_of_its_brain_voxels_outside(config, run):
    """What subject-level calibrators promise is about this number, so it must be each subject's own, not pooled."""
    from scipy.stats import norm

    from uqsynth.calibration.io import load_calibrator

    written = arm_summary(evaluate(config, run)["b"])
    _, sigma_scaling = load_calibrator(run / "b" / "calibrators" / "sigma_scaling.safetensors")
    for level in ("0.5", "0.9"):
        for group in ("uncalibrated", "sigma_scaling"):
            numbers = written["subject_miscoverage"][group][level]
            expected = {}
            for subject_id in IDS:
                evaluation = EvalVolume(LabelledDataset().load(subject_id), image_size=16)
                truth, brain = evaluation.normalized_target()[evaluation.native_mask()], evaluation.native_mask()
                mean = nib.load(run / "b" / "predictions" / f"{subject_id}_mean.nii.gz").get_fdata()[brain]
                std = nib.load(run / "b" / "predictions" / f"{subject_id}_std.nii.gz").get_fdata()[brain]
                if group == "uncalibrated":
                    z = norm.ppf(0.5 + float(level) / 2)
                    lower, upper = mean - z * std, mean + z * std
                else:
                    lower, upper = sigma_scaling.interval(mean, std, float(level))
                expected[subject_id] = float(np.mean((truth < lower) | (truth > upper)))
            assert numbers["per_subject"] == pytest.approx(expected, abs=1e-6)
            assert list(numbers["per_subject"]) == IDS  # test order
            assert numbers["alpha"] == pytest.approx(1 - float(level), abs=1e-12)
            assert numbers["mean"] == pytest.approx(np.mean(list(expected.values())))
            assert numbers["max"] == pytest.approx(max(expected.values()))
            assert numbers["above_alpha"] == sum(v > 1 - float(level) for v in expected.values())
    # These predictions miss every lesion voxel: more than alpha of each subject is outside the 90 % interval.
    assert written["subject_miscoverage"]["uncalibrated"]["0.9"]["above_alpha"] == len(IDS)
    assert written["guarantees"]["sigma_scaling"]["unit"] is None


def test_brain_voxels_with_zero_std_are_counted_and_the_nll_stays_finite(config, run):
    arms = metrics_document(evaluate(config, run), {}, {})["arms"]
    assert arms["a"]["std_below_floor_voxels"] == 12 and arms["b"]["std_below_floor_voxels"] == 0  # 3 per subject
    assert arms["a"]["nll_left_out_voxels"] == 12 and arms["b"]["nll_left_out_voxels"] == 0
    assert np.isfinite(arms["a"]["nll"]) and abs(arms["a"]["nll"] - arms["b"]["nll"]) < 0.1
    assert arms["b"]["std_mean"] == pytest.approx(0.02 * 255, rel=0.03)  # std uniform in 0.01-0.03, on [0, 255]
    assert arms["a"]["std_floor"] == 1e-6
    assert "calibration" not in metrics_document(evaluate(config, run), {}, {})


def test_merging_two_processes_parts_equals_one_pass(config, run):
    dataset = LabelledDataset()
    whole = arm_summary(evaluate_arm(config, dataset, IDS, run / "a", []))
    parts = [evaluate_arm(config, dataset, ids, run / "a", []) for ids in (["s1", "s3"], ["s0", "s2"])]
    merged = merge_evaluations([parts[0], None, parts[1]], IDS)
    summary = arm_summary(merged)
    assert list(summary["rmse_per_subject"]) == IDS
    assert list(summary["regions"]) == list(whole["regions"])
    for region, numbers in whole["regions"].items():
        assert summary["regions"][region]["voxels"] == numbers["voxels"]
        assert summary["regions"][region]["picp_90"] == numbers["picp_90"]
        assert summary["regions"][region]["width_90"] == pytest.approx(numbers["width_90"], rel=1e-12)
    assert summary["std_below_floor_voxels"] == whole["std_below_floor_voxels"]
    assert summary["std_mean"] == pytest.approx(whole["std_mean"], rel=1e-12)
    assert set(merged.example) >= {"std_epistemic", "std_aleatoric"}  # the first test subject's, from part 2


def test_a_dataset_without_regions_leaves_the_keys_out(config, run):
    arms = metrics_document(evaluate(config, run, LabelledDataset(labels=False)), {}, {})["arms"]
    assert all("regions" not in arm for arm in arms.values())


def test_example_keeps_the_std_components_where_the_run_wrote_them(config, run):
    evaluations = evaluate(config, run)
    assert np.allclose(evaluations["a"].example["std_epistemic"], 0.6 * evaluations["a"].example["std"])
    assert "std_epistemic" not in evaluations["b"].example and "std_aleatoric" not in evaluations["b"].example


def test_report_shows_regions_components_and_calibration_subjects(config, run, tmp_path, monkeypatch):
    import uqsynth.report
    from uqsynth.report import build_report

    columns = {}
    save = uqsynth.report._save

    def keep(figure, path):
        if path.name.startswith("fig3_"):
            columns[path.name] = sorted({ax.get_title() for ax in figure.axes if ax.get_title()})
        return save(figure, path)

    monkeypatch.setattr(uqsynth.report, "_save", keep)
    evaluations = evaluate(config, run)
    document = metrics_document(evaluations, {}, {}, None, calibration_record("held_out", ["c1", "c2"]))
    page = build_report(tmp_path, evaluations, document).read_text()
    assert "epistemic std" in columns["fig3_examples_a.png"] and "aleatoric std" in columns["fig3_examples_a.png"]
    assert "uncertainty (total std)" in columns["fig3_examples_b.png"]
    assert not any("epistemic" in title for title in columns["fig3_examples_b.png"])
    assert "Coverage by region" in page and "healthy brain" in page and "lesion" in page
    assert "a PICP 90% after sigma_scaling" in page and "b width 90% uncalibrated" in page
    assert "2 held-out calibration subject(s)" in page
    assert "brain voxels with total std &lt; 1e-06" in page
    assert "no region labels" not in page.lower()

    bare = evaluate(config, run, LabelledDataset(labels=False))
    document = metrics_document(bare, {}, {}, None, calibration_record("train", ["t1", "t2", "t3"]))
    page = build_report(tmp_path, bare, document).read_text()
    assert "no region labels" in page.lower() and "the 3 training subject(s), as in the paper" in page


def test_the_calibrated_predictives_nll_is_used_where_it_has_one(monkeypatch):
    """Through ``Calibrator.calibrate`` and ``uqsynth.predictive`` where they exist; none where ``nll`` is missing."""
    import sys
    import types

    from uqsynth.evaluation import _calibrated_nll

    class Gaussian:
        def __init__(self, mean, std):
            self.mean, self.std = np.asarray(mean), np.asarray(std)

        def nll(self, target):
            return 0.5 * np.log(2 * np.pi * self.std**2) + 0.5 * ((target - self.mean) / self.std) ** 2

    class Densityless(Gaussian):
        def nll(self, target):
            raise NotImplementedError("no density")

    class Calibrator:
        def __init__(self, predictive):
            self.predictive = predictive

        def calibrate(self, predictive):
            return self.predictive(predictive.mean, 2 * predictive.std)

    monkeypatch.setitem(sys.modules, "uqsynth.predictive", types.SimpleNamespace(GaussianPredictive=Gaussian))
    nll = _calibrated_nll(Calibrator(Gaussian))
    assert nll(np.zeros(1), np.ones(1), np.zeros(1)) == pytest.approx(0.5 * np.log(2 * np.pi * 4))
    assert _calibrated_nll(Calibrator(Densityless)) is None
    assert _calibrated_nll(object()) is None
