"""NIfTI datasets: reading, validation messages, BraTS namings, globs, splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uqsynth.data.brats import BratsDataset, detect_naming, find_source_only, find_subjects
from uqsynth.data.nifti import load_pair, load_volume, save_like
from uqsynth.data.paired_nifti import PairedNiftiDataset
from uqsynth.data.split import split_subjects
from uqsynth.errors import DataError

SHAPE = (20, 24, 16)
AFFINE = np.array([[-1.0, 0, 0, 19], [0, -1.0, 0, 23], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # LPS, like BraTS

# generic contrast -> (separator, suffix) per naming family
NAMINGS = {
    "2018": ("_", {"t1": "t1", "t2": "t2", "flair": "flair", "t1ce": "t1ce", "seg": "seg"}),
    "2023": ("-", {"t1": "t1n", "t2": "t2w", "flair": "t2f", "t1ce": "t1c", "seg": "seg"}),
}


def brain(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A skull-stripped-looking volume: positive ellipsoid, exact-zero background."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:3]], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    values = np.random.default_rng(seed).uniform(50, 1000, size=shape[:3]).astype(np.float32)
    return np.where(inside, values, 0).astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def file_name(subject: str, contrast: str, naming: str = "2018", ext: str = ".nii.gz") -> str:
    separator, suffixes = NAMINGS[naming]
    return f"{subject}{separator}{suffixes[contrast]}{ext}"


def make_brats(
    root: Path,
    ids: tuple[str, ...] = ("S01", "S02"),
    naming: str = "2018",
    ext: str = ".nii.gz",
    contrasts: tuple[str, ...] = ("t1", "t2"),
) -> Path:
    for n, subject in enumerate(ids):
        for c, contrast in enumerate(contrasts):
            data = tumour(naming) if contrast == "seg" else brain(10 * n + c)
            write(root / subject / file_name(subject, contrast, naming, ext), data)
    return root


def tumour(naming: str = "2018", shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A BraTS segmentation inside :func:`brain`: edema (2) around enhancing tumour (4, or 3 in 2023+) around core (1)."""
    seg = np.zeros(shape, np.uint8)
    seg[6:14, 7:15, 4:12] = 2
    seg[8:12, 9:13, 6:10] = 4 if naming == "2018" else 3
    seg[9:11, 10:12, 7:9] = 1
    return seg


def path_of(root: Path, subject: str, contrast: str) -> Path:
    return root / subject / file_name(subject, contrast)


# ------------------------------------------------------------ bad data, one per case


def test_truncated_gzip_names_subject_and_file(tmp_path):
    root = make_brats(tmp_path / "brats")
    bad = path_of(root, "S01", "t2")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated gzip") as info:
        BratsDataset(root=root).load("S01")
    assert str(info.value).startswith(f"subject S01: cannot read T2w file {bad}")
    assert "\n" not in str(info.value)


def test_text_file_named_nii_gz_is_not_a_nifti(tmp_path):
    root = make_brats(tmp_path / "brats")
    bad = path_of(root, "S02", "t2")
    bad.write_text("not an image\n")
    with pytest.raises(DataError, match="not a gzip file") as info:
        BratsDataset(root=root).load("S02")
    assert f"subject S02: cannot read T2w file {bad}" in str(info.value)


def test_gzipped_garbage_is_not_a_nifti(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(DataError, match=f"subject X: cannot read T1w file {bad}"):
        load_volume(bad, role="T1w", subject_id="X")


def test_2d_image_is_refused_with_its_shape(tmp_path):
    root = make_brats(tmp_path / "brats")
    bad = write(path_of(root, "S01", "t2"), brain()[:, :, 8])
    with pytest.raises(DataError, match=r"has shape \(20, 24\); expected a 3D volume") as info:
        BratsDataset(root=root).load("S01")
    assert f"subject S01: T2w file {bad}" in str(info.value)


def test_4d_image_is_refused_with_its_shape(tmp_path):
    root = make_brats(tmp_path / "brats")
    bad = write(path_of(root, "S01", "t1"), np.stack([brain()] * 3, axis=-1))
    with pytest.raises(DataError, match=r"has shape \(20, 24, 16, 3\)") as info:
        BratsDataset(root=root).load("S01")
    assert f"subject S01: T1w file {bad}" in str(info.value)


def test_4d_image_with_one_volume_is_squeezed(tmp_path):
    path = write(tmp_path / "x.nii.gz", brain()[..., None])
    volume = load_volume(path, role="T1w", subject_id="X")
    assert volume.array.shape == SHAPE


def test_shape_mismatch_names_both_files_and_shapes(tmp_path):
    root = make_brats(tmp_path / "brats")
    write(path_of(root, "S01", "t2"), brain()[:, :, :15])
    with pytest.raises(DataError) as info:
        BratsDataset(root=root).load("S01")
    message = str(info.value)
    assert message.startswith("subject S01:")
    assert str(path_of(root, "S01", "t1")) in message and str(path_of(root, "S01", "t2")) in message
    assert "(20, 24, 16)" in message and "(20, 24, 15)" in message


def test_affine_mismatch_is_refused(tmp_path):
    root = make_brats(tmp_path / "brats")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    write(path_of(root, "S01", "t2"), brain(), shifted)
    with pytest.raises(DataError, match="different affines") as info:
        BratsDataset(root=root).load("S01")
    assert "subject S01" in str(info.value) and str(path_of(root, "S01", "t2")) in str(info.value)


def test_affine_difference_below_tolerance_is_accepted(tmp_path):
    root = make_brats(tmp_path / "brats")
    nudged = AFFINE.copy()
    nudged[0, 3] += 1e-6
    write(path_of(root, "S01", "t2"), brain(), nudged)
    assert BratsDataset(root=root).load("S01").source.shape == SHAPE


def test_nan_voxels_are_counted(tmp_path):
    root = make_brats(tmp_path / "brats")
    data = brain()
    data[1, 2, 3] = data[4, 5, 6] = np.nan
    bad = write(path_of(root, "S01", "t2"), data)
    with pytest.raises(DataError, match=f"subject S01: T2w file {bad} has 2 NaN and 0 infinite voxels"):
        BratsDataset(root=root).load("S01")


def test_inf_voxels_are_counted(tmp_path):
    root = make_brats(tmp_path / "brats")
    data = brain()
    data[1, 2, 3], data[4, 5, 6], data[7, 8, 9] = np.inf, -np.inf, np.inf
    bad = write(path_of(root, "S01", "t1"), data)
    with pytest.raises(DataError, match=f"subject S01: T1w file {bad} has 0 NaN and 3 infinite voxels"):
        BratsDataset(root=root).load("S01")


def test_all_zero_volume_is_refused(tmp_path):
    root = make_brats(tmp_path / "brats")
    bad = write(path_of(root, "S02", "t2"), np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=f"subject S02: T2w file {bad} is all zeros"):
        BratsDataset(root=root).load("S02")


def test_subject_missing_its_t2(tmp_path):
    root = make_brats(tmp_path / "brats")
    path_of(root, "S02", "t2").unlink()
    with pytest.raises(DataError, match=f"subject S02: no T2w file S02_t2.nii\\[.gz\\] in {root / 'S02'}"):
        BratsDataset(root=root)


def test_duplicate_ids_from_nii_and_nii_gz(tmp_path):
    root = make_brats(tmp_path / "brats")
    write(root / "S01" / "S01_t1.nii", brain())
    with pytest.raises(DataError, match="duplicate subject id S01: two T1w files") as info:
        BratsDataset(root=root)
    assert str(root / "S01" / "S01_t1.nii") in str(info.value)


def test_duplicate_ids_in_two_folders(tmp_path):
    root = tmp_path / "brats"
    make_brats(root / "HGG", ids=("S01",))
    make_brats(root / "LGG", ids=("S01",))
    with pytest.raises(DataError, match="duplicate subject id S01") as info:
        BratsDataset(root=root)
    assert str(root / "HGG" / "S01") in str(info.value) and str(root / "LGG" / "S01") in str(info.value)


def test_root_with_no_subjects_says_what_was_looked_for(tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    write(tmp_path / "empty" / "notes" / "scan.nii.gz", brain())
    with pytest.raises(DataError, match="no BraTS subjects found under") as info:
        BratsDataset(root=tmp_path / "empty")
    assert "<id>/<id>_t1.nii[.gz]" in str(info.value) and "<id>/<id>-t1n.nii[.gz]" in str(info.value)


def test_root_missing(tmp_path):
    with pytest.raises(DataError, match=f"BraTS root {tmp_path / 'nowhere'} does not exist"):
        BratsDataset(root=tmp_path / "nowhere")


def test_root_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        BratsDataset(root=tmp_path / "file")


def test_folder_mixing_namings(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",))
    write(root / "S01" / "S01-t2w.nii.gz", brain())
    with pytest.raises(DataError, match=f"folder {root / 'S01'} mixes BraTS namings"):
        BratsDataset(root=root)


def test_root_mixing_namings(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("A",))
    make_brats(root, ids=("B",), naming="2023")
    with pytest.raises(DataError, match="mixes namings"):
        BratsDataset(root=root)


# ------------------------------------------------------------------- BraTS namings


@pytest.mark.parametrize(
    ("ids", "naming", "ext", "expected"),
    [
        (("Brats18_2013_2_1", "Brats18_CBICA_AAB_1"), "2018", ".nii.gz", "BraTS 2018-2021"),
        (("BraTS2021_00000", "BraTS2021_00002"), "2018", ".nii.gz", "BraTS 2018-2021"),
        (("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"), "2023", ".nii.gz", "BraTS 2023+"),
        (("Brats18_2013_2_1", "Brats18_CBICA_AAB_1"), "2018", ".nii", "BraTS 2018-2021"),
        (("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"), "2023", ".nii", "BraTS 2023+"),
    ],
)
def test_naming_detection(tmp_path, ids, naming, ext, expected):
    root = make_brats(tmp_path / "brats", ids=ids, naming=naming, ext=ext, contrasts=("t1", "t2", "flair", "seg"))
    assert detect_naming(root) == expected
    dataset = BratsDataset(root=root, source="t1", target="flair")
    assert dataset.subject_ids() == sorted(ids)
    volumes = dataset.load(ids[1])
    flair = nib.load(root / ids[1] / file_name(ids[1], "flair", naming, ext)).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(volumes.target, flair)
    np.testing.assert_array_equal(volumes.mask, volumes.source != 0)
    np.testing.assert_array_equal(volumes.affine, AFFINE)
    assert volumes.source_path.name == file_name(ids[1], "t1", naming, ext)


def test_nested_hgg_lgg_folders_and_hidden_files(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    make_brats(root / "HGG", ids=("H1", "H2"))
    make_brats(root / "LGG", ids=("L1",))
    (root / "HGG" / "H1" / "._H1_t1.nii.gz").write_bytes(b"macOS resource fork")
    assert BratsDataset(root=root).subject_ids() == ["H1", "H2", "L1"]


def test_find_subjects_and_source_only(tmp_path):
    root = make_brats(tmp_path / "brats", naming="2023")
    pairs = find_subjects(root, source="t1", target="t2")
    assert list(pairs) == ["S01", "S02"]
    assert pairs["S01"] == (root / "S01" / "S01-t1n.nii.gz", root / "S01" / "S01-t2w.nii.gz")
    inputs = make_brats(tmp_path / "inputs", naming="2023", contrasts=("t1",))
    assert find_source_only(inputs) == {s: inputs / s / f"{s}-t1n.nii.gz" for s in ("S01", "S02")}
    with pytest.raises(DataError, match="no T2w file"):
        find_subjects(inputs)


def test_mask_file_from_seg(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",), contrasts=("t1", "t2"))
    seg = np.zeros(SHAPE, np.float32)
    seg[5:10, 5:10, 5:10] = 2
    write(root / "S01" / "S01_seg.nii.gz", seg)
    volumes = BratsDataset(root=root, mask="seg").load("S01")
    np.testing.assert_array_equal(volumes.mask, seg != 0)


def test_unknown_contrast_is_a_config_error(tmp_path):
    from uqsynth.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown target contrast 't3'"):
        BratsDataset(root=make_brats(tmp_path / "brats"), target="t3")


# ------------------------------------------------------------------- load_pair / save


def test_load_volume_applies_scl_slope(tmp_path):
    img = nib.Nifti1Image(np.full(SHAPE, 3, np.int16), AFFINE)
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    volume = load_volume(tmp_path / "scaled.nii.gz", role="T1w", subject_id=None)
    assert volume.array.dtype == np.float32 and np.all(volume.array == 7.0)


def test_load_pair_mask_file_shape_must_match(tmp_path):
    t1, t2 = write(tmp_path / "t1.nii.gz", brain(1)), write(tmp_path / "t2.nii.gz", brain(2))
    mask = write(tmp_path / "mask.nii.gz", np.ones((20, 24, 15), np.uint8))
    with pytest.raises(DataError, match=rf"subject X: .*{mask.name} has shape \(20, 24, 15\)"):
        load_pair(t1, t2, subject_id="X", mask_path=mask)


def test_save_like_keeps_grid_header_codes_and_is_atomic(tmp_path):
    reference = nib.Nifti1Image(np.full(SHAPE, 3, np.int16), AFFINE)
    reference.header.set_slope_inter(2.0, 0.0)
    reference.set_qform(AFFINE, code=1)
    reference.set_sform(AFFINE, code=4)
    nib.save(reference, tmp_path / "ref.nii.gz")
    ref = load_volume(tmp_path / "ref.nii.gz", role="T1w", subject_id="X")
    out = tmp_path / "out" / "pred.nii.gz"
    out.parent.mkdir()
    values = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    save_like(values, ref.affine, ref.header, out)
    written = nib.load(out)
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), values)
    np.testing.assert_allclose(written.affine, AFFINE)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    assert [p.name for p in out.parent.iterdir()] == ["pred.nii.gz"]


def test_save_like_refuses_non_nifti_name(tmp_path):
    with pytest.raises(DataError, match="must end in .nii or .nii.gz"):
        save_like(brain(), AFFINE, None, tmp_path / "x.npy")


# ------------------------------------------------------------------- paired globs


def make_bids(root: Path, ids=("sub-01", "sub-02"), contrasts=("T1w", "FLAIR")) -> Path:
    for n, subject in enumerate(ids):
        for c, contrast in enumerate(contrasts):
            write(root / subject / "anat" / f"{subject}_{contrast}.nii.gz", brain(10 * n + c))
    return root


def test_paired_nifti_pairs_t1_with_flair(tmp_path):
    root = make_bids(tmp_path / "bids", contrasts=("T1w", "FLAIR", "T2w"))
    dataset = PairedNiftiDataset(root=root, source_glob="*/anat/*_T1w.nii.gz", target_glob="*/anat/*_FLAIR.nii.gz")
    assert dataset.subject_ids() == ["sub-01", "sub-02"]
    volumes = dataset.load("sub-02")
    np.testing.assert_array_equal(volumes.target, brain(11))
    assert volumes.target_path == root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"


def test_paired_nifti_subject_pattern_on_flat_folders(tmp_path):
    root = tmp_path / "ixi"
    for n, subject in enumerate(("IXI002-Guys-0828", "IXI012-HH-1211")):
        write(root / "T1" / f"{subject}-T1.nii.gz", brain(n))
        write(root / "T2" / f"{subject}-T2.nii.gz", brain(n + 5))
    dataset = PairedNiftiDataset(
        root=root, source_glob="T1/*.nii.gz", target_glob="T2/*.nii.gz", subject_pattern=r"(IXI\d+)"
    )
    assert dataset.subject_ids() == ["IXI002", "IXI012"]
    np.testing.assert_array_equal(dataset.load("IXI012").target, brain(6))


def test_paired_nifti_unmatched_source(tmp_path):
    root = make_bids(tmp_path / "bids")
    (root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz").unlink()
    with pytest.raises(DataError, match="subject sub-02: source file .*sub-02_T1w.nii.gz has no target file"):
        PairedNiftiDataset(root=root, source_glob="*/anat/*_T1w.nii.gz", target_glob="*/anat/*_FLAIR.nii.gz")


def test_paired_nifti_duplicate_ids(tmp_path):
    root = make_bids(tmp_path / "bids")
    write(root / "sub-01" / "anat" / "sub-01_run-2_T1w.nii.gz", brain())
    with pytest.raises(DataError, match="duplicate subject id sub-01: source_glob .* matches both"):
        PairedNiftiDataset(root=root, source_glob="*/anat/*_T1w.nii.gz", target_glob="*/anat/*_FLAIR.nii.gz")


def test_paired_nifti_nothing_matched(tmp_path):
    root = make_bids(tmp_path / "bids")
    with pytest.raises(DataError, match="no NIfTI files under .* match target_glob '\\*/anat/\\*_PD.nii.gz'"):
        PairedNiftiDataset(root=root, source_glob="*/anat/*_T1w.nii.gz", target_glob="*/anat/*_PD.nii.gz")


def test_paired_nifti_root_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PairedNiftiDataset(root=tmp_path / "nowhere", source_glob="*", target_glob="*")


# ------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_order_independent():
    ids = [f"S{i:03d}" for i in range(102)]
    first = split_subjects(ids, seed=3)
    assert first == split_subjects(list(reversed(ids)), seed=3)
    assert (len(first.train), len(first.test), len(first.calibration)) == (82, 20, 0)
    assert sorted(first.train + first.test) == ids
    assert first.test != split_subjects(ids, seed=4).test


def test_split_calibration_is_disjoint_and_keeps_the_test_set():
    ids = [f"S{i:02d}" for i in range(50)]
    plain = split_subjects(ids, seed=1)
    with_calibration = split_subjects(ids, seed=1, calibration_fraction=0.1)
    assert with_calibration.test == plain.test
    assert len(with_calibration.calibration) == 5
    assert not set(with_calibration.calibration) & set(with_calibration.train)
    assert sorted(with_calibration.train + with_calibration.calibration) == plain.train


def test_split_explicit_test_ids():
    ids = ["a", "b", "c", "d"]
    split = split_subjects(ids, test_ids=["d", "b"])
    assert split.test == ["b", "d"] and split.train == ["a", "c"]
    with pytest.raises(DataError, match="test_ids not among the dataset's subjects: x, y"):
        split_subjects(ids, test_ids=["y", "a", "x"])


def test_split_needs_one_train_and_one_test_subject():
    with pytest.raises(DataError, match="at least one train and one test"):
        split_subjects(["only"])
    with pytest.raises(DataError, match="at least one train and one test"):
        split_subjects(["a", "b"], test_ids=["a", "b"])
