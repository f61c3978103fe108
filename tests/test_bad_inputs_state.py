"""Files the user owns, and state that no longer matches its inputs (issue 15, classes 2 and 5).

uqsynth never removes or replaces a file it did not create (it keeps a
record of what a run wrote: :mod:`uqsynth._files`), and never reuses state
that no longer matches its inputs (``split.json`` records each subject's role
and a digest of its content; an arm's predictions and calibrators are bound to
the generator that made them: :mod:`uqsynth.run_directory`). Each case is
refused with one ``error:`` line, before anything is written, and leaves the
user's files as they were. The catalogue rows are in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_bad_inputs import assert_named, refused, write_config
from test_data_nifti import brain, make_brats, path_of, write

from uqsynth.cli import main


def run(config: Path, out: Path, *extra: str) -> int:
    return main(["run", str(config), "--out", str(out), "--device", "cpu", *extra])


def brats_run(tmp_path: Path, ids: tuple[str, ...] = ("S01", "S02")) -> tuple[Path, Path, Path]:
    """A finished tiny run on a BraTS root of ``ids``: (data root, configuration, run directory)."""
    root = make_brats(tmp_path / "brats", ids=ids)
    config = write_config(tmp_path / "c.toml", data={
        "source": "brats", "root": str(root), "image_size": 32, "test_fraction": 0.5,
    })
    out = tmp_path / "run"
    assert run(config, out) == 0
    return root, config, out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` with its bytes but the run lock (rewritten by every run by design)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished run of the tiny phantom configuration (arm mc); tests that change it work on a copy."""
    base = tmp_path_factory.mktemp("state")
    out = base / "run"
    assert run(write_config(base / "c.toml"), out) == 0
    return out


# ------------------------------------------------------------ class 2: files the user owns


@pytest.mark.parametrize("user_file", [".x.tmp", "notes/.draft.tmp"])
def test_an_out_that_is_a_data_folder_is_refused_and_keeps_every_file(user_file, tmp_path, capsys):
    """The issue's example: --out at a folder of the user's (data, notes): nothing there is uqsynth's to remove."""
    out = make_brats(tmp_path / "data")
    (out / user_file).parent.mkdir(exist_ok=True)
    (out / user_file).write_text("my draft\n")
    before = snapshot(out)
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(out), "--device", "cpu")
    assert_named(line, f"--out {out} holds files that no uqsynth run recorded", "choose another --out")
    assert snapshot(out) == before


def test_a_temporary_looking_file_of_the_user_in_a_run_directory_survives_the_rerun(tiny_run, tmp_path, capsys):
    """A rerun cleans up only the temporaries its own killed writes left, which its record lists."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    mine = out / "mc" / ".mine.tmp"
    mine.write_text("not uqsynth's\n")
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(out), "--device", "cpu")
    assert_named(line, f"--out {out}: mc/.mine.tmp was not written by uqsynth, but this run writes there "
                       "(arm mc's folder)")
    assert mine.read_text() == "not uqsynth's\n"


def test_force_keeps_a_users_folder_named_like_an_arm(tiny_run, tmp_path, capsys):
    """--force replaces the run, never a folder of the user's that happens to bear an arm's name."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    notes = out / "concrete" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("my notes\n")
    arms = {"mc": {"stochastic_layer": {"name": "mc_dropout", "p": 0.5}, "positions": [2, 3]},
            "concrete": {"stochastic_layer": {"name": "concrete_dropout"}, "positions": [2, 3]}}
    config = write_config(tmp_path / "c.toml", arms=arms)
    before = snapshot(out)
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu", "--force")
    assert_named(line, "concrete/notes.txt was not written by uqsynth", "(arm concrete's folder)")
    assert snapshot(out) == before


def test_force_removes_only_what_the_run_wrote(tiny_run, tmp_path, capsys):
    """A user's folder named like a run file or figure (not in the record) stays; the old run's files go."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    mine = out / "fig1_mine.png"
    mine.write_bytes(b"my figure")
    stale = out / "mc" / "predictions" / "old_std.nii.gz"  # no run wrote it, but it looks like one's
    stale.write_bytes(b"kept")
    assert run(write_config(tmp_path / "c.toml"), out, "--set", "run.seed=3", "--force") == 2
    assert "mc/predictions/old_std.nii.gz was not written by uqsynth" in capsys.readouterr().err
    stale.unlink()
    assert run(write_config(tmp_path / "c.toml"), out, "--set", "run.seed=3", "--force") == 0
    assert mine.read_bytes() == b"my figure"
    assert "seed = 3" in (out / "config.toml").read_text()


def test_force_never_removes_through_a_folder_the_user_linked_in(tiny_run, tmp_path, capsys):
    """An arm folder of the old run replaced by a link to the user's data: --force removes nothing through it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    data = tmp_path / "userdata"
    shutil.copytree(out / "mc", data)  # the user's own files, under the very names the run had written
    shutil.rmtree(out / "mc")
    (out / "mc").symlink_to(data, target_is_directory=True)
    before = snapshot(data)
    arms = {"other": {"stochastic_layer": {"name": "mc_dropout", "p": 0.5}, "positions": [2, 3]}}
    assert run(write_config(tmp_path / "c.toml", arms=arms), out, "--force") == 0, capsys.readouterr().err
    assert snapshot(data) == before and (out / "mc").is_symlink()


def test_files_a_file_manager_drops_do_not_block_a_run(tiny_run, tmp_path):
    """A .DS_Store in a predictions folder (macOS Finder) or in a new --out is nobody's data."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "mc" / "predictions" / ".DS_Store").write_bytes(b"finder")
    assert run(write_config(tmp_path / "c.toml"), out) == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"finder")
    assert run(write_config(tmp_path / "c.toml"), fresh) == 0


def predict(model: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["predict", "--model", str(model), *(a for i in inputs for a in ("--input", str(i))), "--out", str(out),
            "--device", "cpu", *extra]


def test_predict_never_writes_over_one_of_its_inputs(tiny_run, tmp_path, capsys):
    """The issue's example: a's std map would replace the input a_desc-std_T2w.nii.gz in the same folder."""
    d = tmp_path / "d"
    a, a_std = write(d / "a.nii.gz", brain()), write(d / "a_desc-std_T2w.nii.gz", brain(1))
    before = snapshot(d)
    line = refused(capsys, *predict(tiny_run / "mc", d, a, a_std))
    assert_named(line, f"--out {d}: the output {d / 'a_desc-std_T2w.nii.gz'} would replace the input {a_std} (--input)")
    assert snapshot(d) == before


@pytest.mark.parametrize("route", ["symlink", "dotdot"])
def test_predict_sees_an_input_through_links_and_dotdot(route, tiny_run, tmp_path, capsys):
    d = tmp_path / "d"
    b, b_mean = write(d / "b.nii.gz", brain()), write(d / "b_desc-mean_T2w.nii.gz", brain(1))
    if route == "symlink":
        (tmp_path / "link").symlink_to(d)
        inputs, out = (b, tmp_path / "link" / "b_desc-mean_T2w.nii.gz"), d
    else:
        (d / "sub").mkdir()
        inputs, out = (b, b_mean), d / "sub" / ".."
    before = snapshot(d)
    line = refused(capsys, *predict(tiny_run / "mc", out, *inputs))
    assert_named(line, f"the output {out / 'b_desc-mean_T2w.nii.gz'} would replace the input", "(--input)")
    assert snapshot(d) == before


def test_predict_never_writes_over_the_rescale_reference(tiny_run, tmp_path, capsys):
    d = tmp_path / "d"
    t1, reference = write(d / "x.nii.gz", brain()), write(d / "x_desc-upper95_T2w.nii.gz", brain(2))
    before = snapshot(d)
    line = refused(capsys, *predict(tiny_run / "mc", d, t1, extra=("--rescale-like", str(reference))))
    assert_named(line, f"the output {d / 'x_desc-upper95_T2w.nii.gz'} would replace the input {reference} "
                       "(--rescale-like)")
    assert snapshot(d) == before


def test_predict_never_writes_over_the_models_own_files(tiny_run, tmp_path, capsys):
    """--out inside the model: an input named like a test subject would replace the run's certificate of it."""
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    predictions = run_copy / "mc" / "predictions"
    subject = sorted(predictions.glob("*_mean.nii.gz"))[0].name.removesuffix("_mean.nii.gz")
    t1 = write(tmp_path / "in" / f"{subject}.nii.gz", brain())
    before = snapshot(run_copy)
    line = refused(capsys, *predict(run_copy / "mc", predictions, t1))
    assert_named(line, f"would replace the input {predictions / (subject + '_uncertainty.json')} (--model)")
    assert snapshot(run_copy) == before


# ------------------------------------------------------------ class 5: state that no longer matches


def test_a_subject_added_to_the_data_is_refused_before_it_leaks(tmp_path, capsys):
    """The issue's example: S00 is added; the split would move the training subject S02 into the test set."""
    root, config, out = brats_run(tmp_path)
    capsys.readouterr()
    make_brats(root, ids=("S00",))
    before = snapshot(out)
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(line, f"--out {out}: the run there was trained on other data: subject S00 is new",
                 "the split would move S02 from train to test", "pass --force to retrain it from scratch")
    assert snapshot(out) == before


def test_force_retrains_on_the_new_data(tmp_path, capsys):
    root, config, out = brats_run(tmp_path)
    capsys.readouterr()
    make_brats(root, ids=("S00",))
    assert run(config, out, "--force") == 0
    assert "--force: replaced the run" in capsys.readouterr().err
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == ["S01"] and split["test"] == ["S00", "S02"] and sorted(split["sha256"]) == [
        "S00", "S01", "S02"]


@pytest.mark.parametrize("change", ["content", "removed"])
def test_a_subject_changed_or_removed_is_refused(change, tmp_path, capsys):
    root, config, out = brats_run(tmp_path, ids=("S01", "S02", "S03"))
    capsys.readouterr()
    if change == "content":
        write(path_of(root, "S03", "t2"), brain(seed=99))
        expected = "subject S03 changed content"
    else:
        shutil.rmtree(root / "S03")
        expected = "subject S03 is gone"
    before = snapshot(out)
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(line, "the run there was trained on other data", expected, "--force")
    assert snapshot(out) == before


def test_report_refuses_a_test_subject_whose_content_changed(tmp_path, capsys):
    """Its predictions were made from the old volume: scoring them against the new one would be wrong."""
    root, _, out = brats_run(tmp_path)
    capsys.readouterr()
    test_subject = json.loads((out / "split.json").read_text())["test"][0]
    write(path_of(root, test_subject, "t2"), brain(seed=99))
    before = snapshot(out)
    line = refused(capsys, "report", str(out))
    assert_named(line, f"{out}: the run there was trained on other data: subject {test_subject} changed content",
                 "`uqsynth run` with --force retrains it")
    assert snapshot(out) == before


def test_an_edited_split_json_is_refused_by_run_and_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    path = out / "split.json"
    split = json.loads(path.read_text())
    split["train"], split["test"] = split["test"], split["train"]
    path.write_text(json.dumps(split))
    moved = split["test"][0]
    before = snapshot(out)
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(out), "--device", "cpu")
    assert_named(line, "the run's split.json was edited", f"split.json puts {moved} in test, the data and "
                       "configuration in train", "--force")
    assert_named(refused(capsys, "report", str(out)), "the run's split.json was edited")
    assert snapshot(out) == before


def test_a_missing_split_json_beside_trained_weights_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "split.json").unlink()
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(out), "--device", "cpu")
    assert_named(line, "holds trained state", "but no split.json saying which subjects it was trained on")
    assert not (out / "split.json").exists()


def test_predictions_of_other_weights_are_refused(tiny_run, tmp_path, capsys):
    """Another generator is put in place (with its checksum): the predictions beside it are not its own."""
    out, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(tiny_run, out)
    config = write_config(tmp_path / "c.toml")
    assert run(config, other, "--set", "run.seed=7") == 0
    for name in ("generator.safetensors", "generator.safetensors.sha256"):
        shutil.copyfile(other / "mc" / name, out / "mc" / name)
    capsys.readouterr()
    before = snapshot(out)
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(line, "arm mc's predictions and calibrators were made by another generator than "
                       "mc/generator.safetensors (sha256 ", "--force")
    assert_named(refused(capsys, "report", str(out)), "made by another generator")
    # predict would apply the calibrator fitted on the other generator's maps
    t1 = write(tmp_path / "in" / "a.nii.gz", brain())
    assert_named(refused(capsys, *predict(out / "mc", tmp_path / "maps", t1)), f"--model {out / 'mc'}",
                 "made by another generator")
    assert snapshot(out) == before and not (tmp_path / "maps").exists()


def test_predict_writes_nothing_into_a_run_directory(tiny_run, tmp_path, capsys):
    """Maps in RUN/<arm>/predictions would be scored by `uqsynth report` as the run's own."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    t1 = write(tmp_path / "in" / "a.nii.gz", brain())
    before = snapshot(out)
    for inside in (out / "mc" / "predictions", out / "new-folder"):
        line = refused(capsys, *predict(out / "mc", inside, t1))
        assert_named(line, f"--out {inside} lies in the run directory {out.resolve()}")
    assert snapshot(out) == before and not (out / "new-folder").exists()

