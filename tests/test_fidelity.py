"""Fidelity: what the model is fed and how it is sampled match how it was trained.

- ``predict`` on a BraTS folder reads the contrast the run trained on, not always T1w;
- every volume gets its own dropout masks (seeded by the run seed and the subject id);
- evaluation and prediction see slices at the training scale (``load_size``), tiled;
- :mod:`uqsynth.predict` does not import :mod:`uqsynth.pipeline` (no import circle).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tomli_w
import torch
from test_data_nifti import brain, make_brats, path_of, write
from test_posterior import small_unet

from uqsynth.cli import main
from uqsynth.data.base import SubjectVolumes
from uqsynth.data.slices import EvalVolume, TrainSlices, from_model_range, tile_offsets, tile_window
from uqsynth.posterior import PosteriorSampler, SamplerOptions, volume_seed
from uqsynth.inference import map_file_names, posterior_maps

# ------------------------------------------------------------ the contrast predict reads


def _as_if_trained_on(run, root, contrast: str) -> None:
    """Make a run's saved configuration say its model was trained on BraTS ``contrast`` -> T2w."""
    config = tomllib.loads((run / "config.toml").read_text())
    config["data"].update(source="brats", root=str(root))
    config["data"]["brats"] = {"source": contrast, "target": "t2"}
    (run / "config.toml").write_text(tomli_w.dumps(config))


def _predicted_mean(out, stem: str) -> np.ndarray:
    return np.asarray(nib.load(out / map_file_names(stem, 0.95, "t2")["mean"]).dataobj)


@pytest.mark.parametrize("contrast", ["flair", "t1ce"])
def test_predict_on_a_brats_folder_reads_the_contrast_the_model_was_trained_on(contrast, smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    root = make_brats(tmp_path / "brats", ids=("S01",), contrasts=("t1", "t2", "flair", "t1ce"))
    write(path_of(root, "S01", "t1"), brain(seed=11))  # T1w unlike the other contrasts
    _as_if_trained_on(run, root, contrast)
    model = str(run / "mc_dropout")
    assert main(["predict", "--model", model, "--input", str(root), "--out", str(tmp_path / "folder")]) == 0
    # The same subject's file of that contrast, and its T1w, given directly under the subject's id.
    for name in (contrast, "t1"):
        direct = tmp_path / name / "S01.nii.gz"
        direct.parent.mkdir()
        shutil.copy(path_of(root, "S01", name), direct)
        assert main(["predict", "--model", model, "--input", str(direct), "--out", str(tmp_path / f"out-{name}")]) == 0
    from_folder = _predicted_mean(tmp_path / "folder", "S01")
    assert np.array_equal(from_folder, _predicted_mean(tmp_path / f"out-{contrast}", "S01"))
    assert not np.allclose(from_folder, _predicted_mean(tmp_path / "out-t1", "S01"))


def test_the_run_dataset_names_its_source_contrast(smoke_run, tmp_path):
    from uqsynth.config import load_config
    from uqsynth.inference import source_contrast

    assert source_contrast(load_config(smoke_run / "config.toml")) == "t1"  # the phantom's T1w
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    _as_if_trained_on(run, tmp_path, "t2")
    assert source_contrast(load_config(run / "config.toml")) == "t2"


# ------------------------------------------------------------ dropout masks per volume


def _volume(subject_id: str, seed: int = 3) -> SubjectVolumes:
    source = brain(seed=seed, shape=(16, 16, 6))
    return SubjectVolumes(subject_id=subject_id, source=source, target=None, mask=source != 0,
                          affine=np.eye(4))


def _std_map(sampler: PosteriorSampler, volume: SubjectVolumes) -> np.ndarray:
    return posterior_maps(sampler, EvalVolume(volume, image_size=16))["std"]


def test_each_volume_gets_its_own_dropout_masks_and_the_same_ones_every_time():
    sampler = PosteriorSampler(small_unet(), SamplerOptions(samples=4, seed=0))
    first, again = _std_map(sampler, _volume("A")), _std_map(sampler, _volume("A"))
    other = _std_map(sampler, _volume("B"))  # the same image under another id
    assert np.array_equal(first, again)
    brain_voxels = _volume("A").mask
    assert np.mean(first[brain_voxels] != other[brain_voxels]) > 0.9
    # The run seed still matters, and the key enters only through volume_seed.
    reseeded = PosteriorSampler(small_unet(), SamplerOptions(samples=4, seed=1))
    assert not np.array_equal(first, _std_map(reseeded, _volume("A")))
    assert volume_seed(0, "A") != volume_seed(0, "B") != volume_seed(1, "B")
    assert 0 <= volume_seed(2**32 - 1, "x" * 1000) < 2**63


def test_sampling_slices_without_a_key_keeps_the_options_seed():
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = PosteriorSampler(small_unet(), SamplerOptions(samples=3, seed=7))
    assert torch.equal(sampler.sample(x).variance, sampler.sample(x).variance)
    assert not torch.equal(sampler.sample(x).variance, sampler.sample(x, key="S01").variance)


# ------------------------------------------------------------ train/test scale


def _subject(shape=(24, 24, 5)) -> SubjectVolumes:
    source, target = brain(seed=1, shape=shape), brain(seed=2, shape=shape)
    mask = source != 0
    return SubjectVolumes(subject_id="S", source=source, target=np.where(mask, target, 0), mask=mask,
                          affine=np.eye(4))


class _FirstDataset:
    def __init__(self, volumes):
        self.volumes = volumes

    def load(self, subject_id):
        return self.volumes


def test_evaluation_tiles_are_the_training_crops_at_the_training_scale(monkeypatch):
    volumes = _subject()
    train = TrainSlices(_FirstDataset(volumes), ["S"], image_size=16, load_size=20, min_brain_fraction=0.0,
                        dtype=np.float32)
    evaluation = EvalVolume(volumes, image_size=16, load_size=20)
    assert tile_offsets(20, 16) == [0, 4] and evaluation.tiles == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert evaluation.source.shape == (len(evaluation) * 4, 1, 16, 16)
    for tile, corner in enumerate(evaluation.tiles):
        monkeypatch.setattr("uqsynth.data.slices.random_crop_offsets", lambda load, size, c=corner: c)
        for item, (_, slice_index) in enumerate(train.kept):
            crop = train[item]["source"]
            assert torch.allclose(evaluation.source[slice_index * 4 + tile], crop, atol=1e-6)


def test_tiles_blend_back_into_the_slice_and_their_disagreement_counts_as_spread():
    evaluation = EvalVolume(_subject(), image_size=16, load_size=22)
    n, tiles = len(evaluation), len(evaluation.tiles)
    image = torch.rand(n, 1, 22, 22, generator=torch.Generator().manual_seed(0))
    crops = evaluation._tile(image)
    mean, variance = evaluation.assemble(crops, torch.full_like(crops, 0.01))
    assert torch.allclose(mean, image, atol=1e-6) and torch.allclose(variance, torch.full_like(image, 0.01), atol=1e-6)
    # Two placements predicting differently: the mixture's variance grows by their spread.
    shifted = crops.clone().view(n, tiles, 1, 16, 16)
    shifted[:, 0] += 0.2
    _, spread = evaluation.assemble(shifted.flatten(0, 1), torch.zeros_like(crops))
    centre = slice(6, 16)  # covered by every tile (offsets 0 and 6)
    weights = torch.stack([tile_window(16)[6 - top : 16 - top, 6 - left : 16 - left]
                           for top, left in evaluation.tiles])
    share = weights[0] / weights.sum(0)
    expected = share * (1 - share) * 0.2**2
    assert torch.allclose(spread[:, 0, centre, centre], expected.expand(n, -1, -1).float(), atol=1e-6)


def test_one_tile_when_the_training_scale_is_the_network_size():
    volumes = _subject()
    plain, same = EvalVolume(volumes, image_size=16), EvalVolume(volumes, image_size=16, load_size=16)
    assert plain.tiles == same.tiles == [(0, 0)] and torch.equal(plain.source, same.source)
    maps = plain.to_native(from_model_range(plain.source))
    assert maps.shape == volumes.source.shape


def test_posterior_maps_at_the_training_scale_land_on_the_input_grid():
    volume = _volume("A")
    sampler = PosteriorSampler(small_unet(), SamplerOptions(samples=3, seed=0))
    maps = posterior_maps(sampler, EvalVolume(volume, image_size=16, load_size=20))
    assert maps["mean"].shape == maps["std"].shape == volume.source.shape
    assert np.all(maps["std"][volume.mask] > 0) and np.all(maps["mean"][~volume.mask] == 0)


# ------------------------------------------------------------ import structure


def test_predict_does_not_import_the_pipeline():
    """The library layer (predict) sits below the command's (pipeline): no import of it, even inside a function."""
    import uqsynth.predict

    tree = ast.parse(Path(uqsynth.predict.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "uqsynth.pipeline" not in imported
    code = "import sys, uqsynth.predict; sys.exit('uqsynth.pipeline' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
