"""`uqsynth predict` and the run's sampling stage: NIfTI maps in the input's own grid."""

from __future__ import annotations

import contextlib
import nibabel as nib
import numpy as np
import pytest
from test_training import TINY

from uqsynth.cli import main
from uqsynth.data.phantom import write_subjects
from uqsynth.inference import map_file_names


#: The tiny run with a third arm whose generator also predicts a per-voxel Laplace scale.
TINY_WITH_LAPLACE = TINY + """
[arms.laplace]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
likelihood = "laplace"
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = root / "tiny.toml"
    config.write_text(TINY_WITH_LAPLACE)
    assert main(["run", str(config), "--out", str(root / "run")]) == 0
    phantoms = {}
    for orientation in ("RAS", "LPS"):
        (subject,) = write_subjects(root / orientation, 1, seed=7, shape=(40, 44, 32), orientation=orientation)
        phantoms[orientation] = next(subject.glob("*-t1n.nii.gz"))
    return root, phantoms


def outputs(directory):
    return sorted(p.name for p in directory.glob("*")) if directory.exists() else []


def test_run_stores_mean_and_the_three_std_volumes_of_every_test_subject(trained):
    root, _ = trained
    run = root / "run"
    for arm in ("mc", "concrete", "laplace"):
        files = outputs(run / arm / "predictions")
        (subject,) = {f.split("_", 1)[0] for f in files}
        maps = [f"{subject}_{name}.nii.gz" for name in ("mean", "std", "std_aleatoric", "std_epistemic")]
        assert files == [*maps, f"{subject}_uncertainty.json"]


@pytest.fixture(scope="module")
def predicted(trained):
    """`uqsynth predict` on the phantom written in RAS and in LPS orientation."""
    root, phantoms = trained
    for orientation, t1 in phantoms.items():
        assert main(["predict", "--model", str(root / "run" / "concrete"), "--input", str(t1),
                     "--out", str(root / f"out-{orientation}"), "--samples", "8"]) == 0
    assert main(["predict", "--model", str(root / "run" / "laplace"), "--input", str(phantoms["LPS"]),
                 "--out", str(root / "out-laplace"), "--samples", "8"]) == 0
    return root, phantoms


def test_predict_uses_the_arms_calibrator_and_says_which(trained, tmp_path, capsys):
    root, phantoms = trained
    args = ["predict", "--model", str(root / "run" / "mc"), "--input", str(phantoms["RAS"]), "--samples", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "interval at level 0.95: calibrated by isotonic" in err and "slice-samples/s" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--calibrator", "conformal"]) == 0
    assert "calibrated by conformal" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--calibrator", "platt"]) == 2
    assert "has no fitted calibrator 'platt' (fitted: isotonic, sigma_scaling, conformal)" in capsys.readouterr().err
    with calibrators_moved_away(root / "run" / "mc"):
        assert main([*args, "--out", str(tmp_path / "d")]) == 0
        assert "interval at level 0.95: Gaussian (no fitted calibrator)" in capsys.readouterr().err


@contextlib.contextmanager
def calibrators_moved_away(arm):
    """The arm as if no calibrator had been fitted, for the duration (the module's other tests need them back)."""
    calibrators, away = arm / "calibrators", arm.parent / f"{arm.name}-calibrators-away"
    calibrators.rename(away)
    try:
        yield
    finally:
        away.rename(calibrators)


def sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_certificate_beside_the_maps_says_which_model_which_calibrator_and_what_it_promises(trained, tmp_path):
    import json

    from uqsynth.data.nifti import load_source
    from uqsynth.data.slices import EvalVolume

    root, phantoms = trained
    arm = root / "run" / "mc"
    args = ["predict", "--model", str(arm), "--input", str(phantoms["RAS"]), "--samples", "3", "--level", "0.9"]
    assert main([*args, "--out", str(tmp_path / "a"), "--calibrator", "conformal"]) == 0
    reference = tmp_path / "reference_t2w.nii.gz"
    image = nib.load(phantoms["RAS"])
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 3.0, image.affine), reference)
    assert main([*args, "--out", str(tmp_path / "b"), "--calibrator", "conformal", "--rescale-like", str(reference)]) == 0
    stem = "phantom-000"  # the volume's id: its BraTS-named file's subject, not its contrast
    names = map_file_names(stem, 0.9, "t2")
    document = json.loads((tmp_path / "a" / f"{stem}_uncertainty.json").read_text())
    assert document["volume"] == stem and document["uqsynth_version"]
    assert document["model"] == {"arm": "mc", "generator_sha256": sha256(arm / "generator.safetensors"),
                                 "likelihood": "l1", "samples": 3, "seed": 3}
    (entry,) = document["intervals"]
    assert entry["calibrator"] == "conformal" and entry["level"] == 0.9 and entry["alpha"] == 0.1
    assert entry["calibrator_sha256"] == sha256(arm / "calibrators" / "conformal.safetensors")
    assert entry["unit"] == "voxel" and "says nothing about one subject" in entry["statement"]
    assert set(entry["params"]) == {"bins", "low", "high"} and entry["infinite_voxels"] == 0
    # Its numbers are those of the maps beside it, on the [0, 255] scale of the normalized intensities.
    brain = EvalVolume(load_source(phantoms["RAS"], subject_id=stem), image_size=32).native_mask()
    maps = {name: nib.load(tmp_path / "a" / names[name]).get_fdata()[brain] for name in MAPS}
    assert entry["mean_width"] == pytest.approx(np.mean(maps["upper"] - maps["lower"]) * 255, rel=1e-5)
    assert document["summary"]["brain_voxels"] == int(brain.sum())
    assert document["summary"]["nstd"] == pytest.approx(np.sqrt(np.mean(maps["std"] ** 2)) * 255, rel=1e-5)
    assert document["maps"] == names and names["upper"] == "phantom-000_desc-upper90_T2w.nii.gz"
    # Rescaled maps, same certificate numbers: two scanners' volumes rank alike.
    rescaled = json.loads((tmp_path / "b" / f"{stem}_uncertainty.json").read_text())
    assert nib.load(tmp_path / "b" / names["std"]).get_fdata().max() > 2 * maps["std"].max()
    assert rescaled["summary"] == document["summary"] and rescaled["intervals"] == document["intervals"]


def test_an_uncalibrated_interval_says_it_promises_nothing(trained, tmp_path):
    import json

    root, phantoms = trained
    with calibrators_moved_away(root / "run" / "concrete"):
        assert main(["predict", "--model", str(root / "run" / "concrete"), "--input", str(phantoms["LPS"]),
                     "--samples", "3", "--out", str(tmp_path)]) == 0
    (certificate,) = tmp_path.glob("*_uncertainty.json")
    (entry,) = json.loads(certificate.read_text())["intervals"]
    assert entry["calibrator"] is None and entry["unit"] is None and entry["statement"].startswith("no guarantee")
    assert entry["level"] == 0.95 and entry["mean_width"] > 0


def test_the_run_writes_a_certificate_per_test_subject_and_arm_for_every_fitted_calibrator(trained):
    import csv
    import json

    root, _ = trained
    run = root / "run"
    with open(run / "metrics.csv", newline="") as handle:
        rows = {(r["arm"], r["subject"]): r for r in csv.DictReader(handle)}
    for arm in ("mc", "concrete", "laplace"):
        (path,) = (run / arm / "predictions").glob("*_uncertainty.json")
        document = json.loads(path.read_text())
        assert document["model"]["generator_sha256"] == sha256(run / arm / "generator.safetensors")
        assert [e["calibrator"] for e in document["intervals"]] == ["isotonic", "sigma_scaling", "conformal"]
        for entry in document["intervals"]:
            assert entry["calibrator_sha256"] == sha256(run / arm / "calibrators" / f"{entry['calibrator']}.safetensors")
            assert entry["level"] == 0.9 and entry["mean_width"] > 0
        assert document["region_names"]["3"] == "white matter"  # the phantom's labels, which Mondrian promises name
        # The run's volume summary is the evaluation's: the same nSTD (what triage ranks by) and mean std.
        row = rows[(arm, document["volume"])]
        assert document["summary"]["nstd"] == pytest.approx(float(row["nstd"]), rel=1e-9)
        assert document["summary"]["std_mean"] == pytest.approx(float(row["std_mean"]), rel=1e-6)


MAPS = ("mean", "std", "std_epistemic", "std_aleatoric", "lower", "upper")


@pytest.mark.parametrize(("orientation", "arm"), [("RAS", "concrete"), ("LPS", "concrete"), ("LPS", "laplace")])
def test_predict_writes_six_maps_in_the_inputs_own_grid(predicted, orientation, arm):
    root, phantoms = predicted
    t1 = phantoms[orientation]
    out = root / (f"out-{orientation}" if arm == "concrete" else f"out-{arm}")
    reference = nib.load(t1)
    names = map_file_names("phantom-000", 0.95, "t2")
    assert outputs(out) == sorted([*names.values(), "phantom-000_uncertainty.json", "uncertainty_summary.csv"])
    maps = {name: nib.load(out / names[name]) for name in MAPS}
    brain = np.asanyarray(reference.dataobj) != 0
    for image in maps.values():
        assert image.shape == reference.shape
        assert np.allclose(image.affine, reference.affine)
        assert nib.aff2axcodes(image.affine) == tuple(orientation)
        assert image.get_data_dtype() == np.float32
    std = maps["std"].get_fdata()
    assert np.all(std[brain] > 0) and np.all(std[~brain] == 0)
    mean, lower, upper = (maps[n].get_fdata() for n in ("mean", "lower", "upper"))
    assert np.all(lower[brain] < upper[brain])  # calibrated: need not be centred on the mean
    assert np.all(mean[~brain] == 0)
    # The total is the two parts' sum of variances; only a heteroscedastic likelihood has an aleatoric part.
    epistemic, aleatoric = maps["std_epistemic"].get_fdata(), maps["std_aleatoric"].get_fdata()
    np.testing.assert_allclose(std**2, epistemic**2 + aleatoric**2, rtol=1e-5, atol=1e-12)
    if arm == "laplace":
        assert np.all(aleatoric[brain] > 0)
    else:
        assert np.all(aleatoric == 0) and np.array_equal(std, epistemic)


def test_ras_and_lps_inputs_give_the_same_world_space_prediction(predicted):
    root, phantoms = predicted
    images = {}
    for orientation in ("RAS", "LPS"):
        mean = map_file_names("phantom-000", 0.95, "t2")["mean"]
        images[orientation] = nib.as_closest_canonical(nib.load(root / f"out-{orientation}" / mean))
    assert np.allclose(images["RAS"].affine, images["LPS"].affine)
    # Same seed, same slices in the same canonical order: the same numbers, flipped back.
    assert np.allclose(images["RAS"].get_fdata(), images["LPS"].get_fdata(), atol=1e-5)


def bad_inputs(tmp_path, phantom):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    reference = nib.load(phantom)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), flat)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), four)
    nan = tmp_path / "nan.nii.gz"
    data = np.asanyarray(reference.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, reference.affine), nan)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(phantom.read_bytes()[:400])
    return {
        "not a NIfTI file": tmp_path / "plain.txt",
        "cannot read": text,
        "2D": flat,
        "4D": four,
        "NaN": nan,
        "truncated": truncated,
    }


@pytest.mark.parametrize("case", ["not a NIfTI file", "cannot read", "2D", "4D", "NaN", "truncated"])
def test_bad_input_is_one_error_line_and_writes_nothing(trained, tmp_path, case, capsys):
    root, phantoms = trained
    (tmp_path / "plain.txt").write_text("x")
    bad = bad_inputs(tmp_path, phantoms["RAS"])[case]
    out = tmp_path / "out"
    # The good input comes first: nothing may be written for it either.
    status = main(["predict", "--model", str(root / "run" / "concrete"), "--input", str(phantoms["RAS"]),
                   "--input", str(bad), "--out", str(out), "--samples", "4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad.name in lines[0]
    assert outputs(out) == []


def test_a_model_directory_without_weights_is_refused(trained, tmp_path, capsys):
    root, phantoms = trained
    empty = root / "run" / "untrained"
    empty.mkdir(exist_ok=True)
    status = main(["predict", "--model", str(empty), "--input", str(phantoms["RAS"]), "--out", str(tmp_path / "o")])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --model {empty}: no generator.safetensors (has this arm finished training?)"
    )
    assert not (tmp_path / "o").exists()


def test_samples_below_two_are_refused(trained, tmp_path, capsys):
    root, phantoms = trained
    status = main(["predict", "--model", str(root / "run" / "concrete"), "--input", str(phantoms["RAS"]),
                   "--out", str(tmp_path / "o"), "--samples", "1"])
    assert status == 2 and "--samples must be at least 2" in capsys.readouterr().err


def test_predict_on_a_smoke_run_of_the_shipped_configuration(tmp_path, capsys):
    """The saved config.toml is resolved: reloading it must not re-apply the phantom fallback profile."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml"
    run = tmp_path / "smoke"
    assert main(["run", str(shipped), "--smoke", "--out", str(run), "--set", "train.epochs=1"]) == 0
    (subject,) = write_subjects(tmp_path / "P", 1, seed=3, shape=(40, 44, 32))
    t1 = next(subject.glob("*-t1n.nii.gz"))
    assert main(["predict", "--model", str(run / "concrete_dropout"), "--input", str(t1),
                 "--out", str(tmp_path / "O"), "--samples", "3"]) == 0
    assert len(list((tmp_path / "O").glob("*.nii.gz"))) == 6  # mean, std, std_epistemic, std_aleatoric, lower, upper


@pytest.fixture(scope="module")
def collections(trained, tmp_path_factory):
    """One phantom T1w copied into every layout users keep scans in (the model reads T1w)."""
    root, phantoms = trained
    t1 = phantoms["RAS"].read_bytes()
    base = tmp_path_factory.mktemp("inputs")
    for relative in ("flat/a_T1w.nii.gz", "flat/b_T1w.nii.gz", "flat/a_T2w.nii.gz",
                     "bids/sub-01/anat/sub-01_T1w.nii.gz", "bids/sub-01/anat/sub-01_T2w.nii.gz",
                     "bids/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                     "bids/sub-02/ses-1/anat/sub-02_ses-1_ce-gd_T1w.nii.gz",
                     "plain/scan1.nii.gz", "plain/scan2.nii"):
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".nii"):
            nib.save(nib.load(phantoms["RAS"]), path)
        else:
            path.write_bytes(t1)
    (base / "bids" / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    write_subjects(base / "brats", 2, seed=8, shape=(40, 44, 32))
    return root, base


@pytest.mark.parametrize(("given", "expected"), [
    ("flat", ["a", "b"]),                                   # the T2w beside them is left out
    ("plain", ["scan1", "scan2"]),                          # names without a contrast: every NIfTI file
    ("flat/*_T1w.nii.gz", ["a", "b"]),                      # a glob
    ("bids", ["sub-01", "sub-02_ses-1"]),                   # sub-*/[ses-*/]anat/*_T1w, not the ce- T1w
    ("brats", ["phantom-000", "phantom-001"]),              # BraTS subject folders
])
def test_predict_finds_every_volume_in_the_layouts_users_keep(collections, given, expected, tmp_path, capsys):
    root, base = collections
    assert main(["predict", "--model", str(root / "run" / "mc"), "--input", str(base / given), "--out", str(tmp_path),
                 "--samples", "2"]) == 0
    err = capsys.readouterr().err
    assert f"{len(expected)} volume(s)" in err
    assert sorted(p.name[: -len("_uncertainty.json")] for p in tmp_path.glob("*_uncertainty.json")) == expected


def test_layout_bids_writes_a_derivatives_tree_that_names_every_map(collections, tmp_path):
    import json

    root, base = collections
    assert main(["predict", "--model", str(root / "run" / "mc"), "--input", str(base / "bids"), "--out", str(tmp_path),
                 "--samples", "2", "--level", "0.9", "--layout", "bids"]) == 0
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "uqsynth"
    for folder, stem in (("sub-01/anat", "sub-01"), ("sub-02/ses-1/anat", "sub-02_ses-1")):
        written = sorted(p.name for p in (tmp_path / folder).iterdir())
        labels = ["lower90", "mean", "std", "stdAleatoric", "stdEpistemic", "upper90"]
        assert written == sorted([*(f"{stem}_desc-{label}_T2w.nii.gz" for label in labels), f"{stem}_uncertainty.json"])
        certificate = json.loads((tmp_path / folder / f"{stem}_uncertainty.json").read_text())
        assert set(certificate["maps"].values()) == {f"{stem}_desc-{label}_T2w.nii.gz" for label in labels}


def test_predict_writes_a_per_volume_summary_ranked_by_uncertainty(collections, tmp_path, capsys):
    """Triage of new patients with no ground truth: the most uncertain volume first, with its certificate."""
    import csv
    import json

    root, base = collections
    assert main(["predict", "--model", str(root / "run" / "mc"), "--input", str(base / "bids"), "--input",
                 str(base / "flat"), "--out", str(tmp_path), "--samples", "2", "--level", "0.9"]) == 0
    err = capsys.readouterr().err
    with open(tmp_path / "uncertainty_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    assert sorted(row["id"] for row in rows) == ["a", "b", "sub-01", "sub-02_ses-1"]
    nstd = [float(row["nstd"]) for row in rows]
    assert nstd == sorted(nstd, reverse=True)
    for row in rows:
        certificate = json.loads((tmp_path / row["certificate"]).read_text())
        assert float(row["nstd"]) == pytest.approx(certificate["summary"]["nstd"])
        assert float(row["mean_width"]) == pytest.approx(certificate["intervals"][0]["mean_width"])
        assert row["calibrator"] == "isotonic" and row["level"] == "0.9"
        assert f"{row['id']}: " in err and f"nSTD {float(row['nstd']):.2f}" in err
