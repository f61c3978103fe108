"""Posterior maps of whole volumes, in the input's own grid, and ``uqsynth predict``.

A trained arm lives in ``RUN/<arm>/`` beside the run's ``config.toml``; its
generator is rebuilt from that configuration and its weights are read from
``generator.safetensors`` (no code is unpickled). For each input volume the
engine draws T samples per axial slice (per tile of it, at the training
scale: :class:`~uqsynth.data.slices.EvalVolume`) and the per-voxel mean and standard
deviation are mapped back to the input's grid, orientation and affine.
Beside each volume's maps goes its certificate, ``<stem>_uncertainty.json``
(:mod:`uqsynth.certificate`): which model and calibrator made them, what the
interval promises, and the volume's nSTD and mean interval width.

Intensities: the synthesized image is in the normalized [0, 1] scale the
model was trained on (each slice divided by its 99.5th percentile of brain
voxels). ``--rescale-like REF`` multiplies mean, std and interval bounds by
the 99.5th percentile of a reference T2w's brain voxels, to land in that
scanner's intensity range.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uqsynth._files import RECORD, refuse_replacing
from uqsynth.calibration.base import Calibrator
from uqsynth.certificate import certificate, certificate_path, interval_entry, write_certificate
from uqsynth.config import Config, load_config
from uqsynth.data.base import SubjectVolumes
from uqsynth.data.brats import CONTRASTS, ROLES, scan_source_only
from uqsynth.data.discovery import nifti_stem
from uqsynth.data.nifti import is_nifti, load_source, load_volume, save_like
from uqsynth.data.slices import ROBUST_PERCENTILE, EvalVolume
from uqsynth.devices import resolve_device
from uqsynth.errors import ConfigError, DataError
from uqsynth.likelihoods import Likelihood
from uqsynth.model_files import load_tensors
from uqsynth.models.base import Generator
from uqsynth.plugins import PluginHost, get_host
from uqsynth.posterior import PosteriorSampler, SamplerOptions, gaussian_interval
from uqsynth.run_directory import outputs_difference
from uqsynth.training import GENERATOR_WEIGHTS, build_generator, build_likelihood

#: The maps of a volume: mean, total std and its two parts, and the central interval's bounds.
MAPS = ("mean", "std", "std_epistemic", "std_aleatoric", "lower", "upper")


@dataclass
class TrainedArm:
    """A trained arm: its run's configuration, its name, its generator and the likelihood of its outputs."""

    config: Config
    name: str
    generator: Generator
    likelihood: Likelihood


def load_arm(model_dir: str | Path, host: PluginHost | None = None) -> TrainedArm:
    """Rebuild ``RUN/<arm>``'s generator from the run's configuration and load its weights."""
    model_dir = Path(model_dir)
    config_path = model_dir.parent / "config.toml"
    weights = model_dir / GENERATOR_WEIGHTS
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such directory (expected RUN/<arm>)")
    if not config_path.is_file():
        raise ConfigError(f"--model {model_dir}: no config.toml in {model_dir.parent} (expected RUN/<arm>)")
    if not weights.is_file():
        raise ConfigError(f"--model {model_dir}: no {GENERATOR_WEIGHTS} (has this arm finished training?)")
    host = host or get_host()
    config = load_config(config_path, host=host)
    if model_dir.name not in config.arms:
        raise ConfigError(f"--model {model_dir}: {config_path} has no arm named {model_dir.name!r}")
    generator = build_generator(config, config.arms[model_dir.name], host)
    state, _ = load_tensors(weights, what=f"--model {model_dir}: generator weights")
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise DataError(f"--model {model_dir}: {weights} does not fit the configured generator: {first}") from None
    return TrainedArm(config, model_dir.name, generator, build_likelihood(config.arms[model_dir.name], host))


def sampler_options(config: Config, samples: int | None = None) -> SamplerOptions:
    """The engine options of a run's ``[sampling]`` table (``samples`` overrides T)."""
    table = config.sampling
    return SamplerOptions(
        samples=samples if samples is not None else table.samples,
        seed=config.run.seed,
        memory_budget_mb=table.memory_budget_mb,
        precision=table.precision,
        channels_last=table.channels_last,
        compile=table.compile,
    )


def posterior_maps(
    sampler: PosteriorSampler,
    evaluation: EvalVolume,
    *,
    level: float,
    calibrator: Calibrator | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every map of :data:`MAPS` for one volume, in its own grid.

    ``std`` is the total predictive std, ``sqrt(std_epistemic^2 +
    std_aleatoric^2)`` (:mod:`uqsynth.posterior`); an arm whose likelihood
    has no aleatoric part (the paper's ``l1``) has a zero ``std_aleatoric``.
    The interval is the fitted ``calibrator``'s when given, else the
    Gaussian one of the total std. Values are on the normalized [0, 1]
    scale; everything is zero outside the brain mask.
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
    mask = evaluation.native_mask()
    if calibrator is None:
        lower, upper = (bound.numpy() for bound in gaussian_interval(torch.from_numpy(mean), torch.from_numpy(std), level))
    else:
        lower, upper = mean.astype(np.float64), mean.astype(np.float64)
        lower[mask], upper[mask] = calibrator.interval(mean[mask], std[mask], level)
    return {
        "mean": mean,
        "std": std,
        "std_epistemic": std_epistemic,
        "std_aleatoric": std_aleatoric,
        "lower": np.where(mask, lower, 0.0).astype(np.float32),
        "upper": np.where(mask, upper, 0.0).astype(np.float32),
    }


def find_calibrator(arm: TrainedArm, model_dir: Path, name: str | None) -> tuple[str, Calibrator] | None:
    """The arm's fitted calibrator ``name`` (default: the run's first configured one that was fitted)."""
    from uqsynth.calibration.io import load_calibrator

    directory = model_dir / "calibrators"
    configured = [spec.name for spec in arm.config.calibration.calibrators]
    fitted = [n for n in configured if (directory / f"{n}.safetensors").is_file()]
    if name is None:
        if not fitted:
            return None
        name = fitted[0]
    elif name not in fitted:
        hint = f"fitted: {', '.join(fitted)}" if fitted else "none fitted yet"
        raise ConfigError(f"--calibrator {name}: {directory} has no fitted calibrator {name!r} ({hint})")
    return load_calibrator(directory / f"{name}.safetensors", arm=arm.name)


def write_maps(maps: dict[str, np.ndarray], volumes: SubjectVolumes, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>_<map>.nii.gz`` for every map; all of them or none.

    Raises:
        DataError: A map holds NaN voxels, or a map other than an interval
            bound infinite ones (checked before the first file: a number
            nobody should believe is never written). An infinite bound is an
            answer: a conformal calibrator says so when too few calibration
            voxels guarantee no finite interval at the level.
    """
    for name, array in maps.items():
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or (inf and name not in ("lower", "upper")):
            raise DataError(f"{stem}: map {name} holds {nan} NaN and {inf} infinite values, so none of its maps "
                            "was written (weights that diverged in training give such maps)")
    written: list[Path] = []
    try:
        for name, array in maps.items():
            written.append(save_like(array, volumes.affine, volumes.header, out_dir / f"{stem}_{name}.nii.gz"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def map_certificate(
    arm: TrainedArm,
    model_dir: Path,
    fitted: tuple[str, Calibrator] | None,
    level: float,
    options: SamplerOptions,
    evaluation: EvalVolume,
    maps: dict[str, np.ndarray],
    stem: str,
) -> dict[str, object]:
    """The certificate of one volume's maps (:mod:`uqsynth.certificate`), from its normalized maps."""
    brain = evaluation.native_mask()
    name, calibrator = fitted if fitted else (None, None)
    entry = interval_entry(
        level, maps["lower"][brain], maps["upper"][brain], name=name, calibrator=calibrator,
        calibrator_file=model_dir / "calibrators" / f"{name}.safetensors" if name else None,
    )
    return certificate(
        volume=stem, arm=arm.name, generator_file=model_dir / GENERATOR_WEIGHTS,
        likelihood=arm.config.arms[arm.name].likelihood.name, samples=options.samples, seed=options.seed,
        std=maps["std"][brain], intervals=[entry], maps={map_name: f"{stem}_{map_name}.nii.gz" for map_name in maps},
    )


def _stem(path: Path) -> str:
    """The file name without its NIfTI ending, in any case (``T1.NII.GZ`` -> ``T1``)."""
    return nifti_stem(path.name) or path.stem


def source_contrast(config: Config, host: PluginHost | None = None) -> str | None:
    """The generic name (``t1``, ``t2``, ``flair``, ``t1ce``) of the contrast a run's model was trained on.

    Taken from the dataset plugin's ``source`` option (its default when the
    run did not set it), or from the plugin's ``source_contrast`` attribute
    (the phantom's is ``t1``); ``None`` when the dataset does not say.
    """
    host = host or get_host()
    factory = host["dataset"].get(config.data.source).factory
    parameter = inspect.signature(factory).parameters.get("source")
    default = parameter.default if parameter is not None else None
    value = config.data.options.get(config.data.source, {}).get("source", default)
    if value in CONTRASTS:
        return value
    return getattr(factory, "source_contrast", None)


def collect_inputs(inputs: Sequence[str], contrast: str | None) -> list[tuple[str, Path]]:
    """``(stem, file)`` for every ``--input``: NIfTI files, or BraTS-style folders of subjects.

    A folder gives each subject's file of ``contrast``, the model's own
    source contrast: feeding a T2w-trained model its subjects' T1w would be
    silently wrong. ``None`` (the run's dataset does not say) refuses folders.
    """
    found: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if contrast is None:
                raise DataError(f"--input {path}: the model's training data does not name its source contrast, "
                                "so a folder's subjects cannot be matched to it; pass the NIfTI files themselves")
            subjects, notes = scan_source_only(path, contrast=contrast)
            for note in notes:  # what the folder held that is not an input, and why
                print(f"--input {path}: {note}", file=sys.stderr)
            found.extend(subjects.items())
        elif not path.exists():
            raise DataError(f"--input {path}: no such file or directory")
        elif not is_nifti(path):
            raise DataError(f"--input {path}: not a NIfTI file (expected .nii or .nii.gz)")
        else:
            found.append((_stem(path), path))
    stems = [stem for stem, _ in found]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise DataError(f"--input: two inputs would write the same outputs: {', '.join(duplicates)}")
    return found


def robust_maximum(path: Path) -> float:
    """The 99.5th percentile of a reference image's nonzero voxels (for ``--rescale-like``)."""
    volume = load_volume(path, role="reference T2w", subject_id=None)
    values = volume.array[volume.array > 0]
    return float(np.percentile(values, ROBUST_PERCENTILE))


def run_predict(
    *,
    model: str,
    inputs: Sequence[str],
    out: str,
    samples: int | None = None,
    level: float = 0.95,
    device: str | None = None,
    rescale_like: str | None = None,
    calibrator: str | None = None,
) -> int:
    """``uqsynth predict``: validate everything first, then write the maps and the certificate of every input volume."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"--level must be in (0, 1), found {level}")
    if samples is not None and samples < 2:
        raise ConfigError(f"--samples must be at least 2 (a standard deviation needs two samples), found {samples}")
    arm = load_arm(model)
    fitted = find_calibrator(arm, Path(model), calibrator)
    torch_device = resolve_device(device or arm.config.run.device, key="--device" if device else "run.device")
    stale = outputs_difference(Path(model), arm.name)
    if stale is not None:  # e.g. a calibrator fitted on another generator's maps would give the wrong intervals
        raise ConfigError(f"--model {model}: {stale}; rerun `uqsynth run` with --force to retrain it")
    # Read and check every input before writing anything.
    volumes: list[tuple[str, SubjectVolumes]] = []
    contrast = source_contrast(arm.config)
    for stem, path in collect_inputs(inputs, contrast):
        subject = load_source(path, subject_id=stem, role=ROLES.get(contrast, "source"))
        for line in subject.warnings:  # also in each output's header (descrip)
            print(f"warning: {line}", file=sys.stderr)
        volumes.append((stem, subject))
    scale = robust_maximum(Path(rescale_like)) if rescale_like else 1.0
    out_dir = Path(out)
    # An output never replaces what this command reads (links and ".." resolved): --out may be the data folder.
    model_dir = Path(model)
    read = [*(("--input", subject.source_path) for _, subject in volumes),
            *([("--rescale-like", Path(rescale_like))] if rescale_like else []),
            ("--model", model_dir.parent / "config.toml"),
            *(("--model", path) for path in sorted(model_dir.rglob("*")) if path.is_file())]
    planned = [*(out_dir / f"{stem}_{name}.nii.gz" for stem, _ in volumes for name in MAPS),
               *(certificate_path(out_dir, stem) for stem, _ in volumes)]
    refuse_replacing(planned, read, where=f"--out {out_dir}")
    run_dir = next((d for d in (out_dir.resolve(), *out_dir.resolve().parents) if (d / RECORD).is_file()), None)
    if run_dir is not None:  # its record would not list our maps, and a report would score them as the run's
        raise ConfigError(f"--out {out_dir} lies in the run directory {run_dir}, whose files only its run writes; "
                          "choose an --out outside it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create the directory: {exc.strerror or exc}") from None
    sampler = PosteriorSampler(arm.generator, sampler_options(arm.config, samples), torch_device, arm.likelihood)
    T = sampler.options.samples
    interval = f"calibrated by {fitted[0]}" if fitted else "Gaussian (no fitted calibrator)"
    print(f"arm {arm.name}: T={T} samples, interval at level {level}: {interval}, "
          f"device {torch_device}, intensities: {'rescaled like ' + rescale_like if rescale_like else 'normalized [0, 1]'}",
          file=sys.stderr)
    for stem, subject in volumes:
        started = time.perf_counter()
        data = arm.config.data
        evaluation = EvalVolume(subject, image_size=data.image_size, load_size=data.load_size)
        maps = posterior_maps(sampler, evaluation, level=level, progress=True,
                              calibrator=fitted[1] if fitted else None)
        document = map_certificate(arm, Path(model), fitted, level, sampler.options, evaluation, maps, stem)
        maps = {name: (array * scale).astype(np.float32) for name, array in maps.items()}
        written = write_maps(maps, subject, out_dir, stem)
        try:
            write_certificate(certificate_path(out_dir, stem), document)
        except BaseException:  # a map set without its certificate is not a set: none of it stays
            for path in written:
                path.unlink(missing_ok=True)
            raise
        seconds = time.perf_counter() - started
        slices, inputs = len(evaluation), len(evaluation.source)  # network inputs: a slice's tiles
        tiles = f" ({inputs} tiles at the training scale)" if inputs > slices else ""
        print(f"{stem}: {slices} slices{tiles} x {T} samples in {seconds:.1f} s "
              f"({inputs * T / seconds:.0f} slice-samples/s) -> {out_dir / stem}_{{{','.join(MAPS)}}}.nii.gz "
              f"and {certificate_path(out_dir, stem).name}", file=sys.stderr)
    return 0
