"""Data the loaders must not lose, inputs outside uqsynth's assumptions, headers that lie (issue 15).

Three promises, each tested as a user meets it:

1. Every subject a user points a loader at is found (linked folders and
   files, ``.nii``/``.nii.gz`` in any case), and what is left out is said.
2. A volume that is not skull-stripped magnitude MRI is refused where the
   result would be meaningless, and warned about where it is suspect.
3. A NIfTI header is checked against the file before the data are read.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_bad_inputs import assert_named, refused, write_config
from test_data_nifti import SHAPE, brain, make_bids, make_brats, path_of, write

from uqsynth.cli import main
from uqsynth.data.brats import BratsDataset, find_source_only
from uqsynth.data.nifti import load_volume
from uqsynth.data.paired_nifti import PairedNiftiDataset
from uqsynth.errors import DataError
from uqsynth.inference import map_file_names


def brats_config(tmp_path: Path, root: Path) -> Path:
    data = {"source": "brats", "root": str(root), "image_size": 32, "test_subjects": ["S02"]}
    return write_config(tmp_path / "c.toml", data=data)


def refused_run(capsys, tmp_path: Path, root: Path) -> str:
    """``uqsynth run`` on a BraTS root: refused before anything is written; return the error line."""
    out = tmp_path / "out"
    line = refused(capsys, "run", str(brats_config(tmp_path, root)), "--out", str(out), "--device", "cpu")
    assert not out.exists()
    return line


def linked_cohort(tmp_path: Path, linked: tuple[str, ...] = ("S01", "S02"), real: tuple[str, ...] = ()) -> Path:
    """A root whose subject folders are symbolic links into a store elsewhere (how cohorts are assembled)."""
    store = make_brats(tmp_path / "store", ids=linked)
    root = make_brats(tmp_path / "cohort", ids=real) if real else tmp_path / "cohort"
    root.mkdir(exist_ok=True)
    for subject in linked:
        (root / subject).symlink_to(store / subject, target_is_directory=True)
    return root


# ------------------------------------------------------------ 1. data that goes missing


def test_root_of_linked_subject_folders_is_found(tmp_path):
    """The issue's example: a root of linked folders said "no BraTS subjects found"."""
    root = linked_cohort(tmp_path)
    dataset = BratsDataset(root=root)
    assert dataset.subject_ids() == ["S01", "S02"]
    assert dataset.load("S02").source_path == root / "S02" / "S02_t1.nii.gz"


def test_mixed_linked_and_real_folders_are_all_found(tmp_path):
    """Linked and real folders side by side: the linked ones were dropped without a word."""
    root = linked_cohort(tmp_path, linked=("S02", "S03"), real=("S01",))
    assert BratsDataset(root=root).subject_ids() == ["S01", "S02", "S03"]


def test_upper_case_and_nii_names_are_found(tmp_path):
    """``_T1.nii.gz``, ``.NII.GZ`` and ``.nii`` in one root: exports of one cohort differ like this."""
    root = tmp_path / "brats"
    write(root / "S01" / "S01_T1.nii.gz", brain(1))
    write(root / "S01" / "S01_T2.NII.GZ", brain(2))
    write(root / "S02" / "S02_t1.nii", brain(3))
    write(root / "S02" / "S02_t2.nii.gz", brain(4))
    dataset = BratsDataset(root=root)
    assert dataset.subject_ids() == ["S01", "S02"]
    np.testing.assert_array_equal(dataset.load("S01").target, brain(2))


def test_predict_input_folder_of_links_is_found(tmp_path):
    """``uqsynth predict --input DIR`` reads the folder the same way."""
    root = linked_cohort(tmp_path)
    assert find_source_only(root) == {s: root / s / f"{s}_t1.nii.gz" for s in ("S01", "S02")}


def test_paired_nifti_finds_linked_and_differently_named_files(tmp_path):
    """``**`` through a linked folder, and a ``.NII``/``.nii`` file under a ``.nii.gz`` glob."""
    store = make_bids(tmp_path / "store", ids=("sub-02",))
    root = make_bids(tmp_path / "bids", ids=("sub-01",))
    (root / "sub-02").symlink_to(store / "sub-02", target_is_directory=True)
    write(root / "sub-03" / "anat" / "sub-03_t1w.NII", brain(5))
    write(root / "sub-03" / "anat" / "sub-03_FLAIR.nii", brain(6))
    dataset = PairedNiftiDataset(root=root, source_glob="**/*_T1w.nii.gz", target_glob="**/*_FLAIR.nii.gz")
    assert dataset.subject_ids() == ["sub-01", "sub-02", "sub-03"]


def test_a_folder_linked_twice_is_refused(tmp_path):
    """One subject under two names would be two "subjects", one of them perhaps in the test set."""
    root = make_bids(tmp_path / "bids")
    (root / "sub-09").symlink_to(root / "sub-01", target_is_directory=True)
    with pytest.raises(DataError, match="subjects sub-01 and sub-09 read the same file"):
        PairedNiftiDataset(root=root, source_glob="*/anat/*_T1w.nii.gz", target_glob="*/anat/*_FLAIR.nii.gz")


def test_broken_link_is_an_error_naming_it(tmp_path, capsys):
    root = make_brats(tmp_path / "brats")
    (root / "S03").symlink_to(tmp_path / "unmounted" / "S03", target_is_directory=True)
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"broken symbolic link {root / 'S03'} -> {tmp_path / 'unmounted' / 'S03'}")


def test_link_loop_is_followed_once_and_reported(tmp_path):
    root = make_brats(tmp_path / "brats")
    (root / "S01" / "back").symlink_to(root, target_is_directory=True)
    dataset = BratsDataset(root=root)
    assert dataset.subject_ids() == ["S01", "S02"]
    assert any("left out 1 link" in line and "S01/back" in line for line in dataset.scan_summary())


def test_dataset_reports_what_it_left_out(tmp_path):
    root = make_brats(tmp_path / "brats", contrasts=("t1", "t2", "flair"))
    (root / "S01" / "._S01_t1.nii.gz").write_bytes(b"macOS resource fork")
    write(root / "S02" / "W39_1998.09.19_Segm.nii", brain())  # a real BraTS 2020 file name
    (root / "S03").mkdir()
    (root / "S03" / "VSD.Brain.XX.O.MR_T1.54513.mha").write_bytes(b"BraTS 2015 format")
    summary = BratsDataset(root=root).scan_summary()
    assert summary[0] == f"found 2 subject(s) under {root} (BraTS 2018-2021 naming, <id>/<id>_t1.nii[.gz])"
    text = "\n".join(summary)
    assert_named(text, "left out 1 NIfTI file (named in no BraTS naming", "S02/W39_1998.09.19_Segm.nii",
                 "left out 2 files (contrasts not asked for: flair)", "S01/S01_flair.nii.gz",
                 "left out 1 folder (no subject files in it): S03 (1 .mha file)",
                 "left out 1 hidden entry", "S01/._S01_t1.nii.gz")


def test_run_prints_what_the_scan_left_out(tmp_path, capsys):
    """The summary is in the run's log, before anything is read (here a NaN in S02 stops the run after)."""
    root = make_brats(tmp_path / "brats")
    write(root / "S01" / "notes.nii.gz", brain())
    data = brain(10)
    data[1, 2, 3] = np.nan
    write(path_of(root, "S02", "t1"), data)
    refused_run(capsys, tmp_path, root)
    # refused() consumed stderr; run again to read it whole
    main(["run", str(brats_config(tmp_path, root)), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"data: found 2 subject(s) under {root}" in err
    assert "data: left out 1 NIfTI file (named in no BraTS naming, e.g. not <id>/<id>_t1.nii[.gz]): " \
           "S01/notes.nii.gz" in err


# ------------------------------------------------------------ 2. inputs outside the assumptions


def _radius2() -> np.ndarray:
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return sum(g**2 for g in grid)


def head(extent: float = 2.1, seed: int = 0) -> np.ndarray:
    """A volume whose nonzero part is a head filling the box (MNI152 with its head: ~95 %)."""
    values = np.random.default_rng(seed).uniform(50, 1000, SHAPE).astype(np.float32)
    return np.where(_radius2() < extent, values, 0).astype(np.float32)


def scanner_t1(seed: int = 0) -> np.ndarray:
    """A raw scanner T1: the brain plus Rician noise in the air around it (never exactly zero)."""
    rng = np.random.default_rng(seed)
    noise = np.abs(rng.normal(0, 8, SHAPE) + 1j * rng.normal(0, 8, SHAPE)).astype(np.float32)
    return np.where(brain(seed) > 0, brain(seed), noise).astype(np.float32)


def test_head_volume_is_refused(tmp_path, capsys):
    """The issue's example: an MNI152-like head was taken as 95 % brain, scored and calibrated as such."""
    root = make_brats(tmp_path / "brats")
    bad = write(path_of(root, "S01", "t1"), head())
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"subject S01: T1w file {bad} is not skull-stripped", "fill 95% of the volume",
                 "skull-strip it, or give a brain mask file", "mask option")


def test_head_volume_with_a_mask_file_is_accepted(tmp_path):
    """The remedy the message names works: the mask file says where the brain is."""
    root = make_brats(tmp_path / "brats", ids=("S01",))
    write(path_of(root, "S01", "t1"), head())
    write(root / "S01" / "S01_brainmask.nii.gz", (brain() > 0).astype(np.uint8))
    with pytest.raises(DataError, match="is not skull-stripped"):
        BratsDataset(root=root).load("S01")
    volumes = BratsDataset(root=root, mask="brainmask").load("S01")
    assert volumes.warnings == [] and volumes.mask.mean() < 0.4


def test_raw_scanner_t1_with_noisy_background_is_refused(tmp_path, capsys):
    root = make_brats(tmp_path / "brats")
    bad = write(path_of(root, "S02", "t1"), scanner_t1())
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"subject S02: T1w file {bad} is not skull-stripped", "fill 100% of the volume",
                 "100% of its in-plane outer faces")


def test_a_slab_of_thick_slices_through_the_brain_is_not_taken_for_a_head(tmp_path):
    """Limited coverage cuts the brain at the top and bottom slices: only the in-plane faces must be air."""
    shape = (64, 64, 6)  # six axial slices through the middle of a brain (axis 2 is inferior-superior here)
    grid = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), np.zeros(6), indexing="ij")
    slab = np.where(grid[0] ** 2 + grid[1] ** 2 < 0.6, 500.0, 0.0).astype(np.float32)
    root = tmp_path / "brats"
    write(root / "S01" / "S01_t1.nii.gz", slab, np.eye(4))
    write(root / "S01" / "S01_t2.nii.gz", slab * 2, np.eye(4))
    volumes = BratsDataset(root=root).load("S01")
    assert volumes.source.shape == shape and volumes.warnings == []


def test_z_scored_volume_is_refused(tmp_path, capsys):
    root = make_brats(tmp_path / "brats")
    data = brain(1)
    inside = data > 0
    data[inside] = (data[inside] - data[inside].mean()) / data[inside].std()
    bad = write(path_of(root, "S01", "t2"), data)
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"subject S01: T2w file {bad}: ", "of its brain voxels are negative",
                 "magnitude MRI is nonnegative", "give magnitude images")


def test_suspect_volumes_carry_warnings(tmp_path):
    """A head with zero air around it (58 % of the box) and 2 % negative voxels: suspect, not meaningless."""
    root = make_brats(tmp_path / "brats")
    write(path_of(root, "S01", "t1"), head(extent=1.2))
    undershoot = brain(11)
    undershoot.flat[np.flatnonzero(undershoot > 0)[::50]] = -3.0  # 2 % of the brain, the mask unchanged
    write(path_of(root, "S02", "t2"), undershoot)
    dataset = BratsDataset(root=root)
    (s01,), (s02,) = dataset.load("S01").warnings, dataset.load("S02").warnings
    assert_named(s01, f"subject S01: T1w file {path_of(root, 'S01', 't1')} may not be skull-stripped",
                 "fill 58% of the volume")
    assert_named(s02, f"subject S02: T2w file {path_of(root, 'S02', 't2')}: 2.0% of its brain voxels are negative")
    assert dataset.load("S01").header["descrip"].tobytes().startswith(b"uqsynth input warning: mask 58% of box")


def test_run_prints_input_warnings(tmp_path, capsys):
    """``uqsynth run`` says each warning once, as ``warning: ...``, with the data lines."""
    import torch

    from uqsynth.config import load_config
    from uqsynth.pipeline import RunContext, prepare
    from uqsynth.plugins import get_host

    root = make_brats(tmp_path / "brats")
    write(path_of(root, "S02", "t1"), head(extent=1.2))
    config = load_config(brats_config(tmp_path, root))
    context = RunContext(config, get_host(), tmp_path / "out", torch.device("cpu"))
    prepare(context)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: subject S02: T1w file {path_of(root, 'S02', 't1')}")
    assert context.input_warnings == {"S02": [warnings[0].removeprefix("warning: ")]}
    assert not (tmp_path / "out").exists()


def test_metrics_document_records_input_warnings():
    from uqsynth.evaluation import metrics_document

    document = metrics_document({}, {}, {}, input_warnings={"S02": ["subject S02: ... may not be skull-stripped"]})
    assert json.loads(json.dumps(document))["input_warnings"] == {"S02": ["subject S02: ... may not be skull-stripped"]}


def test_phantom_and_test_volumes_raise_no_warnings(tmp_path):
    from uqsynth.data.phantom import write_subjects

    assert BratsDataset(root=make_brats(tmp_path / "brats")).load("S01").warnings == []
    write_subjects(tmp_path / "phantom", 3, shape=(24, 28, 20))
    dataset = BratsDataset(root=tmp_path / "phantom")
    assert [dataset.load(s).warnings for s in dataset.subject_ids()] == [[], [], []]


@pytest.fixture
def untrained_arm(tmp_path) -> Path:
    """RUN/mc of the tiny valid configuration, untrained: enough for ``uqsynth predict`` (no training run)."""
    from uqsynth.config import load_config
    from uqsynth.model_files import save_tensors
    from uqsynth.plugins import get_host
    from uqsynth.training import GENERATOR_WEIGHTS, build_generator

    run = tmp_path / "run"
    (run / "mc").mkdir(parents=True)
    config = load_config(write_config(run / "config.toml"))
    generator = build_generator(config, config.arms["mc"], get_host())
    save_tensors(run / "mc" / GENERATOR_WEIGHTS, generator.state_dict())
    return run / "mc"


def test_predict_warns_and_marks_its_outputs(untrained_arm, tmp_path, capsys):
    t1 = write(tmp_path / "head.nii.gz", head(extent=1.2))
    out = tmp_path / "predicted"
    status = main(["predict", "--model", str(untrained_arm), "--input", str(t1), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert status == 0, err
    warnings = [line for line in err if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: subject head: T1w file {t1} may not be skull-stripped")
    names = map_file_names("head", 0.95, "t2")
    for name in ("mean", "std", "lower", "upper"):
        descrip = nib.load(out / names[name]).header["descrip"].tobytes()
        assert descrip.startswith(b"uqsynth input warning: mask 58% of box, 14% of faces")


def test_predict_refuses_a_head_volume(untrained_arm, tmp_path, capsys):
    t1 = write(tmp_path / "mni.nii.gz", head())
    out = tmp_path / "predicted"
    line = refused(capsys, "predict", "--model", str(untrained_arm), "--input", str(t1), "--out", str(out),
                   "--device", "cpu")
    assert_named(line, f"subject mni: T1w file {t1} is not skull-stripped", "skull-strip it")
    assert not out.exists()


# ------------------------------------------------------------ 3. headers checked against the file


def claim_shape(path: Path, shape: tuple[int, ...]) -> Path:
    """Rewrite a NIfTI file's header to claim ``shape``, its data unchanged (a damaged header)."""
    raw = path.read_bytes()
    compressed = raw[:2] == b"\x1f\x8b"
    if compressed:
        raw = gzip.decompress(raw)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape(shape)
    raw = header.binaryblock + raw[len(header.binaryblock):]
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path


def test_huge_shape_in_a_tiny_nii_is_refused(tmp_path, capsys):
    """The issue's example: this ended in ``internal error: MemoryError``."""
    root = make_brats(tmp_path / "brats", ext=".nii")
    bad = claim_shape(root / "S01" / "S01_t2.nii", (2000, 2000, 2000))
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"subject S01: cannot read T2w file {bad}: its header claims shape (2000, 2000, 2000)",
                 "more than any MRI volume")


def test_huge_shape_in_a_tiny_nii_gz_is_refused(tmp_path, capsys):
    root = make_brats(tmp_path / "brats")
    bad = claim_shape(path_of(root, "S02", "t1"), (4000, 4000, 4000))
    line = refused_run(capsys, tmp_path, root)
    assert_named(line, f"subject S02: cannot read T1w file {bad}: its header claims shape (4000, 4000, 4000)")


def test_truncated_nii_within_bounds_names_the_claimed_shape(tmp_path):
    bad = claim_shape(write(tmp_path / "t1.nii", brain()), (20, 24, 17))
    with pytest.raises(DataError) as info:
        load_volume(bad, role="T1w", subject_id="X")
    assert_named(str(info.value), f"subject X: cannot read T1w file {bad}: its header claims shape (20, 24, 17) "
                 "of float32 (32,992 bytes with the header), but the file holds 31,072 bytes")


def test_gzip_header_lie_is_caught_without_reading_the_data(tmp_path):
    """1000^3 voxels is a plausible grid, but not in 1 kB of gzip: refused before 4 GB are allocated."""
    bad = claim_shape(write(tmp_path / "t1.nii.gz", brain()), (1000, 1000, 1000))
    with pytest.raises(DataError, match=r"claims shape \(1000, 1000, 1000\) of float32 .* but the file holds "
                                        r"[\d,]+ bytes compressed, at most [\d.,]+ MB once decompressed"):
        load_volume(bad, role="T1w", subject_id="X")


def test_multi_member_gzip_is_counted_not_trusted_to_its_trailer(tmp_path):
    """Several gzip members (bgzip-style): the trailer gives only the last one's size, so it is counted."""
    raw = gzip.decompress(write(tmp_path / "x.nii.gz", brain()).read_bytes())
    good = tmp_path / "good.nii.gz"
    good.write_bytes(gzip.compress(raw[:10000]) + gzip.compress(raw[10000:]))
    np.testing.assert_array_equal(load_volume(good, role="T1w", subject_id="X").array, brain())
    short = tmp_path / "short.nii.gz"
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape((20, 24, 17))
    lying = header.binaryblock + raw[348:]
    short.write_bytes(gzip.compress(lying[:10000]) + gzip.compress(lying[10000:]))
    with pytest.raises(DataError, match=r"claims shape \(20, 24, 17\) .* the file holds 31,072 bytes once decompressed"):
        load_volume(short, role="T1w", subject_id="X")

