"""BraTS challenge folders: every release's file naming, detected per root.

Two naming schemes cover the releases:

* BraTS 2018-2021: ``<id>/<id>_t1.nii.gz``, ``_t2``, ``_flair``, ``_t1ce``, ``_seg``
  (2021 only changed the ids, e.g. ``BraTS2021_00000``);
* BraTS 2023 and later: ``<id>/<id>-t1n.nii.gz``, ``-t2w``, ``-t2f``, ``-t1c``, ``-seg``.

Either may be ``.nii`` or ``.nii.gz``, and names are matched without regard
to case (``S01_T1.NII.GZ``; the BraTS-TCGA segmentations' ``_t1Gd`` is the
2018-2021 naming's ``t1ce``). Users name contrasts generically
(``t1``, ``t2``, ``flair``, ``t1ce``) and the detected naming maps them to
file suffixes, so one configuration works on any release. Subject folders are
found at any depth below the root (the 2018 release nests them in ``HGG/`` and
``LGG/``), through symbolic links (:mod:`uqsynth.data.discovery`); a subject's
id is taken from its file names, and all of a subject's files must sit in one
folder. What the scan did not use (files of no naming, other contrasts,
folders with no subject, hidden twins) is listed by ``scan_summary()``.

Region labels: a subject's tumour segmentation (``<id>_seg`` or ``<id>-seg``),
when it has one, becomes ``SubjectVolumes.regions`` so evaluation reports
coverage inside each tumour part and in the rest of the brain. Its labels
are those of the release (:attr:`Naming.seg_labels`: 1 necrotic /
non-enhancing core, 2 edema, 4 enhancing tumour in 2018-2021, 3 in 2023+);
brain-mask voxels outside the tumour get :data:`NON_TUMOUR_LABEL`
("non-tumour brain"). A segmentation on another grid than the source, or
with labels the release does not use, is refused naming the file; a subject
without one has ``regions = None``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uqsynth.data.base import Dataset, SubjectVolumes
from uqsynth.data.discovery import Walk, describe_endings, leaf_folders, left_out, walk
from uqsynth.data.nifti import load_labels, load_pair
from uqsynth.errors import ConfigError, DataError

#: Generic contrast names users may ask for.
CONTRASTS = ("t1", "t2", "flair", "t1ce")

#: How messages name each contrast.
ROLES = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR", "t1ce": "T1ce", "seg": "seg"}

#: Region label of the brain-mask voxels outside the tumour (no BraTS release uses it).
NON_TUMOUR_LABEL = 10

#: Name of the :data:`NON_TUMOUR_LABEL` region.
NON_TUMOUR_NAME = "non-tumour brain"


@dataclass(frozen=True)
class Naming:
    """One release family's file naming: ``<id><separator><suffix>.nii[.gz]``, and its segmentation labels."""

    name: str
    separator: str
    suffixes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    seg_labels: dict[int, str] = field(default_factory=dict)

    def example(self, contrast: str) -> str:
        """Show the expected path for ``contrast``, for messages."""
        return f"<id>/<id>{self.separator}{self.suffix(contrast)}.nii[.gz]"

    def suffix(self, contrast: str) -> str:
        """Map a generic contrast name (or a literal suffix such as a mask's) to this naming, in lower case."""
        return self.suffixes.get(contrast, contrast).lower()

    def canonical(self, suffix: str) -> str:
        """The suffix a matched one stands for (lower case, aliases resolved)."""
        suffix = suffix.lower()
        return self.aliases.get(suffix, suffix)

    def pattern(self, extra: tuple[str, ...] = ()) -> re.Pattern[str]:
        """Regex giving ``id`` and ``suffix`` for a file name of this naming, in any case."""
        suffixes = sorted({*self.suffixes.values(), *self.aliases, *extra}, key=len, reverse=True)
        alternatives = "|".join(re.escape(suffix) for suffix in suffixes)
        separator = re.escape(self.separator)
        return re.compile(rf"^(?P<id>.+){separator}(?P<suffix>{alternatives})\.nii(?:\.gz)?$", re.IGNORECASE)


NAMINGS = (
    Naming(
        "BraTS 2018-2021",
        "_",
        {"t1": "t1", "t2": "t2", "flair": "flair", "t1ce": "t1ce", "seg": "seg"},
        {"t1gd": "t1ce"},  # BraTS-TCGA-GBM/LGG (TCIA) name the contrast-enhanced T1 "t1Gd"
        seg_labels={1: "necrotic/non-enhancing core", 2: "edema", 4: "enhancing tumour"},
    ),
    Naming(
        "BraTS 2023+",
        "-",
        {"t1": "t1n", "t2": "t2w", "flair": "t2f", "t1ce": "t1c", "seg": "seg"},
        seg_labels={1: "necrotic/non-enhancing core", 2: "edema", 3: "enhancing tumour"},
    ),
)


@dataclass
class _Subject:
    folder: Path
    files: dict[str, list[Path]]


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"BraTS root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"BraTS root {root} is not a directory")


def _check_contrast(name: str, what: str) -> None:
    if name not in CONTRASTS:
        raise ConfigError(f"unknown {what} contrast {name!r}; expected one of {', '.join(CONTRASTS)}")


def _detect(
    walked: Walk, extra: tuple[str, ...]
) -> tuple[Naming, list[tuple[Path, re.Match[str]]], list[Path]]:
    """Find the one naming used under the root, the files that follow it and those that follow none."""
    root = walked.root
    by_naming: dict[str, list[tuple[Path, re.Match[str]]]] = defaultdict(list)
    folders: dict[Path, set[str]] = defaultdict(set)
    unnamed: list[Path] = []
    patterns = [(n, n.pattern(tuple(n.suffix(e) for e in extra))) for n in NAMINGS]
    for path in walked.files:
        matched = False
        for naming, pattern in patterns:
            match = pattern.match(path.name)
            if match:
                matched = True
                by_naming[naming.name].append((path, match))
                folders[path.parent].add(naming.name)
        if not matched:
            unnamed.append(path)
    if not by_naming:
        looked_for = " and ".join(f"{n.example('t1')} ({n.name})" for n in NAMINGS)
        held = (f"; its {len(unnamed)} NIfTI file(s) follow neither, e.g. {unnamed[0].relative_to(root)}"
                if unnamed else "; it holds no NIfTI files (.nii or .nii.gz)")
        raise DataError(f"no BraTS subjects found under {root}: looked for {looked_for}{held}")
    for folder, names in folders.items():
        if len(names) > 1:
            raise DataError(
                f"folder {folder} mixes BraTS namings ({' and '.join(sorted(names))}); "
                "keep one naming per root"
            )
    if len(by_naming) > 1:
        examples = ", ".join(
            f"{next(p.parent for p, _ in files)} uses {name}" for name, files in sorted(by_naming.items())
        )
        raise DataError(f"BraTS root {root} mixes namings: {examples}; keep one naming per root")
    (name, files), = by_naming.items()
    return next(n for n in NAMINGS if n.name == name), files, unnamed


def _group(files: list[tuple[Path, re.Match[str]]], naming: Naming) -> dict[str, _Subject]:
    subjects: dict[str, _Subject] = {}
    for path, match in files:
        subject_id, suffix = match["id"], naming.canonical(match["suffix"])
        subject = subjects.setdefault(subject_id, _Subject(path.parent, defaultdict(list)))
        if subject.folder != path.parent:
            raise DataError(
                f"duplicate subject id {subject_id}: found in {subject.folder} and in {path.parent}"
            )
        subject.files[suffix].append(path)
    return subjects


def _one_file(
    subject_id: str, subject: _Subject, naming: Naming, contrast: str, *, required: bool = True
) -> Path | None:
    suffix = naming.suffix(contrast)
    paths = subject.files.get(suffix, [])
    role = ROLES.get(contrast, contrast)
    if not paths and not required:
        return None
    if not paths:
        expected = f"{subject_id}{naming.separator}{suffix}.nii[.gz]"
        raise DataError(f"subject {subject_id}: no {role} file {expected} in {subject.folder}")
    if len(paths) > 1:
        raise DataError(
            f"duplicate subject id {subject_id}: two {role} files {paths[0]} and {paths[1]}"
        )
    return paths[0]


def _notes(
    walked: Walk,
    naming: Naming,
    subjects: dict[str, _Subject],
    unnamed: list[Path],
    contrasts: tuple[str, ...],
) -> list[str]:
    """``scan_summary()``: how many subjects, and every file or folder the scan did not use, with why."""
    root = walked.root
    used = {naming.suffix(c) for c in contrasts}
    unused = {path: suffix for s in subjects.values() for suffix, paths in s.files.items() if suffix not in used
              for path in paths}
    holding = {path.parent for path in walked.files}  # unnamed NIfTI files are listed one by one above
    empty = [folder for folder in leaf_folders(walked) if folder not in holding and folder != root]
    return [
        f"found {len(subjects)} subject(s) under {root} ({naming.name} naming, {naming.example(contrasts[0])})",
        *left_out(root, unnamed, "NIfTI file", "NIfTI files", f"named in no BraTS naming, e.g. not {naming.example('t1')}"),
        *left_out(root, list(unused), "file", "files",
                  f"contrasts not asked for: {', '.join(sorted(set(unused.values())))}"),
        *left_out(root, empty, "folder", "folders", "no subject files in it",
                  {folder: describe_endings(walked.folders[folder]) for folder in empty}),
        *walked.notes(),
    ]


def _scan(
    root: str | Path, contrasts: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[Naming, dict[str, dict[str, Path]], list[str]]:
    """Map every subject under ``root`` to its file for each of ``contrasts``; also the scan's notes.

    ``optional`` contrasts (e.g. ``"seg"``) are mapped where a subject has one
    and left out of its mapping where it has none.
    """
    root = Path(root)
    _check_root(root)
    walked = walk(root)
    naming, files, unnamed = _detect(walked, contrasts)
    subjects = _group(files, naming)
    found = {}
    for subject_id, subject in sorted(subjects.items()):
        found[subject_id] = {c: _one_file(subject_id, subject, naming, c) for c in contrasts}
        for contrast in optional:
            if contrast not in contrasts:
                path = _one_file(subject_id, subject, naming, contrast, required=False)
                if path is not None:
                    found[subject_id][contrast] = path
    used = contrasts + tuple(c for c in optional if c not in contrasts)
    return naming, found, _notes(walked, naming, subjects, unnamed, used)


def detect_naming(root: str | Path) -> str:
    """Return the name of the BraTS naming used under ``root`` (e.g. ``"BraTS 2023+"``)."""
    root = Path(root)
    _check_root(root)
    return _detect(walk(root), ())[0].name


def find_subjects(
    root: str | Path, source: str = "t1", target: str = "t2"
) -> dict[str, tuple[Path, Path]]:
    """Find every subject's source and target file under a BraTS root.

    Args:
        root: Folder holding the subject folders (at any depth).
        source: Generic contrast name of the input (``t1``, ``t2``, ``flair``, ``t1ce``).
        target: Generic contrast name to synthesize.

    Returns:
        ``{subject_id: (source_path, target_path)}`` sorted by id.

    Raises:
        DataError: Root missing, no subjects, a file missing, duplicate ids, mixed namings.
    """
    _check_contrast(source, "source")
    _check_contrast(target, "target")
    if source == target:
        raise ConfigError(f"source and target contrast are both {source!r}")
    _, found, _ = _scan(root, (source, target))
    return {sid: (files[source], files[target]) for sid, files in found.items()}


def find_source_only(root: str | Path, contrast: str = "t1") -> dict[str, Path]:
    """Find every subject's file of one contrast, for prediction inputs without a target.

    Returns:
        ``{subject_id: path}`` sorted by id; every subject found must have the contrast.
    """
    return scan_source_only(root, contrast)[0]


def scan_source_only(root: str | Path, contrast: str = "t1") -> tuple[dict[str, Path], list[str]]:
    """:func:`find_source_only` and the scan's notes (what was found, what was left out and why)."""
    _check_contrast(contrast, "source")
    _, found, notes = _scan(root, (contrast,))
    return {sid: files[contrast] for sid, files in found.items()}, notes


class BratsDataset(Dataset):
    """Paired volumes from a BraTS release folder (any year's naming).

    Args:
        root: Folder of subject folders, e.g. ``MICCAI_BraTS_2018_Data_Training``.
        source: Generic contrast name of the input (the paper: ``t1``).
        target: Generic contrast name to synthesize (the paper: ``t2``).
        mask: Per-subject file whose nonzero voxels are the brain mask, named
            like the contrasts: ``"seg"`` (the tumour labels), a contrast name,
            or a literal suffix such as ``"brainmask"`` for ``<id>_brainmask.nii.gz``.
            ``None`` (the paper): the nonzero voxels of the source.
        regions: Read each subject's segmentation, when it has one, as its
            region labels (see the module docstring); ``False``: never.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        source: str = "t1",
        target: str = "t2",
        mask: str | None = None,
        regions: bool = True,
    ) -> None:
        self.root = Path(root)
        self.source = source
        self.target = target
        self.mask = mask
        self.regions = bool(regions)
        _check_contrast(source, "source")
        _check_contrast(target, "target")
        if source == target:
            raise ConfigError(f"source and target contrast are both {source!r}")
        contrasts = (source, target) if mask is None else (source, target, mask)
        self.naming_, self._files, self.notes_ = _scan(self.root, contrasts, ("seg",) if self.regions else ())

    def subject_ids(self) -> list[str]:
        """Return the subject ids, sorted."""
        return sorted(self._files)

    def scan_summary(self) -> list[str]:
        """How many subjects the scan found, and each file or folder it left out, with why."""
        return list(self.notes_)

    def load(self, subject_id: str) -> SubjectVolumes:
        """Load and validate one subject's source, target (and mask) volumes, and its region labels."""
        files = self._files.get(subject_id)
        if files is None:
            raise DataError(f"subject {subject_id}: not found under BraTS root {self.root}")
        volumes = load_pair(
            files[self.source],
            files[self.target],
            subject_id=subject_id,
            mask_path=files[self.mask] if self.mask is not None else None,
            source_role=ROLES[self.source],
            target_role=ROLES[self.target],
            mask_option='the brats dataset\'s mask option, e.g. mask = "brainmask" for <id>_brainmask.nii.gz',
        )
        seg = files.get("seg") if self.regions else None
        if seg is not None:
            volumes.regions, volumes.region_names = self._regions(volumes, seg, files[self.source])
            volumes.info["seg_path"] = seg
        return volumes

    def _regions(self, volumes: SubjectVolumes, seg: Path, source: Path) -> tuple[np.ndarray, dict[int, str]]:
        """The segmentation's tumour labels, and :data:`NON_TUMOUR_LABEL` on the rest of the brain mask."""
        labels = load_labels(seg, role="seg", subject_id=volumes.subject_id, like=volumes, like_path=source)
        known = self.naming_.seg_labels
        unknown = sorted(set(np.unique(labels).tolist()) - {0, *known})
        if unknown:
            expected = ", ".join(f"{label} {name}" for label, name in known.items())
            raise DataError(
                f"subject {volumes.subject_id}: seg file {seg} holds label value(s) "
                f"{', '.join(str(v) for v in unknown)}, which {self.naming_.name} segmentations do not use "
                f"(0 background, {expected}); fix the file, or set the brats dataset's regions = false"
            )
        regions = labels.astype(np.int16)
        regions[(labels == 0) & volumes.mask] = NON_TUMOUR_LABEL
        return regions, {**known, NON_TUMOUR_LABEL: NON_TUMOUR_NAME}

    def __repr__(self) -> str:
        return (
            f"BratsDataset(root={str(self.root)!r}, source={self.source!r}, "
            f"target={self.target!r}, mask={self.mask!r}, regions={self.regions!r}, subjects={len(self._files)})"
        )
