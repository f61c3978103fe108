"""Where ``uqsynth predict``'s volumes come from: files, globs, flat folders, BIDS datasets, BraTS folders.

Users keep their scans as they have them, so an input may be:

- a NIfTI file (``.nii``/``.nii.gz``, any case);
- a glob (``'scans/*_T1w.nii.gz'``, quoted so the shell leaves it alone);
- a flat folder of NIfTI files: those named for the model's source contrast
  when the names say a contrast (BIDS ``..._T1w``, BraTS ``..._t1`` /
  ``...-t1n``), else every NIfTI file in it;
- a BIDS dataset (``dataset_description.json``, or ``sub-*`` folders):
  ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` of the source contrast
  (``T1w``; contrast-enhanced T1w carry a ``ce-`` entity and count as ``t1ce``);
- a folder of BraTS subject folders, any release's naming
  (:func:`uqsynth.data.brats.scan_source_only`).

Each volume gets an id that names the *subject*, not the file's contrast:
the BIDS entities (``sub-01_ses-1``), or the BraTS id (``TCGA-DU-7294``),
else the file name without its ending. Outputs are named from it, and it
seeds the volume's dropout masks.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from uqsynth.data.brats import NAMINGS, scan_source_only
from uqsynth.data.discovery import nifti_stem
from uqsynth.errors import DataError

#: BIDS suffix of each generic contrast (``t1ce``: a ``T1w`` with a ``ce-`` entity).
BIDS_SUFFIX = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR", "t1ce": "T1w"}

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputVolume:
    """One input volume: its id (what names its outputs), its file, and what kind of input gave it."""

    id: str
    path: Path
    kind: str


def _bids_parts(name: str) -> tuple[list[str], str] | None:
    """``(entities, suffix)`` of a BIDS-style file name (``sub-01_ses-1_T1w.nii.gz``), or None."""
    stem = nifti_stem(name)
    if stem is None or "_" not in stem:
        return None
    *entities, suffix = stem.split("_")  # entities are key-value pairs in BIDS; any prefix counts here
    return (entities, suffix) if entities and all(entities) else None


def is_bids_source(name: str, contrast: str) -> bool:
    """Whether a BIDS-style file name holds the ``contrast`` (``t1``: ``_T1w`` without a ``ce-`` entity)."""
    parts = _bids_parts(name)
    if parts is None or contrast not in BIDS_SUFFIX:
        return False
    entities, suffix = parts
    enhanced = any(entity.startswith("ce-") for entity in entities)
    return suffix == BIDS_SUFFIX[contrast] and enhanced == (contrast == "t1ce")


def _brats_parts(name: str) -> tuple[str, str] | None:
    """``(id, generic contrast)`` of a BraTS-style file name (``TCGA-DU-7294_t1.nii.gz``), or None."""
    for naming in NAMINGS:
        match = naming.pattern().match(name)
        if match:
            suffix = naming.canonical(match["suffix"])
            generic = next((g for g, s in naming.suffixes.items() if s == suffix), suffix)
            return match["id"], generic
    return None


def volume_id(path: Path) -> str:
    """A volume's id from its file name: BIDS entities, a BraTS id, else the name without ``.nii[.gz]``."""
    parts = _bids_parts(path.name)
    if parts is not None and parts[1] in BIDS_SUFFIX.values():
        return "_".join(parts[0])
    brats = _brats_parts(path.name)
    if brats is not None:
        return brats[0]
    return nifti_stem(path.name) or path.stem


def _names_a_contrast(name: str) -> bool:
    parts = _bids_parts(name)
    return (parts is not None and parts[1] in {*BIDS_SUFFIX.values(), "T2w", "FLAIR", "PD"}) or \
        _brats_parts(name) is not None


def _matches(name: str, contrast: str) -> bool:
    brats = _brats_parts(name)
    return is_bids_source(name, contrast) or (brats is not None and brats[1] == contrast)


def _is_bids_dataset(folder: Path) -> bool:
    return (folder / "dataset_description.json").is_file() or any(
        child.is_dir() and child.name.startswith("sub-") for child in folder.iterdir())


def _folder(folder: Path, contrast: str | None, notes: list[str]) -> list[InputVolume]:
    """The volumes of one folder: flat, a BIDS dataset, or BraTS subject folders (in that order of checking)."""
    flat = sorted(p for p in folder.iterdir() if p.is_file() and nifti_stem(p.name) is not None)
    if flat:
        if any(_names_a_contrast(p.name) for p in flat):
            if contrast is None:
                raise DataError(f"{folder}: its files name their contrasts, but the model's training data does not "
                                "name its source contrast; pass the NIfTI files themselves")
            chosen = [p for p in flat if _matches(p.name, contrast)]
            left = len(flat) - len(chosen)
            if left:
                notes.append(f"{left} file(s) of other contrasts left out (the model reads {contrast})")
        else:
            chosen = flat
        return [InputVolume(volume_id(p), p, "flat folder") for p in chosen]
    if contrast is None:
        raise DataError(f"{folder}: the model's training data does not name its source contrast, so a "
                        "folder's subjects cannot be matched to it; pass the NIfTI files themselves")
    if _is_bids_dataset(folder):
        files = sorted({*folder.glob("sub-*/anat/*"), *folder.glob("sub-*/ses-*/anat/*")})
        return [InputVolume(volume_id(p), p, "BIDS dataset") for p in files
                if p.is_file() and is_bids_source(p.name, contrast)]
    subjects, brats_notes = scan_source_only(folder, contrast=contrast)
    notes.extend(brats_notes)
    return [InputVolume(sid, path, "BraTS folder") for sid, path in subjects.items()]


def find_inputs(items: list[str], contrast: str | None) -> tuple[list[InputVolume], list[tuple[str, int, str, list[str]]]]:
    """Every volume the inputs name, and per input ``(input, volumes found, kind, notes)`` to tell the user.

    Args:
        items: Files, globs and folders, as given.
        contrast: The model's source contrast (``t1``, ...), or None when its data does not say.

    Raises:
        DataError: One line naming the input: nothing there, not NIfTI, no
            volume of the source contrast, or two inputs giving one id.
    """
    volumes: list[InputVolume] = []
    found: list[tuple[str, int, str, list[str]]] = []
    for item in items:
        notes: list[str] = []
        if _GLOB.search(item) and not Path(item).exists():
            paths = [Path(p) for p in sorted(glob.glob(item))]
            if not paths:
                raise DataError(f"{item}: no file matches this pattern")
            these = []
            for path in paths:
                these.extend(_folder(path, contrast, notes) if path.is_dir() else [_file(path, "glob")])
            kind = "glob"
        else:
            path = Path(item)
            if path.is_dir():
                these = _folder(path, contrast, notes)
                kind = these[0].kind if these else "folder"
            else:
                these, kind = [_file(path, "file")], "file"
        if not these:
            raise DataError(f"{item}: no NIfTI volume of the model's source contrast ({contrast}) found there")
        volumes.extend(these)
        found.append((item, len(these), kind, notes))
    ids = [volume.id for volume in volumes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"two inputs would write the same outputs: {', '.join(duplicates)} "
                        "(their files have the same subject id)")
    return volumes, found


def _file(path: Path, kind: str) -> InputVolume:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if nifti_stem(path.name) is None:
        raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    return InputVolume(volume_id(path), path, kind)
