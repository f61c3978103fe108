"""Shared slice preprocessing: orientation, normalization, training and evaluation slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from uqsynth.data.base import Dataset, SubjectVolumes
from uqsynth.data.slices import (
    EvalVolume,
    TrainSlices,
    axial_axis,
    from_axial_slices,
    from_model_range,
    normalize_slices,
    to_axial_slices,
)
from uqsynth.errors import DataError

RAS = np.diag([2.0, 2.0, 3.0, 1.0])


def world_volume(shape=(20, 24, 16), seed=0) -> np.ndarray:
    """Random values on a RAS grid (x to the right, y anterior, z superior)."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def stored_as(volume: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]):
    """The same image stored in another axis order/direction, as a scanner could write it."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(axcodes))
    data = np.ascontiguousarray(apply_orientation(volume, transform))
    return data, affine @ inv_ornt_aff(transform, volume.shape)


STORAGES = {
    "RAS": ("R", "A", "S"),
    "LPS": ("L", "P", "S"),
    "sagittal": ("S", "A", "L"),  # array axis 2 is left-right: each [:, :, k] is a sagittal slice
}


@pytest.mark.parametrize(("name", "expected_axis"), [("RAS", 2), ("LPS", 2), ("sagittal", 0)])
def test_axial_axis_follows_the_affine(name, expected_axis):
    _, affine = stored_as(world_volume(), RAS, STORAGES[name])
    assert axial_axis(affine) == expected_axis


def test_axial_slices_are_the_same_in_world_terms_for_every_storage():
    world = world_volume()
    reference = to_axial_slices(world, RAS)
    # canonical view: inferior -> superior, rows anterior -> posterior, columns right -> left
    np.testing.assert_array_equal(reference, world[::-1, ::-1, :].transpose(2, 1, 0))
    for name, axcodes in STORAGES.items():
        data, affine = stored_as(world, RAS, axcodes)
        assert aff2axcodes(affine) == axcodes
        np.testing.assert_array_equal(to_axial_slices(data, affine), reference, err_msg=name)


@pytest.mark.parametrize("name", list(STORAGES))
def test_from_axial_slices_round_trip_is_exact(name):
    data, affine = stored_as(world_volume(seed=1), RAS, STORAGES[name])
    slices = to_axial_slices(data, affine)
    restored = from_axial_slices(slices, affine, data.shape)
    assert restored.dtype == data.dtype and restored.shape == data.shape
    assert np.array_equal(restored, data)


def test_from_axial_slices_checks_the_shape():
    slices = to_axial_slices(world_volume(), RAS)
    with pytest.raises(ValueError, match="not"):
        from_axial_slices(slices, RAS, (16, 24, 20))


def test_normalization_range_and_robust_max():
    rng = np.random.default_rng(0)
    slices = rng.uniform(100, 200, size=(3, 30, 30)).astype(np.float32)
    mask = np.zeros(slices.shape, bool)
    mask[:, 5:25, 5:25] = True
    slices[~mask] = 0
    slices[0, 10, 10] = 1e6  # one hot voxel must not squash the slice
    slices[1, 12, 12] = -5.0  # undershoot is clipped to 0
    mask[2] = False  # no brain: scale 0, all zeros
    normalized, scales = normalize_slices(slices, mask)
    assert normalized.dtype == np.float32 and normalized.min() >= 0 and normalized.max() <= 1
    for k in (0, 1):
        assert scales[k] == pytest.approx(np.percentile(slices[k][mask[k]], 99.5), rel=1e-6)
    assert scales[0] < 250  # robust: the 1e6 voxel is ignored
    assert np.median(normalized[0][mask[0]]) > 0.5
    assert normalized[0, 10, 10] == 1.0 and normalized[1, 12, 12] == 0.0
    assert scales[2] == 0 and not normalized[2].any()
    inside = mask[1] & (slices[1] >= 0) & (slices[1] < scales[1])
    np.testing.assert_allclose(normalized[1][inside] * scales[1], slices[1][inside], rtol=1e-5)


# --------------------------------------------------------------- datasets in memory


class MemoryDataset(Dataset):
    """Subjects whose brain is a box on axial slices 3..12 (slice 3 a tiny sliver)."""

    def __init__(self, ids=("a", "b"), shape=(20, 24, 16), affine=RAS):
        self.ids, self.shape, self.affine = list(ids), shape, affine

    def subject_ids(self):
        return self.ids

    def load(self, subject_id):
        seed = self.ids.index(subject_id)
        rng = np.random.default_rng(seed)
        mask = np.zeros(self.shape, bool)
        mask[4:16, 4:20, 4:13] = True
        mask[10, 10, 3] = True  # 1 voxel of 480: below 2 %, skipped for training
        source = np.where(mask, rng.uniform(100, 900, self.shape), 0).astype(np.float32)
        target = np.where(mask, rng.uniform(10, 90, self.shape), 0).astype(np.float32)
        return SubjectVolumes(subject_id, source, target, mask, self.affine)


def test_train_slices_shapes_ranges_and_skipping():
    torch.manual_seed(0)
    slices = TrainSlices(MemoryDataset(), ["a", "b"], image_size=16, load_size=20)
    assert len(slices) == 2 * 9
    assert slices.kept[:9] == [("a", k) for k in range(4, 13)]
    item = slices[0]
    assert set(item) == {"source", "target", "mask", "subject_id", "slice_index"}
    for key in ("source", "target"):
        assert item[key].shape == (1, 16, 16) and item[key].dtype == torch.float32
        assert item[key].min() >= -1 and item[key].max() <= 1
    assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.bool
    assert item["target"].max() > 0 and item["target"].min() == -1  # brain and background
    assert (item["subject_id"], item["slice_index"]) == ("a", 4)
    stored = slices._subjects[0]
    assert stored.source.dtype == np.float16 and stored.target.max() == 1.0  # robust max maps to 1


def test_train_slices_without_skipping_keeps_every_slice_with_brain():
    slices = TrainSlices(MemoryDataset(), ["a"], image_size=16, load_size=20, min_brain_fraction=0.0)
    assert [k for _, k in slices.kept] == list(range(3, 13))


def test_train_slices_crop_is_reproducible_from_the_torch_seed():
    slices = TrainSlices(MemoryDataset(), ["a"], image_size=12, load_size=20, dtype=np.float32)
    torch.manual_seed(7)
    first = [slices[i]["source"] for i in range(len(slices))]
    torch.manual_seed(7)
    again = [slices[i]["source"] for i in range(len(slices))]
    torch.manual_seed(8)
    other = [slices[i]["source"] for i in range(len(slices))]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_train_slices_crop_is_reproducible_with_dataloader_workers():
    slices = TrainSlices(MemoryDataset(), ["a", "b"], image_size=12, load_size=20)

    def run():
        loader = torch.utils.data.DataLoader(
            slices, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(3)
        )
        return [(batch["source"], batch["slice_index"]) for batch in loader]

    for (x, i), (y, j) in zip(run(), run(), strict=True):
        assert torch.equal(x, y) and torch.equal(i, j)


def test_train_slices_without_crop_margin_is_deterministic():
    slices = TrainSlices(MemoryDataset(), ["a"], image_size=16, load_size=16)
    assert torch.equal(slices[3]["target"], slices[3]["target"])


def test_train_slices_with_no_usable_slice_is_a_data_error():
    with pytest.raises(DataError, match="no training slices"):
        TrainSlices(MemoryDataset(), ["a"], image_size=16, load_size=20, min_brain_fraction=0.9)


@pytest.mark.parametrize("name", list(STORAGES))
def test_eval_volume_maps_back_to_the_input_grid(name):
    base = MemoryDataset().load("a")
    source, affine = stored_as(base.source, RAS, STORAGES[name])
    target, _ = stored_as(base.target, RAS, STORAGES[name])
    mask, _ = stored_as(base.mask, RAS, STORAGES[name])
    volumes = SubjectVolumes("a", source, target, mask, affine)
    evaluation = EvalVolume(volumes, image_size=32)
    assert len(evaluation) == 16 and evaluation.source.shape == (16, 1, 32, 32)
    assert evaluation.source.min() >= -1 and evaluation.source.max() <= 1
    batches = list(evaluation.batches(5))
    assert [b.shape[0] for _, b in batches] == [5, 5, 5, 1]  # brainless slices included
    native = evaluation.to_native(torch.ones(16, 1, 32, 32))
    assert native.shape == source.shape and native.dtype == np.float32
    assert not native[~mask].any()
    np.testing.assert_allclose(native[mask], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(evaluation.native_mask(), mask)


def test_eval_volume_round_trip_at_native_size_and_rescale():
    volumes = MemoryDataset(shape=(24, 24, 16)).load("b")
    evaluation = EvalVolume(volumes, image_size=24)  # square native slices: resizing is the identity
    truth = evaluation.normalized_target()
    predicted = evaluation.to_native(from_model_range(evaluation.target))
    np.testing.assert_allclose(predicted, truth, atol=1e-6)
    assert truth.max() <= 1 and truth.min() >= 0 and not truth[~volumes.mask].any()
    rescaled = evaluation.to_native(from_model_range(evaluation.target), rescale=True)
    below_max = volumes.mask & (truth < 1)  # voxels above the robust max were clipped
    np.testing.assert_allclose(rescaled[below_max], volumes.target[below_max], rtol=1e-4)


def test_eval_volume_without_target_for_prediction():
    volumes = MemoryDataset().load("a")
    volumes.target = None
    evaluation = EvalVolume(volumes, image_size=16)
    assert evaluation.target is None
    assert evaluation.to_native(torch.zeros(16, 16, 16)).shape == (20, 24, 16)
    with pytest.raises(ValueError, match="no target"):
        evaluation.to_native(torch.zeros(16, 16, 16), rescale=True)


def test_axial_subsample_keeps_every_kth_axial_slice_whatever_the_orientation():
    """Calibration's slice stride: the thinner subject's slices are exactly the chosen slices of the full one."""
    from uqsynth.data.phantom import make_phantom
    from uqsynth.data.slices import axial_subsample

    loaded = make_phantom(0, shape=(24, 28, 20), seed=2).volumes
    for affine in (np.diag([2.0, 2.0, 3.0, 1.0]), np.array([[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])):
        volumes = SubjectVolumes("s", loaded.source, loaded.target, loaded.mask, affine)
        full = to_axial_slices(volumes.source, affine)
        thin = axial_subsample(volumes, 3)
        assert np.array_equal(to_axial_slices(thin.source, thin.affine), full[::3])
        assert np.array_equal(to_axial_slices(thin.mask, thin.affine), to_axial_slices(volumes.mask, affine)[::3])
        assert axial_axis(thin.affine) == axial_axis(affine)
    assert axial_subsample(volumes, 1) is volumes
