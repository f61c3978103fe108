"""The library: a trained arm that turns a source volume into its posterior maps (``uqsynth.load``).

``uqsynth.load(RUN/<arm>)`` rebuilds the arm's generator from the run's
``config.toml`` and reads its weights (``generator.safetensors``; no code
is unpickled). :meth:`Synthesizer.predict` takes a NIfTI path, a nibabel
image or a numpy array with its affine and returns a :class:`Posterior`:
the MC mean and the std (total, epistemic, aleatoric) per voxel, mapped
back to the input's grid, orientation and affine, and the central interval
at any level from the arm's fitted calibrator. ``uqsynth predict`` is this,
called per input file (:mod:`uqsynth.predict`), so a notebook and the
command line give the same numbers for the same input and seed.

The engine draws T samples per axial slice (per tile of it, at the training
scale: :class:`~uqsynth.data.slices.EvalVolume`). Intensities are on the
normalized [0, 1] scale the model was trained on (each slice divided by its
99.5th percentile of brain voxels). Errors are one-line
:class:`~uqsynth.errors.UserError` exceptions naming the path or argument.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from uqsynth._files import atomic_write_text
from uqsynth.calibration.base import Calibrator
from uqsynth.certificate import certificate, certificate_path, interval_entry, write_certificate
from uqsynth.config import Config, load_config
from uqsynth.data.base import SubjectVolumes
from uqsynth.data.brats import CONTRASTS, ROLES
from uqsynth.data.inputs import BIDS_SUFFIX, volume_id
from uqsynth.data.nifti import is_nifti, load_source, nifti_like, save_like, source_from_array
from uqsynth.data.slices import EvalVolume
from uqsynth.devices import resolve_device
from uqsynth.errors import ConfigError, DataError
from uqsynth.likelihoods import Likelihood
from uqsynth.model_files import load_tensors
from uqsynth.models.base import Generator
from uqsynth.plugins import PluginHost, get_host
from uqsynth.posterior import PosteriorSampler, SamplerOptions, gaussian_interval
from uqsynth.run_directory import ArmPaths, outputs_difference
from uqsynth.training import GENERATOR_WEIGHTS, build_generator, build_likelihood

#: The maps of a volume's posterior: mean, total std and its two parts.
STD_MAPS = ("mean", "std", "std_epistemic", "std_aleatoric")

#: Every map written per volume: :data:`STD_MAPS` and the central interval's bounds.
MAPS = (*STD_MAPS, "lower", "upper")


@dataclass
class TrainedArm:
    """A trained arm: its run's configuration, its name, its generator and the likelihood of its outputs."""

    config: Config
    name: str
    generator: Generator
    likelihood: Likelihood


def load_arm(model_dir: str | Path, host: PluginHost | None = None, *, where: str | None = None) -> TrainedArm:
    """Rebuild ``RUN/<arm>``'s generator from the run's configuration and load its weights.

    Errors are one line beginning with ``where`` (default ``model <dir>``;
    the command line passes ``--model <dir>``).
    """
    model_dir = Path(model_dir)
    where = where or f"model {model_dir}"
    config_path = model_dir.parent / "config.toml"
    weights = model_dir / GENERATOR_WEIGHTS
    if not model_dir.is_dir():
        raise ConfigError(f"{where}: no such directory (expected RUN/<arm>)")
    if not config_path.is_file():
        raise ConfigError(f"{where}: no config.toml in {model_dir.parent} (expected RUN/<arm>)")
    if not weights.is_file():
        raise ConfigError(f"{where}: no {GENERATOR_WEIGHTS} (has this arm finished training?)")
    host = host or get_host()
    config = load_config(config_path, host=host)
    if model_dir.name not in config.arms:
        raise ConfigError(f"{where}: {config_path} has no arm named {model_dir.name!r}")
    generator = build_generator(config, config.arms[model_dir.name], host)
    state, _ = load_tensors(weights, what=f"{where}: generator weights")
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise DataError(f"{where}: {weights} does not fit the configured generator: {first}") from None
    return TrainedArm(config, model_dir.name, generator, build_likelihood(config.arms[model_dir.name], host))


def sampler_options(config: Config, samples: int | None = None) -> SamplerOptions:
    """The engine options of a run's ``[sampling]`` table (``samples`` overrides T, fixing it)."""
    table = config.sampling
    adaptive = samples is None and table.samples == "auto"
    return SamplerOptions(
        samples=table.max_samples if adaptive else samples if samples is not None else table.samples,
        tolerance=table.tolerance if adaptive else None,
        min_samples=min(SamplerOptions.min_samples, table.max_samples),  # the first round, within the cap
        variance_reduction=table.variance_reduction,
        seed=config.run.seed,
        memory_budget_mb=table.memory_budget_mb,
        precision=table.precision,
        channels_last=table.channels_last,
        compile=table.compile,
    )


def posterior_maps(sampler: PosteriorSampler, evaluation: EvalVolume, *, progress: bool = False) -> dict[str, np.ndarray]:
    """The maps of :data:`STD_MAPS` for one volume, in its own grid: the MC mean and the std with its two parts.

    ``std`` is the total predictive std, ``sqrt(std_epistemic^2 +
    std_aleatoric^2)`` (:mod:`uqsynth.posterior`); an arm whose likelihood
    has no aleatoric part (the paper's ``l1``) has a zero ``std_aleatoric``.
    Values are on the normalized [0, 1] scale; everything is zero outside
    the brain mask.
    """
    means, epistemic, aleatoric = [], [], []
    chunks = sampler.iter_chunks(evaluation.source, key=evaluation.subject_id)
    bar = tqdm(total=len(evaluation.source), desc=evaluation.subject_id, unit="tile" if len(evaluation.tiles) > 1
               else "slice", leave=False, file=sys.stderr, disable=not progress)
    for chunk in chunks:
        means.append(chunk.mean)
        epistemic.append(chunk.epistemic_variance)
        if chunk.aleatoric_variance is not None:
            aleatoric.append(chunk.aleatoric_variance)
        bar.update(chunk.mean.shape[0])
    bar.close()
    mean, epistemic_variance = evaluation.assemble(torch.cat(means), torch.cat(epistemic))
    # The generator works in [-1, 1]; the normalized scale is [0, 1], half as wide.
    mean = evaluation.to_native((mean + 1) / 2)
    std_epistemic = evaluation.to_native(epistemic_variance.clamp_min(0).sqrt() / 2)
    if not aleatoric:  # a likelihood without an aleatoric part (the paper's l1): the total is the epistemic std
        std_aleatoric, std = np.zeros_like(std_epistemic), std_epistemic
    else:
        # The tiles' mixture puts the spread between placements into the epistemic part; the aleatoric
        # part is the placements' weighted mean variance, which is the mixture of zero-mean tiles.
        aleatoric_tiles = torch.cat(aleatoric)
        _, aleatoric_variance = evaluation.assemble(torch.zeros_like(aleatoric_tiles), aleatoric_tiles)
        std_aleatoric = evaluation.to_native(aleatoric_variance.clamp_min(0).sqrt() / 2)
        std = np.sqrt(np.square(std_epistemic, dtype=np.float64) + np.square(std_aleatoric, dtype=np.float64))
        std = std.astype(np.float32)
    return {"mean": mean, "std": std, "std_epistemic": std_epistemic, "std_aleatoric": std_aleatoric}


def interval_maps(
    mean: np.ndarray, std: np.ndarray, mask: np.ndarray, level: float, calibrator: Calibrator | None = None
) -> dict[str, np.ndarray]:
    """``lower`` and ``upper``, the central interval at ``level``: the fitted ``calibrator``'s, else the Gaussian one.

    Zero outside ``mask``; an infinite bound (a calibrator with too few
    calibration subjects for the level) stays infinite: it is the answer.
    """
    if calibrator is None:
        lower, upper = (bound.numpy() for bound in gaussian_interval(torch.from_numpy(mean), torch.from_numpy(std), level))
    else:
        lower, upper = mean.astype(np.float64), mean.astype(np.float64)
        lower[mask], upper[mask] = calibrator.interval(mean[mask], std[mask], level)
    return {"lower": np.where(mask, lower, 0.0).astype(np.float32),
            "upper": np.where(mask, upper, 0.0).astype(np.float32)}


def find_calibrator(
    arm: TrainedArm, model_dir: Path, name: str | None, *, where: str | None = None
) -> tuple[str, Calibrator] | None:
    """The arm's fitted calibrator ``name`` (default: the run's first configured one that was fitted; None if none was).

    Errors begin with ``where`` (default ``calibrator <name>``; the command line's ``--calibrator <name>``).
    """
    from uqsynth.calibration.io import load_calibrator

    paths = ArmPaths(model_dir)
    fitted = paths.fitted([spec.name for spec in arm.config.calibration.calibrators])
    if name is None:
        if not fitted:
            return None
        name = fitted[0]
    elif name not in fitted:
        hint = f"fitted: {', '.join(fitted)}" if fitted else "none fitted yet"
        raise ConfigError(f"{where or 'calibrator ' + name}: {paths.calibrators} has no fitted calibrator {name!r} "
                          f"({hint})")
    return load_calibrator(paths.calibrator(name), arm=arm.name)


def check_maps(maps: dict[str, np.ndarray], stem: str) -> None:
    """Refuse maps with NaN voxels, or infinite ones other than an interval's bounds (see :func:`write_maps`)."""
    for name, array in maps.items():
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or (inf and name not in ("lower", "upper")):
            raise DataError(f"{stem}: map {name} holds {nan} NaN and {inf} infinite values, so none of its maps "
                            "was written (weights that diverged in training give such maps)")


def write_maps(
    maps: dict[str, np.ndarray], volumes: SubjectVolumes, out_dir: Path, stem: str, names: dict[str, str] | None = None
) -> list[Path]:
    """Write ``names[map]`` (default ``<stem>_<map>.nii.gz``, the run's layout) for every map; all of them or none.

    Raises:
        DataError: A map holds NaN voxels, or a map other than an interval
            bound infinite ones (checked before the first file: a number
            nobody should believe is never written). An infinite bound is an
            answer: a conformal calibrator says so when too few calibration
            voxels guarantee no finite interval at the level.
    """
    check_maps(maps, stem)
    written: list[Path] = []
    try:
        for name, array in maps.items():
            file_name = names[name] if names else f"{stem}_{name}.nii.gz"
            written.append(save_like(array, volumes.affine, volumes.header, out_dir / file_name))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def dataset_contrast(config: Config, role: str = "source", host: PluginHost | None = None) -> str | None:
    """The generic name (``t1``, ``t2``, ``flair``, ``t1ce``) of the run's source or target contrast.

    Taken from the dataset plugin's ``source`` / ``target`` option (its
    default when the run did not set it), or from the plugin's
    ``source_contrast`` / ``target_contrast`` attribute (the phantom's are
    ``t1`` and ``t2``); ``None`` when the dataset does not say.
    """
    host = host or get_host()
    factory = host["dataset"].get(config.data.source).factory
    parameter = inspect.signature(factory).parameters.get(role)
    default = parameter.default if parameter is not None else None
    value = config.data.options.get(config.data.source, {}).get(role, default)
    if value in CONTRASTS:
        return value
    return getattr(factory, f"{role}_contrast", None)


def source_contrast(config: Config, host: PluginHost | None = None) -> str | None:
    """:func:`dataset_contrast` of the source: what a folder's files are read for."""
    return dataset_contrast(config, "source", host)


#: BIDS ``desc`` label of each map (alphanumeric, as BIDS labels must be); the bounds add the level.
MAP_LABELS = {"mean": "mean", "std": "std", "std_epistemic": "stdEpistemic", "std_aleatoric": "stdAleatoric",
              "lower": "lower", "upper": "upper"}

#: Output layouts of :meth:`Posterior.save`: files side by side, or a BIDS-derivatives tree.
LAYOUTS = ("flat", "bids")


def map_file_names(volume_id: str, level: float, contrast: str | None) -> dict[str, str]:
    """The file name of every map of :data:`MAPS`: ``<id>_desc-<map>_<contrast>.nii.gz``.

    They say what they hold: the synthesized contrast (``T2w``), not the
    source's, and the map (``desc-mean``, ``desc-std``, ``desc-lower90``, ...),
    as BIDS derivatives name them.
    """
    suffix = BIDS_SUFFIX.get(contrast or "", contrast or "synth")
    percent = f"{level * 100:.6g}".replace(".", "p")
    labels = {name: label + (percent if name in ("lower", "upper") else "") for name, label in MAP_LABELS.items()}
    return {name: f"{volume_id}_desc-{labels[name]}_{suffix}.nii.gz" for name in MAPS}


def bids_folder(volume_id: str) -> Path:
    """``sub-<label>/[ses-<label>/]anat`` of a volume id (BIDS entities; any other id becomes ``sub-<its letters and digits>``)."""
    entities = dict(part.split("-", 1) for part in volume_id.split("_") if "-" in part)
    subject = entities.get("sub") or re.sub(r"[^A-Za-z0-9]", "", volume_id) or "unknown"
    folder = Path(f"sub-{subject}")
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return folder / "anat"


def bids_volume_id(volume_id: str) -> str:
    """The id a BIDS tree names the volume's files with: the id itself when it starts with ``sub-``."""
    if volume_id.startswith("sub-"):
        return volume_id
    return bids_folder(volume_id).parts[0]


def write_dataset_description(directory: Path) -> Path:
    """``dataset_description.json`` of a BIDS-derivatives tree (kept if one is there already)."""
    path = directory / "dataset_description.json"
    if not path.exists():
        import uqsynth

        document = {"Name": "uqsynth synthesized images with voxel-wise uncertainty", "BIDSVersion": "1.9.0",
                    "DatasetType": "derivative",
                    "GeneratedBy": [{"Name": "uqsynth", "Version": uqsynth.__version__,
                                     "Description": "MC-dropout posterior mean, std and calibrated intervals"}]}
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def read_source(
    t1: str | Path | nib.spatialimages.SpatialImage | np.ndarray,
    affine: np.ndarray | None = None,
    *,
    subject_id: str | None = None,
    role: str = "T1w",
) -> SubjectVolumes:
    """The source volume of a prediction, checked, from a NIfTI path, a nibabel image or an array with its affine."""
    if isinstance(t1, (str, Path)):
        path = Path(t1)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if not is_nifti(path):
            raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
        return load_source(path, subject_id=subject_id or volume_id(path), role=role)
    if isinstance(t1, nib.spatialimages.SpatialImage):
        if affine is not None:
            raise ConfigError("predict: a nibabel image carries its affine; pass affine only with a numpy array")
        name = t1.get_filename()
        return source_from_array(np.asanyarray(t1.dataobj, dtype=np.float32), t1.affine, t1.header,
                                 subject_id=subject_id or (volume_id(Path(name)) if name else "volume"),
                                 role=role, where=name or "the nibabel image")
    if isinstance(t1, np.ndarray):
        if affine is None:
            raise ConfigError("predict: a numpy array needs its affine (voxel to world, 4 x 4): "
                              "the axial slices and the outputs' grid follow from it")
        return source_from_array(np.asarray(t1, dtype=np.float32), np.asarray(affine, dtype=np.float64), None,
                                 subject_id=subject_id or "volume", role=role, where="the array")
    raise ConfigError(f"predict: expected a NIfTI path, a nibabel image or a numpy array, got {type(t1).__name__}")


class Synthesizer:
    """A trained arm, ready to turn a source volume into its posterior (what ``uqsynth.load`` returns).

    Example::

        model = uqsynth.load("runs/bcgan_t1t2/concrete_laplace")
        post = model.predict("sub-01_T1w.nii.gz")
        lower, upper = post.interval(0.9)
        post.save("maps/")

    Args:
        model_dir: ``RUN/<arm>``: the arm's folder beside the run's ``config.toml``.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:i]"``; default the run's ``run.device``.
        host: Where plugins come from (default: the installed ones).
        where: How errors name the model (default ``model <dir>``; the CLI's ``--model <dir>``).
        device_key: How errors name ``device`` (the CLI's ``--device``).
    """

    def __init__(self, model_dir: str | Path, *, device: str | None = None, host: PluginHost | None = None,
                 where: str | None = None, device_key: str = "device") -> None:
        self.directory = Path(model_dir)
        where = where or f"model {self.directory}"
        self.arm = load_arm(self.directory, host, where=where)
        self.device = resolve_device(device or self.arm.config.run.device, key=device_key if device else "run.device")
        stale = outputs_difference(self.directory, self.arm.name)
        if stale is not None:  # e.g. a calibrator fitted on another generator's maps would give the wrong intervals
            raise ConfigError(f"{where}: {stale}; rerun `uqsynth run` with --force to retrain it")
        self._samplers: dict[int | None, PosteriorSampler] = {}

    @property
    def name(self) -> str:
        """The arm's name (its folder)."""
        return self.arm.name

    def calibrators(self) -> list[str]:
        """The fitted calibrators beside the arm, in the run's configured order (the first is the default)."""
        return ArmPaths(self.directory).fitted([spec.name for spec in self.arm.config.calibration.calibrators])

    def calibrator(self, name: str | None = "default", *, where: str | None = None) -> tuple[str, Calibrator] | None:
        """A fitted calibrator by name; ``"default"``: the run's first fitted one (None if none); None: none."""
        if name is None:
            return None
        return find_calibrator(self.arm, self.directory, None if name == "default" else name, where=where)

    def sampler(self, samples: int | None = None) -> PosteriorSampler:
        """The sampling engine at ``samples`` MC samples per slice (default the run's ``sampling.samples``)."""
        if samples is not None and samples < 2:
            raise ConfigError(f"samples must be at least 2 (a standard deviation needs two samples), found {samples}")
        if samples not in self._samplers:
            options = sampler_options(self.arm.config, samples)
            self._samplers[samples] = PosteriorSampler(self.arm.generator, options, self.device, self.arm.likelihood)
        return self._samplers[samples]

    def read(self, t1, affine: np.ndarray | None = None, *, subject_id: str | None = None) -> SubjectVolumes:
        """Read and check a source volume as :meth:`predict` does, without sampling."""
        return read_source(t1, affine, subject_id=subject_id, role=ROLES.get(source_contrast(self.arm.config), "source"))

    def predict(
        self,
        t1: str | Path | nib.spatialimages.SpatialImage | np.ndarray | SubjectVolumes,
        affine: np.ndarray | None = None,
        *,
        samples: int | None = None,
        calibrator: str | None = "default",
        subject_id: str | None = None,
        progress: bool = False,
    ) -> Posterior:
        """The posterior of one source volume: MC mean, total std and its two parts, in the input's grid.

        Args:
            t1: A NIfTI path, a nibabel image, or a 3D numpy array (then ``affine`` too).
            affine: The array's voxel-to-world affine.
            samples: MC samples per slice (default: the run's ``sampling.samples``).
            calibrator: The fitted calibrator of the intervals: ``"default"`` (the
                run's first fitted one, or Gaussian if none), a name, or None (Gaussian).
            subject_id: What seeds the dropout masks and names the files (default, as
                ``uqsynth predict``: the file's BIDS entities or BraTS id, else its name
                without ``.nii[.gz]``; ``"volume"`` for an array): the same id and seed
                give the same maps.
            progress: A progress bar on stderr.

        Raises:
            uqsynth.errors.DataError: The input is not a usable volume (one line naming it).
            uqsynth.errors.ConfigError: A calibrator that was not fitted, fewer than 2 samples.
        """
        volumes = t1 if isinstance(t1, SubjectVolumes) else self.read(t1, affine, subject_id=subject_id)
        return self.posterior(volumes, samples=samples, fitted=self.calibrator(calibrator), progress=progress)

    def posterior(self, volumes: SubjectVolumes, *, samples: int | None = None,
                  fitted: tuple[str, Calibrator] | None = None, progress: bool = False) -> Posterior:
        """:meth:`predict` of a volume already read, with a calibrator already found (the CLI checks both first)."""
        sampler = self.sampler(samples)
        data = self.arm.config.data
        evaluation = EvalVolume(volumes, image_size=data.image_size, load_size=data.load_size)
        drawn = sampler.slice_samples_drawn
        maps = posterior_maps(sampler, evaluation, progress=progress)
        posterior = Posterior(self, volumes, evaluation.native_mask(), maps, fitted, sampler.options)
        posterior.slices, posterior.network_inputs = len(evaluation), len(evaluation.source)  # inputs: tiles
        posterior.slice_samples = sampler.slice_samples_drawn - drawn  # T per input, or each its own with auto
        return posterior


class Posterior:
    """One volume's posterior: mean, std (total, epistemic, aleatoric) and calibrated intervals, as arrays and NIfTI.

    Arrays are in the input's grid, on the normalized [0, 1] intensity scale
    the model was trained on, zero outside the brain (the input's nonzero voxels).

    Attributes:
        mean, std, std_epistemic, std_aleatoric: float32 volumes.
        mask: The brain mask the maps are defined in.
        affine: The input's voxel-to-world affine (the maps share it).
        subject_id: The volume's id (what seeded its dropout masks, and names its files).
        calibrator: The fitted calibrator's name, or None (Gaussian intervals).
        slices, network_inputs: Axial slices sampled, and the network inputs they made (tiles at
            the training scale; more than the slices when a slice is larger than the training crops).
        slice_samples: Stochastic forward passes over all network inputs (T each, or with
            ``sampling.samples = "auto"`` as many as each needed).
    """

    slices: int = 0
    network_inputs: int = 0
    slice_samples: int = 0

    def __init__(self, model: Synthesizer, volumes: SubjectVolumes, mask: np.ndarray, maps: dict[str, np.ndarray],
                 fitted: tuple[str, Calibrator] | None, options: SamplerOptions) -> None:
        self.model, self.volumes, self.mask, self.options = model, volumes, mask, options
        self.mean, self.std = maps["mean"], maps["std"]
        self.std_epistemic, self.std_aleatoric = maps["std_epistemic"], maps["std_aleatoric"]
        self.affine, self.subject_id = volumes.affine, volumes.subject_id
        self.calibrator, self._fitted = (fitted[0], fitted[1]) if fitted else (None, None)

    def __repr__(self) -> str:
        return (f"Posterior({self.subject_id!r}, shape={self.mean.shape}, arm={self.model.name!r}, "
                f"{self.options.describe()}, calibrator={self.calibrator!r})")

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """The central interval at ``level``: the calibrator's (its promise: :meth:`certificate`), else Gaussian."""
        if not 0.0 < level < 1.0:
            raise ConfigError(f"level must be in (0, 1), found {level}")
        bounds = interval_maps(self.mean, self.std, self.mask, level, self._fitted)
        return bounds["lower"], bounds["upper"]

    def maps(self, level: float = 0.95) -> dict[str, np.ndarray]:
        """Every map of :data:`MAPS`, the interval at ``level``."""
        lower, upper = self.interval(level)
        return {"mean": self.mean, "std": self.std, "std_epistemic": self.std_epistemic,
                "std_aleatoric": self.std_aleatoric, "lower": lower, "upper": upper}

    def to_nifti(self, name: str = "mean", level: float = 0.95) -> nib.Nifti1Image:
        """One map (a name of :data:`MAPS`) as a float32 NIfTI image in the input's grid and header."""
        if name not in MAPS:
            raise ConfigError(f"to_nifti: no map {name!r} (maps: {', '.join(MAPS)})")
        array = self.maps(level)[name] if name in ("lower", "upper") else getattr(self, name)
        return nifti_like(array, self.volumes.affine, self.volumes.header)

    def certificate(self, level: float = 0.95) -> dict[str, object]:
        """What the interval at ``level`` promises, which model and calibrator made it, and the volume's summary."""
        return self._certificate(level, *self.interval(level))

    def file_names(self, level: float = 0.95, layout: str = "flat") -> dict[str, str]:
        """Map name -> file name (:func:`map_file_names`), with the id a BIDS tree uses for ``layout="bids"``."""
        _, stem = output_place(Path(), self.subject_id, layout)
        return map_file_names(stem, level, dataset_contrast(self.model.arm.config, "target"))

    def _certificate(self, level: float, lower: np.ndarray, upper: np.ndarray,
                     names: dict[str, str] | None = None) -> dict[str, object]:
        name = self.calibrator
        entry = interval_entry(
            level, lower[self.mask], upper[self.mask], name=name, calibrator=self._fitted,
            calibrator_file=ArmPaths(self.model.directory).calibrator(name) if name else None,
        )
        return certificate(
            volume=self.subject_id, arm=self.model.name, generator_file=ArmPaths(self.model.directory).generator,
            likelihood=self.model.arm.config.arms[self.model.name].likelihood.name, sampling=self.options.record(),
            seed=self.options.seed, std=self.std[self.mask], intervals=[entry],
            maps=names or self.file_names(level),
        )

    def save(self, directory: str | Path, *, level: float = 0.95, intensity_scale: float = 1.0,
             layout: str = "flat") -> list[Path]:
        """Write every map of :data:`MAPS` (:meth:`file_names`) and ``<id>_uncertainty.json``; all or none.

        ``layout="bids"`` puts them in ``sub-*/[ses-*/]anat/`` under ``directory``
        with a ``dataset_description.json`` (a BIDS-derivatives tree);
        ``intensity_scale`` multiplies every map (``uqsynth predict
        --rescale-like``); the certificate's numbers stay on the normalized scale.
        """
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
        root = Path(directory)
        folder, stem = output_place(root, self.subject_id, layout)
        names = self.file_names(level, layout)
        maps = self.maps(level)
        check_maps(maps, self.subject_id)  # before the certificate's numbers are computed from them
        document = self._certificate(level, maps["lower"], maps["upper"], names)
        maps = {name: (array * intensity_scale).astype(np.float32) for name, array in maps.items()}
        folder.mkdir(parents=True, exist_ok=True)
        if layout == "bids":
            write_dataset_description(root)
        written = write_maps(maps, self.volumes, folder, self.subject_id, names)
        try:
            written.append(write_certificate(certificate_path(folder, stem), document))
        except BaseException:  # a map set without its certificate is not a set: none of it stays
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return written

def output_place(directory: Path, volume_id: str, layout: str) -> tuple[Path, str]:
    """Where a volume's files go and the id they are named with: ``directory`` and the id, or for
    ``layout="bids"`` its ``sub-*/[ses-*/]anat`` folder and the BIDS id (:func:`bids_volume_id`)."""
    if layout == "bids":
        return directory / bids_folder(volume_id), bids_volume_id(volume_id)
    return directory, volume_id


def planned_files(directory: str | Path, volume_id: str, level: float, contrast: str | None,
                  layout: str = "flat") -> list[Path]:
    """The files :meth:`Posterior.save` writes for a volume, computable before sampling it."""
    root = Path(directory)
    folder, stem = output_place(root, volume_id, layout)
    names = map_file_names(stem, level, contrast)
    extra = [root / "dataset_description.json"] if layout == "bids" else []
    return [*(folder / name for name in names.values()), certificate_path(folder, stem), *extra]


def load(model_dir: str | Path, *, device: str | None = None) -> Synthesizer:
    """A trained arm ``RUN/<arm>``, ready to predict: ``uqsynth.load("runs/bcgan_t1t2/concrete_laplace")``."""
    return Synthesizer(model_dir, device=device)
