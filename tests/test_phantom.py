"""The built-in phantom: deterministic, skull-stripped, physically plausible, writable."""

from __future__ import annotations

import functools
import json

import nibabel as nib
import numpy as np
import pytest

from uqsynth.data.phantom import (
    DEFAULT_SHAPE,
    REGION_LABELS,
    REGION_NAMES,
    T1W_SEQUENCE,
    T2W_SEQUENCE,
    TISSUES,
    PhantomDataset,
    make_phantom,
    make_subject,
    spin_echo,
    spoiled_gradient_echo,
    write_subjects,
)
from uqsynth.errors import DataError

SMALL = (48, 56, 40)  # 4 mm voxels: the same brain, coarser


@functools.lru_cache(maxsize=None)
def phantom(index: int, seed: int = 0, lesion_probability: float = 0.7):
    """Generated once per test session; tests must not modify the arrays."""
    return make_phantom(index, seed=seed, shape=SMALL, lesion_probability=lesion_probability)


def contrast(a: float, b: float) -> float:
    """Relative difference, |a - b| / mean(a, b)."""
    return abs(a - b) / (0.5 * (a + b))


def pure(subject, tissue: str) -> np.ndarray:
    """Voxels made almost only of one tissue (no partial volume)."""
    return subject.fractions[tissue] > 0.95


# --- determinism ---------------------------------------------------------------------


def test_same_seed_and_index_give_identical_volumes():
    first = make_subject(3, seed=7, shape=SMALL)
    again = make_subject(3, seed=7, shape=SMALL)
    np.testing.assert_array_equal(first.source, again.source)
    np.testing.assert_array_equal(first.target, again.target)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.info == again.info


def test_different_subjects_and_seeds_differ():
    base = phantom(0).volumes
    for other in (phantom(1).volumes, phantom(0, seed=1).volumes):
        assert not np.array_equal(base.mask, other.mask)
        assert other.info["tissues"] != base.info["tissues"]


# --- what the arrays look like -----------------------------------------------------------


def test_skull_stripped_zero_outside_mask_positive_inside():
    for index in range(3):
        volumes = phantom(index).volumes
        assert volumes.mask.dtype == bool
        assert 0.15 < volumes.mask.mean() < 0.7  # a brain, not an empty or full box
        for image in (volumes.source, volumes.target):
            assert np.all(image[~volumes.mask] == 0)
            assert np.all(image[volumes.mask] > 0)
            assert np.all(np.isfinite(image))


def test_shapes_dtypes_affine_and_info():
    volumes = phantom(2).volumes
    assert volumes.subject_id == "phantom-002"
    for array in (volumes.source, volumes.target, volumes.mask):
        assert array.shape == SMALL
    assert volumes.source.dtype == volumes.target.dtype == np.float32
    assert nib.aff2axcodes(volumes.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(volumes.affine)[:3], [4.0, 4.0, 4.0])
    centre = volumes.affine @ [*(np.array(SMALL) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    info = json.loads(json.dumps(volumes.info))  # serializable, as provenance needs
    assert set(info["tissues"]) == set(TISSUES)
    assert isinstance(info["lesion"], bool)
    lo, hi = T2W_SEQUENCE["te_ms"]
    assert lo <= info["t2w"]["te_ms"] <= hi
    lo, hi = T1W_SEQUENCE["flip_deg"]
    assert lo <= info["t1w"]["flip_deg"] <= hi


def test_default_shape_holds_the_whole_brain():
    volumes = make_subject(0)
    assert volumes.source.shape == DEFAULT_SHAPE
    voxel = np.diag(volumes.affine)[:3]
    np.testing.assert_allclose(voxel, voxel[0])  # isotropic
    assert 1.0 <= voxel[0] <= 2.0  # fine enough to show the cortical ribbon
    mask = volumes.mask
    # The brain is not cropped: no brain voxel on any face of the field of view.
    for axis in range(3):
        assert not np.take(mask, 0, axis=axis).any()
        assert not np.take(mask, -1, axis=axis).any()
    # Axial slices (axis 2 is inferior -> superior) are roughly square.
    assert 0.7 < DEFAULT_SHAPE[0] / DEFAULT_SHAPE[1] < 1.3


def test_partial_volume_fractions_are_soft_and_sum_to_one():
    subject = phantom(0)
    mask = subject.volumes.mask
    total = sum(subject.fractions.values())
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-5)
    mixed = np.max(np.stack(list(subject.fractions.values())), axis=0)[mask] < 0.9
    assert mixed.mean() > 0.05  # boundaries are not binary


def test_bias_fields_are_smooth_modest_and_differ_between_contrasts():
    subject = phantom(0)
    mask = subject.volumes.mask
    for bias in (subject.bias_t1w, subject.bias_t2w):
        assert 0.78 < bias[mask].min() and bias[mask].max() < 1.25
        assert bias[mask].max() / bias[mask].min() > 1.1  # present, not a constant
    assert not np.allclose(subject.bias_t1w, subject.bias_t2w)


# --- physics --------------------------------------------------------------------------------


def _signals(tissue: str) -> tuple[float, float]:
    values = TISSUES[tissue].midpoint()
    t1w = {k: (lo + hi) / 2 for k, (lo, hi) in T1W_SEQUENCE.items()}
    t2w = {k: (lo + hi) / 2 for k, (lo, hi) in T2W_SEQUENCE.items()}
    return float(spoiled_gradient_echo(**values, **t1w)), float(spin_echo(**values, **t2w))


def test_table_values_make_edema_and_grey_matter_alike_in_t1w_only():
    gm_t1w, gm_t2w = _signals("grey_matter")
    edema_t1w, edema_t2w = _signals("edema")
    assert contrast(gm_t1w, edema_t1w) < contrast(gm_t2w, edema_t2w) / 3


@pytest.mark.parametrize("index", range(4))
def test_generated_edema_and_grey_matter_alike_in_t1w_only(index):
    subject = phantom(index, lesion_probability=1.0)
    volumes = subject.volumes
    gm, edema = pure(subject, "grey_matter"), pure(subject, "edema")
    assert volumes.info["lesion"] and edema.sum() > 20 and gm.sum() > 20
    t1w = contrast(volumes.source[gm].mean(), volumes.source[edema].mean())
    t2w = contrast(volumes.target[gm].mean(), volumes.target[edema].mean())
    assert t2w > 0.25  # edema is obviously brighter than cortex in T2w ...
    assert t1w < t2w / 2  # ... and far less distinct in T1w


def test_csf_is_bright_in_t2w_and_dark_in_t1w_relative_to_white_matter():
    for index in range(3):
        subject = phantom(index)
        volumes = subject.volumes
        csf, wm = pure(subject, "csf"), pure(subject, "white_matter")
        assert volumes.source[csf].mean() < 0.8 * volumes.source[wm].mean()
        assert volumes.target[csf].mean() > 2.0 * volumes.target[wm].mean()


def test_lesion_probability_zero_and_one():
    for index in range(3):
        assert not phantom(index, lesion_probability=0.0).volumes.info["lesion"]
        assert not phantom(index, lesion_probability=0.0).fractions["edema"].any()
        assert phantom(index, lesion_probability=1.0).volumes.info["lesion"]


# --- the dataset -----------------------------------------------------------------------------


# --- region labels -------------------------------------------------------------------


def test_every_brain_voxel_is_labelled_with_its_dominant_tissue():
    for index in range(3):
        subject = phantom(index)
        volumes = subject.volumes
        assert volumes.regions.shape == volumes.mask.shape and volumes.regions.dtype.kind == "i"
        assert (volumes.regions[volumes.mask] > 0).all() and (volumes.regions[~volumes.mask] == 0).all()
        stack = np.stack([subject.fractions[name] for name in TISSUES])
        dominant = np.array([REGION_LABELS[name] for name in TISSUES])[np.argmax(stack, axis=0)]
        np.testing.assert_array_equal(volumes.regions[volumes.mask], dominant[volumes.mask])
        assert set(np.unique(volumes.regions)) <= {0, *volumes.region_names}


def test_region_names_are_the_tissues_readable_names():
    assert REGION_NAMES == {1: "CSF", 2: "grey matter", 3: "white matter", 4: "edema", 5: "enhancing rim",
                            6: "necrotic core"}
    assert phantom(0).volumes.region_names == REGION_NAMES


@pytest.mark.parametrize("index", [0, 3, 4])
def test_a_drawn_lesion_gives_its_three_parts_as_regions(index):
    volumes = phantom(index, lesion_probability=1.0).volumes
    names = {volumes.region_names[label] for label in np.unique(volumes.regions[volumes.mask])}
    assert {"white matter", "grey matter", "CSF", "edema", "enhancing rim", "necrotic core"} == names


def test_no_lesion_no_lesion_regions():
    volumes = phantom(1, lesion_probability=0.0).volumes
    names = {volumes.region_names[label] for label in np.unique(volumes.regions[volumes.mask])}
    assert names == {"white matter", "grey matter", "CSF"}


def test_dataset_loads_regions_as_copies():
    dataset = PhantomDataset(subjects=2, shape=SMALL)
    first = dataset.load("phantom-000")
    first.regions[...] = 0
    first.region_names.clear()
    again = dataset.load("phantom-000")
    assert (again.regions[again.mask] > 0).all() and again.region_names == REGION_NAMES


def test_dataset_lists_and_loads_subjects():
    dataset = PhantomDataset(subjects=3, seed=5, shape=SMALL)
    assert dataset.subject_ids() == ["phantom-000", "phantom-001", "phantom-002"]
    assert len(dataset) == 3
    loaded = dataset.load("phantom-001")
    expected = make_subject(1, seed=5, shape=SMALL)
    np.testing.assert_array_equal(loaded.source, expected.source)
    np.testing.assert_array_equal(loaded.target, expected.target)
    loaded.source[...] = -1  # a caller normalizing in place must not corrupt later loads
    np.testing.assert_array_equal(dataset.load("phantom-001").source, expected.source)


def test_dataset_unknown_subject_is_named():
    dataset = PhantomDataset(subjects=2, shape=SMALL)
    with pytest.raises(DataError, match="phantom-007"):
        dataset.load("phantom-007")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"subjects": 0}, "subjects"),
        ({"shape": (48, 56, 8)}, "shape"),
        ({"shape": (48, 56)}, "shape"),
        ({"lesion_probability": 1.5}, "lesion_probability"),
        ({"lesion_probability": -0.1}, "lesion_probability"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_dataset_parameters_raise_data_error(kwargs, named):
    with pytest.raises(DataError, match=named) as caught:
        PhantomDataset(**kwargs)
    assert "\n" not in str(caught.value)


def test_bad_generator_parameters_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="voxel_size_mm"):
        make_subject(0, shape=SMALL, voxel_size_mm=0.0)
    with pytest.raises(DataError, match="index"):
        make_subject(-1, shape=SMALL)
    with pytest.raises(DataError, match="orientation"):
        write_subjects(tmp_path, 1, shape=SMALL, orientation="XYZ")
    with pytest.raises(DataError, match="subjects"):
        write_subjects(tmp_path, 0, shape=SMALL)


# --- writing NIfTI --------------------------------------------------------------------------


def test_write_subjects_uses_brats_2023_names_and_round_trips(tmp_path):
    directories = write_subjects(tmp_path / "out", 2, seed=3, shape=SMALL)
    assert [d.name for d in directories] == ["phantom-000", "phantom-001"]
    for index, directory in enumerate(directories):
        sid = directory.name
        names = sorted(p.name for p in directory.iterdir())  # no temporary files left behind
        assert names == [f"{sid}-t1n.nii.gz", f"{sid}-t2w.nii.gz"]
        expected = make_subject(index, seed=3, shape=SMALL)
        for suffix, array in (("t1n", expected.source), ("t2w", expected.target)):
            image = nib.load(directory / f"{sid}-{suffix}.nii.gz")
            assert image.get_data_dtype() == np.float32
            assert int(image.header["qform_code"]) > 0 and int(image.header["sform_code"]) > 0
            np.testing.assert_allclose(image.affine, expected.affine)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), array)


def test_write_subjects_lps_is_the_same_image_in_world_space(tmp_path):
    (ras_dir,) = write_subjects(tmp_path / "ras", 1, shape=SMALL)
    (lps_dir,) = write_subjects(tmp_path / "lps", 1, shape=SMALL, orientation="LPS")
    ras = nib.load(ras_dir / "phantom-000-t2w.nii.gz")
    lps = nib.load(lps_dir / "phantom-000-t2w.nii.gz")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert not np.array_equal(np.asanyarray(lps.dataobj), np.asanyarray(ras.dataobj))
    canonical = nib.as_closest_canonical(lps)
    np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-9)
    np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), np.asanyarray(ras.dataobj))


# --- the T1w protocol ------------------------------------------------------------------


@pytest.mark.parametrize("index", range(4))
def test_a_steeper_t1w_flip_shows_the_edema_against_white_matter_and_changes_nothing_else(index):
    default = phantom(index, lesion_probability=1.0)
    steep = make_phantom(index, shape=SMALL, lesion_probability=1.0, t1w_flip_deg=(20.0, 30.0))
    np.testing.assert_array_equal(steep.volumes.target, default.volumes.target)  # same draws, same T2w
    assert 20.0 <= steep.volumes.info["t1w"]["flip_deg"] <= 30.0
    assert {k: v for k, v in steep.volumes.info.items() if k != "t1w"} == {
        k: v for k, v in default.volumes.info.items() if k != "t1w"
    }
    wm, edema, gm = pure(default, "white_matter"), pure(default, "edema"), pure(default, "grey_matter")

    def t1w_contrast(subject, a, b):
        return contrast(subject.volumes.source[a].mean(), subject.volumes.source[b].mean())

    # Edema moves away from white matter in the T1w (at 10-15 degrees it can read within 1 % of it) ...
    assert t1w_contrast(steep, wm, edema) > t1w_contrast(default, wm, edema) + 0.02
    # ... and still looks like grey matter there, unlike in the T2w.
    t2w = contrast(steep.volumes.target[gm].mean(), steep.volumes.target[edema].mean())
    assert t1w_contrast(steep, gm, edema) < t2w / 2


@pytest.mark.parametrize("bad", [(30.0, 20.0), (0.0, 10.0), (10.0, 95.0), (10.0,), "steep", (True, 20.0)])
def test_a_t1w_flip_range_that_is_not_two_angles_is_refused_by_name(bad):
    with pytest.raises(DataError, match="t1w_flip_deg must be two angles"):
        PhantomDataset(subjects=2, t1w_flip_deg=bad)
