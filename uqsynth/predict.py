"""``uqsynth predict``: the library's :class:`~uqsynth.inference.Synthesizer` over the command line's inputs.

Every input is read and checked, and every output planned, before the first
volume is sampled; then each volume's maps and certificate are written by
:meth:`uqsynth.inference.Posterior.save`, the method a notebook calls, so
both give the same files for the same input and seed. Errors name the flag
(``--model``, ``--input``, ``--out``) where the library names the path.

Intensities: the synthesized image is in the normalized [0, 1] scale the
model was trained on (each slice divided by its 99.5th percentile of brain
voxels). ``--rescale-like REF`` multiplies mean, std and interval bounds by
the 99.5th percentile of a reference T2w's brain voxels, to land in that
scanner's intensity range.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uqsynth._files import RECORD, refuse_replacing, write_csv
from uqsynth.data.base import SubjectVolumes
from uqsynth.data.inputs import find_inputs
from uqsynth.data.nifti import load_volume
from uqsynth.data.slices import ROBUST_PERCENTILE
from uqsynth.errors import ConfigError, DataError
from uqsynth.inference import LAYOUTS, Synthesizer, dataset_contrast, planned_files, source_contrast


def collect_inputs(inputs: Sequence[str], contrast: str | None) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(id, file)`` for every volume the ``--input`` values name (:func:`uqsynth.data.inputs.find_inputs`).

    Also the lines that tell the user how many volumes each input gave, and
    what a folder held that is not an input (printed once every input has
    been read). A folder is read for ``contrast``, the model's own source
    contrast: feeding a T2w-trained model its subjects' T1w would be
    silently wrong.
    """
    try:
        volumes, found = find_inputs(list(inputs), contrast)
    except DataError as error:
        raise DataError(f"--input {error}") from None
    lines = [f"--input {item}: {count} volume(s) ({kind})" + "".join(f"; {note}" for note in notes)
             for item, count, kind, notes in found]
    return [(volume.id, volume.path) for volume in volumes], lines


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
    layout: str = "flat",
) -> int:
    """``uqsynth predict``: validate everything first, then write the maps and the certificate of every input volume."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"--level must be in (0, 1), found {level}")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
    if samples is not None and samples < 2:
        raise ConfigError(f"--samples must be at least 2 (a standard deviation needs two samples), found {samples}")
    synthesizer = Synthesizer(model, device=device, where=f"--model {model}", device_key="--device")
    fitted = synthesizer.calibrator(calibrator or "default", where=f"--calibrator {calibrator}")
    # Read and check every input before writing anything.
    volumes: list[SubjectVolumes] = []
    found, lines = collect_inputs(inputs, source_contrast(synthesizer.arm.config))
    for stem, path in found:
        subject = synthesizer.read(path, subject_id=stem)
        for line in subject.warnings:  # also in each output's header (descrip)
            print(f"warning: {line}", file=sys.stderr)
        volumes.append(subject)
    scale = robust_maximum(Path(rescale_like)) if rescale_like else 1.0
    out_dir = Path(out)
    # An output never replaces what this command reads (links and ".." resolved): --out may be the data folder.
    model_dir = Path(model)
    read = [*(("--input", subject.source_path) for subject in volumes),
            *([("--rescale-like", Path(rescale_like))] if rescale_like else []),
            ("--model", model_dir.parent / "config.toml"),
            *(("--model", path) for path in sorted(model_dir.rglob("*")) if path.is_file())]
    target = dataset_contrast(synthesizer.arm.config, "target")
    planned = [*(path for subject in volumes for path in planned_files(out_dir, subject.subject_id, level, target, layout)),
               out_dir / SUMMARY_FILE]
    refuse_replacing(planned, read, where=f"--out {out_dir}")
    run_dir = next((d for d in (out_dir.resolve(), *out_dir.resolve().parents) if (d / RECORD).is_file()), None)
    if run_dir is not None:  # its record would not list our maps, and a report would score them as the run's
        raise ConfigError(f"--out {out_dir} lies in the run directory {run_dir}, whose files only its run writes; "
                          "choose an --out outside it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create the directory: {exc.strerror or exc}") from None
    for line in lines:  # what the inputs gave, once everything has been checked
        print(line, file=sys.stderr)
    sampling_rule = synthesizer.sampler(samples).options.describe()
    interval = f"calibrated by {fitted[0]}" if fitted else "Gaussian (no fitted calibrator)"
    print(f"arm {synthesizer.name}: {sampling_rule} samples, interval at level {level}: {interval}, "
          f"device {synthesizer.device}, intensities: "
          f"{'rescaled like ' + rescale_like if rescale_like else 'normalized [0, 1]'}", file=sys.stderr)
    summaries = []
    for subject in volumes:
        started = time.perf_counter()
        posterior = synthesizer.posterior(subject, samples=samples, fitted=fitted, progress=True)
        written = posterior.save(out_dir, level=level, intensity_scale=scale, layout=layout)
        seconds = time.perf_counter() - started
        slices, inputs = posterior.slices, posterior.network_inputs
        tiles = f" ({inputs} tiles at the training scale)" if inputs > slices else ""
        summary = volume_row(subject.subject_id, written[-1], out_dir)
        summaries.append(summary)
        width = "infinite" if summary["mean_width"] is None else f"{summary['mean_width']:.2f}"
        drawn = posterior.slice_samples
        print(f"{subject.subject_id}: {slices} slices{tiles} x {drawn / inputs:.3g} samples in {seconds:.1f} s "
              f"({drawn / seconds:.0f} slice-samples/s) -> {len(written)} files in {written[0].parent}; "
              f"nSTD {summary['nstd']:.2f}, mean {level:g} interval width {width} (on [0, 255])", file=sys.stderr)
    table = triage_rows(summaries)
    write_csv(out_dir / SUMMARY_FILE, table)
    print(f"triage: {len(table)} volume(s) ranked by nSTD, most uncertain first -> {out_dir / SUMMARY_FILE}",
          file=sys.stderr)
    return 0


#: The per-volume summary ``predict`` writes into ``--out``: what to check first, with no ground truth.
SUMMARY_FILE = "uncertainty_summary.csv"


def volume_row(volume_id: str, certificate_file: Path, out_dir: Path) -> dict:
    """One volume's line of the summary, from the certificate just written beside its maps."""
    document = json.loads(certificate_file.read_text(encoding="utf-8"))
    (interval,) = document["intervals"]
    summary = document["summary"]
    return {"id": volume_id, "nstd": summary["nstd"], "std_mean": summary["std_mean"],
            "mean_width": interval["mean_width"], "level": interval["level"], "calibrator": interval["calibrator"],
            "guarantee_unit": interval["unit"], "infinite_voxels": interval["infinite_voxels"],
            "brain_voxels": summary["brain_voxels"], "certificate": certificate_file.relative_to(out_dir).as_posix()}


def triage_rows(rows: list[dict]) -> list[dict]:
    """The volumes ranked by nSTD (the paper's volume uncertainty), the most uncertain first, with their rank."""
    ranked = sorted(rows, key=lambda row: (-row["nstd"], row["id"]))
    return [{"rank": rank, **row} for rank, row in enumerate(ranked, start=1)]

