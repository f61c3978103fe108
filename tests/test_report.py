"""The end of `uqsynth run`: calibrators fitted, metrics.json/csv, figures, report.html, `uqsynth report`."""

from __future__ import annotations

import csv
import json
import re

import pytest

from uqsynth.calibration.io import load_calibrator
from uqsynth.cli import main
from uqsynth.data.phantom import REGION_NAMES

FIGURES = {
    "fig2_rmse.png",
    "fig3_examples_mc.png", "fig3_examples_concrete.png",
    "fig4_error_vs_uncertainty_mc.png", "fig4_error_vs_uncertainty_concrete.png",
    "fig5_sparsification.png",
    "fig6_7_calibration_mc.png", "fig6_7_calibration_concrete.png", "fig8_subject_miscoverage.png",
}
ARM_KEYS = {
    "rmse_per_subject", "rmse_mean", "psnr_mean", "ssim_mean", "calibration_rms_before", "calibration_rms_after",
    "miscalibration_area_before", "crps", "nll", "picp", "ause", "volume_spearman", "learned_p",
    "std_mean", "std_below_floor_voxels", "brain_voxels", "nll_left_out_voxels", "regions", "subject_miscoverage",
    "guarantees",
}


def test_metrics_json_has_every_key_the_paper_needs(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"mc", "concrete"}
    assert metrics["calibration"]["subjects"] == "train"
    assert metrics["calibration"]["count"] == len(json.loads((finished / "split.json").read_text())["train"])
    for name, arm in metrics["arms"].items():
        assert ARM_KEYS <= set(arm), name
        assert len(arm["rmse_per_subject"]) == 2
        assert set(arm["calibration_rms_after"]) == {"isotonic", "sigma_scaling", "conformal"}
        assert set(arm["picp"]) == {"0.5", "0.8", "0.9", "0.95"} and all(0 <= v <= 1 for v in arm["picp"].values())
        assert 0 <= arm["calibration_rms_before"] <= 1 and arm["rmse_mean"] > 0
        # The phantom labels every brain voxel with its dominant tissue: coverage per region, before and after.
        assert {"white matter", "grey matter", "CSF"} <= set(arm["regions"]) <= set(REGION_NAMES.values())
        assert sum(r["voxels"] for r in arm["regions"].values()) == arm["brain_voxels"]
        for region in arm["regions"].values():
            assert list(region["picp_90"]) == ["uncalibrated", "isotonic", "sigma_scaling", "conformal"]
            assert all(0 <= v <= 1 for v in region["picp_90"].values()) and region["width_90"]["uncalibrated"] >= 0
        assert arm["nll"] is not None and 0 <= arm["std_below_floor_voxels"] <= arm["brain_voxels"]
    assert len(metrics["arms"]["concrete"]["learned_p"]) == 2 and metrics["arms"]["mc"]["learned_p"] == []
    test = metrics["paired_ttest"]
    assert test["arms"] == ["mc", "concrete"] and test["n"] == 2 and "t" in test and "p" in test
    assert {"train", "sample", "calibrate"} <= set(metrics["timing"])


def test_metrics_json_scores_the_per_subject_linear_map_on_the_same_voxels(finished):
    from uqsynth.baselines import linear_map_prediction, masked_rmse
    from uqsynth.config import load_config
    from uqsynth.data.slices import EvalVolume
    from uqsynth.pipeline import build_dataset
    from uqsynth.plugins import get_host

    metrics = json.loads((finished / "metrics.json").read_text())
    baseline = metrics["baselines"]["linear_map"]
    assert list(baseline["rmse_per_subject"]) == list(metrics["arms"]["mc"]["rmse_per_subject"])
    host = get_host()
    config = load_config(finished / "config.toml", host=host)
    dataset = build_dataset(config, host)
    for subject_id, reported in baseline["rmse_per_subject"].items():
        volume = EvalVolume(dataset.load(subject_id), image_size=config.data.image_size)
        source, truth, mask = volume.normalized_source(), volume.normalized_target(), volume.native_mask()
        assert reported == pytest.approx(masked_rmse(linear_map_prediction(source, truth, mask), truth, mask))
    assert baseline["rmse_mean"] == pytest.approx(sum(baseline["rmse_per_subject"].values()) / 2)
    assert "linear map (baseline)" in (finished / "report.html").read_text()


def test_metrics_csv_has_a_row_per_arm_and_subject(finished):
    with open(finished / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["arm"] for r in rows} == {"mc", "concrete"}
    assert all(float(r["rmse"]) > 0 for r in rows)


def test_calibrators_are_saved_per_arm_and_bound_to_it(finished):
    name, calibrator = load_calibrator(finished / "mc" / "calibrators" / "isotonic.safetensors", arm="mc")
    assert name == "isotonic" and calibrator.n_ > 0
    with pytest.raises(Exception, match="fitted for arm 'mc', not 'concrete'"):
        load_calibrator(finished / "mc" / "calibrators" / "isotonic.safetensors", arm="concrete")


def test_report_is_one_offline_page_with_every_figure(finished):
    assert FIGURES <= {p.name for p in finished.glob("*.png")}
    page = (finished / "report.html").read_text()
    assert page.count("<figure><img") == len(FIGURES)
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert page.count("data:image/jpeg;base64,") == 2  # the slice viewer's two subjects
    assert not re.search(r"(src|href)=['\"]https?://", page)  # nothing fetched when opened
    assert "paired t-test" in page and "calibration RMS before" in page
    assert "Coverage by region" in page and "mc PICP 90% after isotonic" in page and "white matter" in page
    assert "brain voxels with total std &lt; 1e-06" in page
    assert "Calibrators were fitted on the 3 training subject(s)" in page
    # Each test subject's miscoverage, per interval, against alpha; conformal's promise is about a voxel.
    assert "Coverage per subject" in page and "subjects above alpha" in page
    # Triage: both test volumes ranked by nSTD beside their true error's rank, the top quarter flagged.
    metrics = json.loads((finished / "metrics.json").read_text())
    first = metrics["arms"]["mc"]["triage"]["ranking"][0]
    assert "Triage: volumes ranked by uncertainty" in page and "flags the 1 most uncertain" in page
    assert f"<td>1</td><td>{first['id']}</td>" in page
    assert re.search(r"<td>mc</td><td>conformal</td><td>voxel</td>", page)


def test_report_command_rebuilds_identical_metrics_without_sampling(finished, capsys):
    before = json.loads((finished / "metrics.json").read_text())
    for path in [*finished.glob("*.png"), finished / "report.html", finished / "metrics.json"]:
        path.unlink()
    assert main(["report", str(finished)]) == 0
    after = json.loads((finished / "metrics.json").read_text())
    before.pop("timing"), after.pop("timing")
    assert after == before
    assert FIGURES <= {p.name for p in finished.glob("*.png")} and (finished / "report.html").exists()
    assert "sampled" not in capsys.readouterr().err


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a run directory (no config.toml)"


def test_figure_titles_do_not_overlap_the_panel_titles(finished, monkeypatch):
    """Fig. 3 and 4 carry a figure title above panels with titles of their own: nothing drawn over another."""
    import uqsynth.report

    drawn = {}
    save = uqsynth.report._save

    def keep(figure, path):
        if figure.get_suptitle():
            figure.canvas.draw()
            drawn[path.name] = (figure._suptitle.get_window_extent(),
                                [ax.title.get_window_extent() for ax in figure.axes if ax.get_title()])
        return save(figure, path)

    monkeypatch.setattr(uqsynth.report, "_save", keep)
    assert main(["report", str(finished)]) == 0
    titled = {name: boxes for name, boxes in drawn.items() if name.startswith(("fig3_", "fig4_"))}
    assert len(titled) == 4
    for name, (title, panels) in titled.items():
        assert panels and not any(title.overlaps(panel) for panel in panels), name


def test_the_report_says_which_subjects_and_slices_the_calibrators_saw():
    from uqsynth.evaluation import calibration_record
    from uqsynth.report import calibration_text

    held_out = calibration_record("held_out", ["a", "b", "c"], slice_stride=2)
    assert held_out["slice_stride"] == 2 and held_out["count"] == 3
    assert calibration_text({"calibration": held_out}) == (
        'Calibrators were fitted on 3 held-out calibration subject(s), a split apart from training and test '
        '(calibration.subjects = "held_out"), one axial slice in 2.'
    )
    assert calibration_text({"calibration": calibration_record("train", ["a"])}).endswith('= "train").')
