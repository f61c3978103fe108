"""BraTS segmentations as region labels: present, absent, on the wrong grid, with labels of no release."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_nifti import AFFINE, SHAPE, file_name, make_brats, tumour, write

from uqsynth.data.brats import NON_TUMOUR_LABEL, NON_TUMOUR_NAME, BratsDataset
from uqsynth.data.slices import EvalVolume
from uqsynth.errors import DataError


@pytest.mark.parametrize(("naming", "enhancing"), [("2018", 4), ("2023", 3)])
def test_seg_file_gives_tumour_parts_and_the_rest_of_the_brain(tmp_path, naming, enhancing):
    root = make_brats(tmp_path / "brats", ids=("S01",), naming=naming, contrasts=("t1", "t2", "seg"))
    volumes = BratsDataset(root=root).load("S01")
    seg = tumour(naming)
    assert volumes.regions.shape == SHAPE
    np.testing.assert_array_equal(volumes.regions[seg > 0], seg[seg > 0])
    rest = (seg == 0) & volumes.mask
    assert rest.any() and (volumes.regions[rest] == NON_TUMOUR_LABEL).all()
    assert (volumes.regions[(seg == 0) & ~volumes.mask] == 0).all()
    assert volumes.region_names == {1: "necrotic/non-enhancing core", 2: "edema", enhancing: "enhancing tumour",
                                    NON_TUMOUR_LABEL: NON_TUMOUR_NAME}
    assert volumes.info["seg_path"] == root / "S01" / file_name("S01", "seg", naming)
    assert {volumes.region_names[v] for v in np.unique(volumes.regions[volumes.mask])} == {
        "necrotic/non-enhancing core", "edema", "enhancing tumour", "non-tumour brain"}


def test_seg_is_used_so_the_scan_does_not_list_it_as_left_out(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",), contrasts=("t1", "t2", "seg"))
    assert not any("not asked for" in line for line in BratsDataset(root=root).scan_summary())
    assert any("contrasts not asked for: seg" in line for line in BratsDataset(root=root, regions=False).scan_summary())


def test_missing_seg_gives_no_regions_and_other_subjects_keep_theirs(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01", "S02"))
    write(root / "S02" / file_name("S02", "seg"), tumour())
    dataset = BratsDataset(root=root)
    without = dataset.load("S01")
    assert without.regions is None and without.region_names == {}
    assert dataset.load("S02").regions is not None


def test_regions_false_ignores_the_seg(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",), contrasts=("t1", "t2", "seg"))
    volumes = BratsDataset(root=root, regions=False).load("S01")
    assert volumes.regions is None and "seg_path" not in volumes.info


def test_seg_of_another_shape_is_one_line_naming_the_file(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",))
    seg = write(root / "S01" / "S01_seg.nii.gz", np.zeros((20, 24, 15), np.uint8))
    with pytest.raises(DataError) as caught:
        BratsDataset(root=root).load("S01")
    message = str(caught.value)
    assert "\n" not in message and str(seg) in message and "(20, 24, 15)" in message and str(SHAPE) in message


def test_seg_with_another_affine_is_refused(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",))
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    seg = write(root / "S01" / "S01_seg.nii.gz", tumour(), affine=shifted)
    with pytest.raises(DataError, match="different affines") as caught:
        BratsDataset(root=root).load("S01")
    assert str(seg) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("naming", "bad"), [("2018", [3, 7]), ("2023", [4])])
def test_unknown_labels_are_named(tmp_path, naming, bad):
    root = make_brats(tmp_path / "brats", ids=("S01",), naming=naming)
    seg = tumour(naming)
    for k, value in enumerate(bad):
        seg[2 + k, 12, 8] = value
    path = write(root / "S01" / file_name("S01", "seg", naming), seg)
    with pytest.raises(DataError) as caught:
        BratsDataset(root=root).load("S01")
    message = str(caught.value)
    assert str(path) in message and f"label value(s) {', '.join(map(str, bad))}," in message
    assert "regions = false" in message and "\n" not in message


def test_fractional_labels_are_refused(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",))
    seg = tumour().astype(np.float32)
    seg[10, 11, 8] = 1.5
    write(root / "S01" / "S01_seg.nii.gz", seg)
    with pytest.raises(DataError, match=r"not whole numbers \(1\.5\)"):
        BratsDataset(root=root).load("S01")


def test_a_seg_without_tumour_is_all_non_tumour_brain(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01",))
    write(root / "S01" / "S01_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    volumes = BratsDataset(root=root).load("S01")
    assert (volumes.regions[volumes.mask] == NON_TUMOUR_LABEL).all()


def test_eval_volume_gives_the_labels_in_the_native_grid(tmp_path):
    root = make_brats(tmp_path / "brats", ids=("S01", "S02"))
    write(root / "S01" / "S01_seg.nii.gz", tumour())
    dataset = BratsDataset(root=root)
    volumes = dataset.load("S01")
    evaluation = EvalVolume(volumes, image_size=16)
    np.testing.assert_array_equal(evaluation.native_regions(), volumes.regions)
    assert evaluation.region_names == volumes.region_names
    assert EvalVolume(dataset.load("S02"), image_size=16).native_regions() is None
    volumes.regions = volumes.regions[:, :, :-1]
    with pytest.raises(DataError, match="regions"):
        EvalVolume(volumes, image_size=16)
