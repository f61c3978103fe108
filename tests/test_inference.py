"""The library as a notebook calls it: uqsynth.load(...).predict(...), the README's example as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_training import TINY

import uqsynth
from uqsynth.cli import main
from uqsynth.data.phantom import write_subjects
from uqsynth.errors import ConfigError, DataError

README = Path(__file__).resolve().parents[1] / "README.md"

#: The tiny run, with the README's arm name and two calibrators.
TINY_README = TINY.replace("[arms.mc]", """[calibration]
calibrators = ["conformal", "isotonic"]

[arms.concrete_laplace]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
likelihood = "laplace"

[arms.mc]""")


def readme_example() -> str:
    """The Python block after the README's notebook-example marker."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- notebook-example:.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no notebook example"
    return match.group(1)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """A folder laid out as the README's example expects: runs/bcgan_t1t2/<arms> and sub-01_T1w.nii.gz."""
    root = tmp_path_factory.mktemp("notebook")
    (root / "tiny.toml").write_text(TINY_README)
    assert main(["run", str(root / "tiny.toml"), "--out", str(root / "runs" / "bcgan_t1t2")]) == 0
    (subject,) = write_subjects(root / "phantom", 1, seed=7, shape=(40, 44, 32))
    t1 = next(subject.glob("*-t1n.nii.gz"))
    (root / "sub-01_T1w.nii.gz").write_bytes(t1.read_bytes())
    return root


def test_the_readmes_notebook_example_runs_and_matches_uqsynth_predict(notebook, capsys, monkeypatch):
    monkeypatch.chdir(notebook)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Posterior('sub-01'" in printed and "a voxel drawn at random" in printed  # conformal's promise
    assert main(["predict", "--model", "runs/bcgan_t1t2/concrete_laplace", "--input", "sub-01_T1w.nii.gz",
                 "--out", "cli", "--level", "0.9"]) == 0
    library, command = sorted(os.listdir("maps")), sorted(os.listdir("cli"))
    assert command == sorted([*library, "uncertainty_summary.csv"]) and len(library) == 7  # the CLI adds its triage
    for name in library:
        if name.endswith(".nii.gz"):
            a, b = (np.asanyarray(nib.load(Path(d) / name).dataobj) for d in ("maps", "cli"))
            assert np.array_equal(a, b), name  # same seed, same id: the same numbers bit for bit
        else:
            assert (Path("maps") / name).read_text() == (Path("cli") / name).read_text()
    single = nib.load("sub-01_std.nii.gz")
    assert np.array_equal(np.asanyarray(single.dataobj), np.asanyarray(nib.load("cli/sub-01_desc-std_T2w.nii.gz").dataobj))


def test_predict_takes_a_path_a_nibabel_image_or_an_array_with_its_affine(notebook):
    model = uqsynth.load(notebook / "runs" / "bcgan_t1t2" / "concrete_laplace")
    path = notebook / "sub-01_T1w.nii.gz"
    image = nib.load(path)
    from_path = model.predict(path, samples=3)
    from_image = model.predict(image, samples=3)
    from_array = model.predict(np.asanyarray(image.dataobj), image.affine, samples=3, subject_id="sub-01")
    for other in (from_image, from_array):
        assert np.array_equal(other.mean, from_path.mean) and np.array_equal(other.std, from_path.std)
    # The parts add up to the total; the interval is the arm's first fitted calibrator's, and holds the mean.
    assert np.allclose(from_path.std**2, from_path.std_epistemic**2 + from_path.std_aleatoric**2, rtol=1e-4, atol=1e-9)
    assert from_path.calibrator == "conformal" and model.calibrators() == ["conformal", "isotonic"]
    lower, upper = from_path.interval(0.9)
    brain = from_path.mask
    assert (lower[brain] <= from_path.mean[brain]).all() and (from_path.mean[brain] <= upper[brain]).all()
    gaussian = model.predict(path, samples=3, calibrator=None)
    assert gaussian.calibrator is None and not np.array_equal(gaussian.interval(0.9)[1], upper)
    assert from_path.to_nifti("upper", level=0.9).shape == image.shape


def test_library_errors_are_one_line_and_name_paths_not_flags(notebook, tmp_path):
    arm = notebook / "runs" / "bcgan_t1t2" / "concrete_laplace"
    with pytest.raises(ConfigError, match=rf"^model {re.escape(str(tmp_path / 'nowhere'))}: no such directory"):
        uqsynth.load(tmp_path / "nowhere")
    model = uqsynth.load(arm)
    with pytest.raises(DataError, match=r"missing.nii.gz: no such file"):
        model.predict(tmp_path / "missing.nii.gz")
    with pytest.raises(ConfigError, match="needs its affine"):
        model.predict(np.ones((8, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="the array has shape"):
        model.predict(np.ones((8, 8), dtype=np.float32), np.eye(4))
    with pytest.raises(ConfigError, match=r"^calibrator platt: .* has no fitted calibrator 'platt'"):
        model.predict(notebook / "sub-01_T1w.nii.gz", calibrator="platt")
    with pytest.raises(ConfigError) as refused:
        uqsynth.load(tmp_path)
    assert "--" not in str(refused.value) and "\n" not in str(refused.value)
