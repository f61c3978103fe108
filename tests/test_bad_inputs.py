"""The catalogue of bad inputs: each is refused with one ``error:`` line and leaves nothing behind.

Every case goes through the command line as a user meets it
(:func:`uqsynth.cli.main` in process) and must give status 2 and exactly one
line ``error: ...`` on stderr, the last one, naming the culprit (file,
subject, key, plugin). ``uqsynth run`` may first print its header (what it
is about to run); nothing else may come before the error. Bad input must
leave no output: ``--out`` does not exist afterwards, or, for what can only
be found once the run directory exists (a full disk), no file is left in it
half-written. R is the tiny BraTS root of the data cases (subjects S01 for
training, S02 for testing), C the configuration file, RUN a finished smoke
run with arms mc_dropout and concrete_dropout.

===============================  ========  ===========================================================
case                             command   the error line says (abridged)
===============================  ========  ===========================================================
truncated .nii.gz                run       subject S01: cannot read T2w file R/S01/S01_t2.nii.gz:
                                           truncated gzip stream (...)
file that is not NIfTI           run       subject S01: cannot read T2w file R/S01/S01_t2.nii.gz: ...
2D image                         run       subject S01: T2w file R/S01/S01_t2.nii.gz has shape (20, 24);
                                           expected a 3D volume
4D image                         run       ... has shape (20, 24, 16, 3); expected a 3D volume
T1/T2 shape mismatch             run       subject S01: R/S01/S01_t1.nii.gz has shape (20, 24, 16) but
                                           R/S01/S01_t2.nii.gz has shape (20, 24, 15)
affine mismatch                  run       subject S01: ..._t1.nii.gz and ..._t2.nii.gz have different affines (...)
NaN voxels                       run       subject S01: T2w file ... has 1 NaN and 0 infinite voxels
Inf voxels                       run       subject S01: T2w file ... has 0 NaN and 2 infinite voxels
all-zero volume                  run       subject S01: T2w file ... is all zeros
bad test subject                 run       subject S02: T1w file ... has 1 NaN and 0 infinite voxels
subject missing its T2           run       subject S01: no T2w file S01_t2.nii[.gz] in R/S01
duplicate subject ids            run       duplicate subject id S01: found in R/S01 and in R/more/S01
data root with no subjects       run       no BraTS subjects found under R: looked for <id>/<id>_t1.nii[.gz] ...
data root missing                run       BraTS root R does not exist
wrong TOML type                  run       C: train.epochs: expected an integer, found a string 'two'
wrong type in --set              run       --set data.image_size=big: data.image_size: expected an integer, ...
unknown key                      run       C: unknown key train.epoch (did you mean "epochs"?)
unknown key in --set             run       --set sampling.sample=4: unknown key sampling.sample (...)
unknown plugin parameter         run       C: unknown key arms.mc.stochastic_layer.channelwize
                                           (did you mean "channelwise"?)
unknown plugin                   run       C: model.generator: unknown generator "unett" (did you mean "unet"...)
malformed --set                  run       --set train.epochs: expected key.path=value
zero / negative size             run       --set data.image_size=0: data.image_size must be >= 8, found 0
                                           (also -32; train.batch_size=0)
zero / negative epochs           run       --set train.epochs=0: train.epochs must be >= 1, found 0 (also -1)
zero / negative samples, T < 2   run       --set sampling.samples=1: sampling.samples must be >= 2, found 1
                                           (also 0, -4)
zero subjects                    phantom   --subjects must be at least 1, found 0
T < 2 samples                    predict   --samples must be at least 2 (...), found 1
--out under a regular file       run       --out F/run: cannot create the run directory: Not a directory
--out in a read-only folder      run       --out D/run: cannot create the run directory: Permission denied
--out is a read-only folder      run       names D and says Permission denied (both skipped where mode 0o500
                                           restricts nothing, as for root)
full disk (simulated ENOSPC)     run       cannot write OUT/config.toml: No space left on device
plugin raising on import         run       Error importing plugin "broken": RuntimeError: boom at import
plugin registering a wrong type  run       plugin "wrong" registered calibrator "thirdparty_cal" as
                                           builtins.object, which does not derive from ...Calibrator
plugin factory of a wrong type   run       plugin "wrong" registered stochastic_layer "thirdparty_identity",
                                           but its factory returned torch.nn...Identity, which is not a ...
calibrator of another arm        predict   calibrator file RUN/concrete_dropout/calibrators/isotonic.safetensors
                                           was fitted for arm 'mc_dropout', not 'concrete_dropout'
calibrator of another arm        report    the same line; no file of RUN changes
bad concrete weight_term         run       C: arms.cd.stochastic_layer.weight_term: expected one of 'consuming',
                                           'preceding', found a string 'after' (in test_layers.py)
broken link in the data root     run       broken symbolic link R/S03 -> T (its target does not exist)
                                           (in test_bad_inputs_data.py, as the rows below)
head volume (not skull-stripped) run       subject S01: T1w file R/S01/S01_t1.nii.gz is not skull-stripped (...):
                                           its nonzero voxels (the brain mask) fill 95% of the volume ...;
                                           skull-strip it, or give a brain mask file (the brats dataset's mask ...)
raw scanner T1 (noisy air)       run       subject S02: T1w file ... is not skull-stripped (...): ... fill 100% ...
z-scored volume                  run       subject S01: T2w file ...: 50.0% of its brain voxels are negative
                                           (...), but magnitude MRI is nonnegative: ...; give magnitude images
head volume                      predict   subject mni: T1w file F is not skull-stripped (...); skull-strip it ...
huge shape in a tiny .nii        run       subject S01: cannot read T2w file R/S01/S01_t2.nii: its header claims
                                           shape (2000, 2000, 2000) (8e+09 voxels), more than any MRI volume ...
huge shape in a tiny .nii.gz     run       ... its header claims shape (4000, 4000, 4000) ...
header lie in a .nii / .nii.gz   (load)    ...: its header claims shape (20, 24, 17) of float32 (32,992 bytes
                                           with the header), but the file holds 31,072 bytes; it is truncated ...
nan / inf in the configuration   run       --set train.lr=nan: train.lr must be a finite number, found nan
                                           (also inf, -inf in C, sampling.memory_budget_mb, a plugin's z_max;
                                           in test_bad_inputs_numbers.py, as the rows below)
diverging training (lr 1e10)     run       arm mc: training diverged in epoch 1 after step 1: tensor
                                           /discriminator/model.3.running_var holds 0 NaN and 16 infinite
                                           values; lower train.lr (now 1e+10) and rerun with --force; ...
NaN loss in a later epoch        (train)   ... in epoch 2 at step 1: the generator's adversarial loss (...) is
                                           nan; ..., or keep the 1 good epoch(s) with --set train.epochs=1 ...
NaN in generator.safetensors     predict   --model RUN/mc: generator weights RUN/mc/generator.safetensors is
                                           unusable: its tensor downs.1.conv.weight holds 1 NaN and 0 ...
Inf in a calibrator file         predict   calibrator file .../sigma_scaling.safetensors is unusable: its tensor
                                           sum_sq_ holds 0 NaN and 1 infinite values (...)
NaN maps (weights that overflow) predict   t1: map mean holds ... NaN ..., so none of its maps was written (...)
negative / huge run.seed         run       --set run.seed=-1: run.seed must be >= 0, found -1
                                           (2**40: run.seed must be < 4294967296)
calibrator param out of range    run       C: calibration.calibrators[0].bins must be >= 1, found 0 (also
                                           sigma_scaling min_scale = -0.5, conformal low = 0)
conformal low above high         run       C: calibration.calibrators[0]: low must be below high, found
                                           low = 2.0, high = 1.0
misspelt hook name               run       plugin "typo" implements unknown hook uqsynth_register_calibrator
                                           (did you mean ...?): PluginValidationError: unknown hook '...' ...
hook with a wrong argument       run       plugin "args" cannot be registered: PluginValidationError: ...;
                                           Argument(s) {'registr'} are declared in the hookimpl but ...
--out is a data folder           run       --out D holds files that no uqsynth run recorded (notes/.draft.tmp);
                                           uqsynth writes only into a new or empty folder or a run directory
                                           of its own, ...: choose another --out (in test_bad_inputs_state.py,
                                           as the rows below)
user's file in an arm's folder   run       --out RUN: mc/.mine.tmp was not written by uqsynth, but this run
                                           writes there (arm mc's folder); move it away, ... (also with --force)
output over an input             predict   --out d: the output d/a_std.nii.gz would replace the input
                                           d/a_std.nii.gz (--input); choose another --out (also through a
                                           symlink or .., over --rescale-like REF or a file of --model)
subject added / changed / gone   run       --out RUN: the run there was trained on other data: subject S00 is
                                           new; the split would move S02 from train to test; pass --force to
                                           retrain it from scratch, or choose another --out
split.json edited                run       --out RUN: the run's split.json was edited: split.json puts S1 in
                                           test, the data and configuration in train; pass --force ...
split.json missing               run       --out RUN: the run there holds trained state (mc/...) but no
                                           split.json saying which subjects it was trained on; ...
predictions of other weights     run       --out RUN: arm mc's predictions and calibrators were made by another
                                           generator than mc/generator.safetensors (sha256 1a2b.. then, 3c4d..
                                           now); pass --force ...
test subject changed / edited    report    RUN: the run there was trained on other data: subject S01 changed
                                           content; `uqsynth run` with --force retrains it
===============================  ========  ===========================================================
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from conftest import make_distribution
from test_data_nifti import AFFINE, brain, make_brats, path_of, write

from uqsynth.cli import main

#: Lines ``uqsynth run`` prints before it starts (what it is about to run), which may precede an error.
RUN_HEADER = ("uqsynth ", "distributed: ", "data: ", "model: ", "arm ")

#: A configuration that is valid and tiny; each case breaks one thing in it.
VALID = {
    "data": {
        "source": "phantom", "image_size": 32, "test_fraction": 0.5,
        "phantom": {"subjects": 2, "shape": [24, 28, 20]},
    },
    "model": {"generator": {"name": "unet", "ngf": 4}, "discriminator": {"name": "patchgan", "ndf": 8}},
    "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 1},
    "sampling": {"samples": 2},
    "calibration": {"calibrators": ["sigma_scaling"]},
    "arms": {"mc": {"stochastic_layer": {"name": "mc_dropout", "p": 0.5}, "positions": [2, 3]}},
}


def write_config(path: Path, **tables: dict) -> Path:
    """:data:`VALID` with some of its tables replaced, as a TOML file."""
    path.write_text(tomli_w.dumps({**VALID, **tables}))
    return path


def stderr_of_refusal(capsys, *argv: str) -> list[str]:
    """Run the command line; check status 2 and one ``error:`` line, the last, without traceback; return stderr."""
    status = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2, lines
    assert lines and lines[-1].startswith("error: "), lines
    assert sum(line.startswith(("error", "internal error", "warning")) for line in lines) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return lines


def assert_only_the_header_before(lines: list[str]) -> None:
    """Nothing but the run's header came before the error: it was found before anything ran."""
    assert all(line.startswith(RUN_HEADER) for line in lines[:-1]), lines


def refused(capsys, *argv: str) -> str:
    """:func:`stderr_of_refusal`, found before anything ran; return the error line."""
    lines = stderr_of_refusal(capsys, *argv)
    assert_only_the_header_before(lines)
    return lines[-1]


def files_in(directory: Path) -> set[str]:
    """Every file below ``directory``, but the run lock (which stays by design, see uqsynth.run_directory)."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {".lock"}


def assert_named(line: str, *fragments: object) -> None:
    for fragment in fragments:
        assert str(fragment) in line, f"{fragment!r} not in {line!r}"


# ------------------------------------------------------------ data: a tiny BraTS root


def _t2(root: Path) -> Path:
    return path_of(root, "S01", "t2")


def truncated(root):
    bad = _t2(root)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return "subject S01", f"cannot read T2w file {bad}", "truncated gzip"


def not_nifti(root):
    bad = _t2(root)
    bad.write_text("patient notes, not an image\n")
    return "subject S01", f"cannot read T2w file {bad}"


def image_2d(root):
    bad = write(_t2(root), brain()[:, :, 8])
    return f"subject S01: T2w file {bad} has shape (20, 24); expected a 3D volume",


def image_4d(root):
    bad = write(_t2(root), np.stack([brain()] * 3, axis=-1))
    return f"subject S01: T2w file {bad} has shape (20, 24, 16, 3); expected a 3D volume",


def shape_mismatch(root):
    bad = write(_t2(root), brain()[:, :, :15])
    return "subject S01", path_of(root, "S01", "t1"), bad, "(20, 24, 16)", "(20, 24, 15)"


def affine_mismatch(root):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    bad = write(_t2(root), brain(), shifted)
    return "subject S01", path_of(root, "S01", "t1"), bad, "different affines"


def nan_voxels(root):
    data = brain()
    data[10, 12, 8] = np.nan
    return f"subject S01: T2w file {write(_t2(root), data)} has 1 NaN and 0 infinite voxels",


def inf_voxels(root):
    data = brain()
    data[10, 12, 8], data[11, 12, 8] = np.inf, -np.inf
    return f"subject S01: T2w file {write(_t2(root), data)} has 0 NaN and 2 infinite voxels",


def all_zero(root):
    return f"subject S01: T2w file {write(_t2(root), np.zeros((20, 24, 16), np.float32))} is all zeros",


def bad_test_subject(root):
    data = brain(10)
    data[10, 12, 8] = np.nan
    bad = write(path_of(root, "S02", "t1"), data)
    return f"subject S02: T1w file {bad} has 1 NaN and 0 infinite voxels",


def missing_t2(root):
    _t2(root).unlink()
    return f"subject S01: no T2w file S01_t2.nii[.gz] in {root / 'S01'}",


def duplicate_ids(root):
    shutil.copytree(root / "S01", root / "more" / "S01")
    return "duplicate subject id S01", root / "S01", root / "more" / "S01"


def no_subjects(root):
    for subject in ("S01", "S02"):
        shutil.rmtree(root / subject)
    return f"no BraTS subjects found under {root}",


def root_missing(root):
    shutil.rmtree(root)
    return f"BraTS root {root} does not exist",


@pytest.mark.parametrize(
    "damage",
    [truncated, not_nifti, image_2d, image_4d, shape_mismatch, affine_mismatch, nan_voxels, inf_voxels, all_zero,
     bad_test_subject, missing_t2, duplicate_ids, no_subjects, root_missing],
    ids=lambda damage: damage.__name__,
)
def test_bad_data(damage, tmp_path, capsys):
    root = make_brats(tmp_path / "brats")
    fragments = damage(root)
    data = {"source": "brats", "root": str(root), "image_size": 32, "test_subjects": ["S02"]}
    config = write_config(tmp_path / "c.toml", data=data)
    out = tmp_path / "out"
    lines = stderr_of_refusal(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(lines[-1], *fragments)
    assert not out.exists()
    assert_only_the_header_before(lines)


# ------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("tables", "overrides", "fragments"),
    [
        pytest.param({"train": {"epochs": "two"}}, (), ("C: train.epochs: expected an integer, found a string 'two'",),
                     id="wrong_toml_type"),
        pytest.param({}, ("data.image_size=big",),
                     ("--set data.image_size=big: data.image_size: expected an integer, found a string 'big'",),
                     id="wrong_type_in_set"),
        pytest.param({"train": {"epoch": 2}}, (), ('C: unknown key train.epoch (did you mean "epochs"?)',),
                     id="unknown_key"),
        pytest.param({}, ("sampling.sample=4",), ("--set sampling.sample=4: unknown key sampling.sample",),
                     id="unknown_key_in_set"),
        pytest.param({"arms": {"mc": {"stochastic_layer": {"name": "mc_dropout", "channelwize": True}}}}, (),
                     ('C: unknown key arms.mc.stochastic_layer.channelwize (did you mean "channelwise"?)',),
                     id="unknown_plugin_key"),
        pytest.param({"model": {"generator": {"name": "unett"}}}, (),
                     ('C: model.generator: unknown generator "unett"', '"unet"', "uqsynth plugins"),
                     id="unknown_plugin"),
        pytest.param({}, ("train.epochs",), ("--set train.epochs: expected key.path=value",), id="malformed_set"),
        pytest.param({}, ("data.image_size=0",), ("data.image_size must be >= 8, found 0",), id="zero_size"),
        pytest.param({}, ("data.image_size=-32",), ("data.image_size must be >= 8, found -32",), id="negative_size"),
        pytest.param({}, ("train.batch_size=0",), ("train.batch_size must be >= 1, found 0",), id="zero_batch"),
        pytest.param({}, ("train.epochs=0",), ("train.epochs must be >= 1, found 0",), id="zero_epochs"),
        pytest.param({}, ("train.epochs=-1",), ("train.epochs must be >= 1, found -1",), id="negative_epochs"),
        pytest.param({}, ("sampling.samples=0",), ("sampling.samples must be >= 2, found 0",), id="zero_samples"),
        pytest.param({}, ("sampling.samples=-4",), ("sampling.samples must be >= 2, found -4",), id="negative_samples"),
        pytest.param({}, ("sampling.samples=1",), ("--set sampling.samples=1: sampling.samples must be >= 2, found 1",),
                     id="one_sample"),
    ],
)
def test_bad_configuration(tables, overrides, fragments, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", **tables)
    out = tmp_path / "out"
    sets = [arg for item in overrides for arg in ("--set", item)]
    line = refused(capsys, "run", str(config), "--out", str(out), *sets)
    assert_named(line, *(fragment.replace("C: ", f"{config}: ") for fragment in fragments))
    assert not out.exists()


def test_zero_phantom_subjects(tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(capsys, "phantom", "--out", str(out), "--subjects", "0")
    assert_named(line, "--subjects must be at least 1, found 0")
    assert not out.exists()


# ------------------------------------------------------------ where the output goes


def test_out_under_a_regular_file(tmp_path, capsys):
    """An --out nobody can create: its parent is a file (unwritable whoever runs the tests, root included)."""
    config = write_config(tmp_path / "c.toml")
    parent = tmp_path / "results"
    parent.write_text("a file, not a folder\n")
    line = refused(capsys, "run", str(config), "--out", str(parent / "run"), "--device", "cpu")
    assert_named(line, f"--out {parent / 'run'}: cannot create the run directory: Not a directory")
    assert parent.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("where", ["in", "is"])
def test_out_read_only(where, tmp_path, capsys):
    """An --out in a read-only folder (mode 0o500), or that is one."""
    config = write_config(tmp_path / "c.toml")
    folder = tmp_path / "results"
    folder.mkdir(mode=0o500)
    out = folder / "run" if where == "in" else folder
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("mode 0o500 restricts nothing here (root): see test_out_under_a_regular_file")
        line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
        assert_named(line, out, "Permission denied")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_full_disk_leaves_no_half_written_file(tmp_path, capsys, monkeypatch):
    """The disk fills up in the middle of the first file of the run (simulated: half written, then ENOSPC)."""
    config = write_config(tmp_path / "c.toml")
    out = tmp_path / "out"

    def half_then_enospc(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_enospc)
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    monkeypatch.undo()
    assert_named(line, f"cannot write {out / 'config.toml'}: No space left on device")
    assert files_in(out) == set()  # neither config.toml nor its temporary file


# ------------------------------------------------------------ plugins


RAISES_ON_IMPORT = "raise RuntimeError('boom at import')\n"

REGISTERS_A_WRONG_TYPE = """
    import uqsynth

    @uqsynth.hookimpl
    def uqsynth_register_calibrators(register):
        register("thirdparty_cal", object)
"""

FACTORY_OF_A_WRONG_TYPE = """
    import uqsynth
    from torch import nn

    @uqsynth.hookimpl
    def uqsynth_register_stochastic_layers(register):
        register("thirdparty_identity", lambda: nn.Identity())
"""


@pytest.mark.parametrize(
    ("plugin", "source", "layer", "fragments"),
    [
        pytest.param("broken", RAISES_ON_IMPORT, "mc_dropout",
                     ('Error importing plugin "broken": RuntimeError: boom at import',), id="raises_on_import"),
        pytest.param("wrong", REGISTERS_A_WRONG_TYPE, "mc_dropout",
                     ('plugin "wrong" registered calibrator "thirdparty_cal" as builtins.object, which does not derive '
                      "from uqsynth.calibration.base.Calibrator",), id="registers_a_wrong_type"),
        pytest.param("wrong", FACTORY_OF_A_WRONG_TYPE, "thirdparty_identity",
                     ('plugin "wrong" registered stochastic_layer "thirdparty_identity", but its factory returned '
                      "torch.nn.modules.linear.Identity, which is not a",), id="factory_of_a_wrong_type"),
    ],
)
def test_bad_plugin(plugin, source, layer, fragments, site_dir, tmp_path, capsys):
    module = f"thirdparty_{plugin}"
    make_distribution(site_dir, f"{plugin}-dist", "0.1", {plugin: module}, {module: source})
    config = write_config(tmp_path / "c.toml", arms={"mc": {"stochastic_layer": layer, "positions": [2, 3]}})
    out = tmp_path / "out"
    assert_named(refused(capsys, "run", str(config), "--out", str(out)), *fragments)
    assert not out.exists()


# ------------------------------------------------------------ a finished run


@pytest.fixture
def mixed_up_run(smoke_run, tmp_path) -> Path:
    """A copy of the smoke run whose concrete_dropout arm holds mc_dropout's isotonic calibrator (and its checksum)."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    for name in ("isotonic.safetensors", "isotonic.safetensors.sha256"):
        calibrator = Path("calibrators") / name
        shutil.copyfile(run / "mc_dropout" / calibrator, run / "concrete_dropout" / calibrator)
    return run


def other_arms_calibrator(run: Path) -> str:
    path = run / "concrete_dropout" / "calibrators" / "isotonic.safetensors"
    return f"calibrator file {path} was fitted for arm 'mc_dropout', not 'concrete_dropout'"


def test_predict_refuses_a_calibrator_of_another_arm(mixed_up_run, tmp_path, capsys):
    t1 = write(tmp_path / "t1.nii.gz", brain())
    out = tmp_path / "predicted"
    line = refused(capsys, "predict", "--model", str(mixed_up_run / "concrete_dropout"), "--input", str(t1),
                   "--out", str(out), "--device", "cpu")
    assert_named(line, other_arms_calibrator(mixed_up_run))
    assert not out.exists()


def test_report_refuses_a_calibrator_of_another_arm(mixed_up_run, capsys):
    before = {name: (mixed_up_run / name).read_bytes() for name in sorted(files_in(mixed_up_run))}
    assert_named(refused(capsys, "report", str(mixed_up_run)), other_arms_calibrator(mixed_up_run))
    assert {name: (mixed_up_run / name).read_bytes() for name in sorted(files_in(mixed_up_run))} == before


def test_predict_refuses_fewer_than_two_samples(smoke_run, tmp_path, capsys):
    t1 = write(tmp_path / "t1.nii.gz", brain())
    out = tmp_path / "predicted"
    line = refused(capsys, "predict", "--model", str(smoke_run / "mc_dropout"), "--input", str(t1),
                   "--out", str(out), "--samples", "1")
    assert_named(line, "--samples must be at least 2", "found 1")
    assert not out.exists()


@pytest.mark.parametrize(
    ("calibrator", "needed"),
    [({"name": "conformal_risk", "alpha": 0.1}, 9), ({"name": "risk_control", "alpha": 0.1, "delta": 0.1}, 22)],
)
def test_a_calibration_split_too_small_for_subject_level_risk_control_stops_before_training(
    calibrator, needed, tmp_path, capsys
):
    config = write_config(
        tmp_path / "c.toml",
        data={**VALID["data"], "phantom": {"subjects": 12, "shape": [24, 28, 20]}, "test_fraction": 0.34},
        calibration={"calibrators": [calibrator], "subjects": "held_out", "held_out_fraction": 0.34},
    )
    out = tmp_path / "run"
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(line, "calibration.calibrators", calibrator["name"], f"at least {needed} calibration subjects", "has 4")
    assert not out.exists() or files_in(out) == set(), "nothing may be written before the refusal"
