"""Paired NIfTI volumes in any folder layout, described by glob patterns.

For data that is not a BraTS release (BIDS, IXI, in-house exports): say where
source and target files are, relative to the root, e.g.
``source_glob = "*/anat/*_T1w.nii.gz"`` and ``target_glob = "*/anat/*_FLAIR.nii.gz"``,
and files are paired by subject id. The id is the first folder of the path
below the root (``sub-01/anat/...`` -> ``sub-01``), or the one group of
``subject_pattern`` searched in the relative path (e.g. ``r"(sub-\\d+)"``).

Globs are matched against the files found by :func:`uqsynth.data.discovery.walk`
(symbolic links followed, hidden entries left out), without regard to case,
and a glob's NIfTI ending stands for either (``*_T1w.nii.gz`` also matches
``sub-03_t1w.nii``): exports of one cohort differ in exactly these ways, and
a subject lost to them would vanish without a word. ``*`` and ``?`` stay
within one folder name, ``**`` spans any number of folders. NIfTI files no
glob matched are listed by ``scan_summary()``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from fnmatch import fnmatchcase
from pathlib import Path

from uqsynth.data.base import Dataset, SubjectVolumes
from uqsynth.data.discovery import Walk, left_out, nifti_stem, walk
from uqsynth.data.nifti import load_pair
from uqsynth.errors import ConfigError, DataError


def _compile(subject_pattern: str | None) -> re.Pattern[str] | None:
    if subject_pattern is None:
        return None
    try:
        pattern = re.compile(subject_pattern)
    except re.error as error:
        raise ConfigError(f"subject_pattern {subject_pattern!r} is not a valid regex: {error}") from error
    if pattern.groups != 1:
        raise ConfigError(
            f"subject_pattern {subject_pattern!r} must have exactly one group (the subject id); "
            f"it has {pattern.groups}"
        )
    return pattern


def _subject_of(relative: Path, pattern: re.Pattern[str] | None, root: Path, glob_name: str) -> str:
    if pattern is None:
        if len(relative.parts) < 2:
            raise DataError(
                f"file {root / relative} (matched by {glob_name}) is not inside a subject folder; "
                "give subject_pattern to take the subject id from the file name"
            )
        return relative.parts[0]
    match = pattern.search(relative.as_posix())
    if match is None or not match.group(1):
        raise DataError(
            f"file {root / relative} (matched by {glob_name}): subject_pattern "
            f"{pattern.pattern!r} does not match its path {relative.as_posix()!r}"
        )
    return match.group(1)


class Glob:
    """A glob relative to the root, matched per folder name in any case; a NIfTI ending matches either.

    ``*``, ``?`` and ``[...]`` follow :func:`fnmatch.fnmatchcase` within one
    name; ``**`` stands for any number of folders (none included).
    """

    def __init__(self, glob: str, glob_name: str) -> None:
        if not glob or glob.startswith("/"):
            raise ConfigError(f"{glob_name} {glob!r} is not a pattern relative to the root (empty or absolute)")
        self.parts = glob.lower().split("/")
        self.nifti = nifti_stem(self.parts[-1]) is not None
        if self.nifti:
            self.parts[-1] = nifti_stem(self.parts[-1])

    def matches(self, relative: Path) -> bool:
        """Whether the path (relative to the root) is one this glob names."""
        names = [name.lower() for name in relative.parts]
        if self.nifti:
            names[-1] = nifti_stem(names[-1]) or names[-1] + "/"  # "/" never matches: not a NIfTI name
        return _match(self.parts, names)


def _match(parts: list[str], names: list[str]) -> bool:
    if not parts:
        return not names
    head, rest = parts[0], parts[1:]
    if head == "**":
        return any(_match(rest, names[i:]) for i in range(len(names) + 1))
    return bool(names) and fnmatchcase(names[0], head) and _match(rest, names[1:])


def _collect(
    walked: Walk, glob: str, glob_name: str, pattern: re.Pattern[str] | None
) -> dict[str, Path]:
    """Map subject id -> the one file matched by ``glob``."""
    root = walked.root
    matcher = Glob(glob, glob_name)
    by_subject: dict[str, list[Path]] = defaultdict(list)
    for path in walked.files:
        relative = path.relative_to(root)
        if matcher.matches(relative):
            by_subject[_subject_of(relative, pattern, root, glob_name)].append(path)
    for subject_id, paths in by_subject.items():
        if len(paths) > 1:
            raise DataError(
                f"duplicate subject id {subject_id}: {glob_name} {glob!r} matches both "
                f"{paths[0]} and {paths[1]}"
            )
    return {subject_id: paths[0] for subject_id, paths in by_subject.items()}


def _check_distinct(pairs: dict[str, tuple[Path, Path]]) -> None:
    # One folder linked into the root under two names would be two "subjects"
    # with the same images, one of which may land in the test set.
    seen: dict[tuple[int, int], tuple[str, Path]] = {}
    for subject_id, paths in pairs.items():
        for path in paths:
            status = path.stat()
            key = (status.st_dev, status.st_ino)
            if key in seen and seen[key][0] != subject_id:
                other_id, other = seen[key]
                raise DataError(
                    f"subjects {other_id} and {subject_id} read the same file ({other} and {path}); "
                    "is a folder linked into the root twice?"
                )
            seen.setdefault(key, (subject_id, path))


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")


def _pair(
    root: Path, sources: dict[str, Path], targets: dict[str, Path], globs: tuple[str, str]
) -> dict[str, tuple[Path, Path]]:
    for name, found, glob in (("source_glob", sources, globs[0]), ("target_glob", targets, globs[1])):
        if not found:
            raise DataError(f"no NIfTI files under {root} match {name} {glob!r}")
    shared = set(sources.values()) & set(targets.values())
    if shared:
        raise DataError(f"file {min(shared)} matches both source_glob and target_glob; make them distinct")
    for have, lack, found, missing in (
        ("source", "target", sources, targets),
        ("target", "source", targets, sources),
    ):
        unmatched = sorted(found.keys() - missing.keys())
        if unmatched:
            first, others = unmatched[0], len(unmatched) - 1
            glob = globs[0] if lack == "source" else globs[1]
            raise DataError(
                f"subject {first}: {have} file {found[first]} has no {lack} file matching "
                f"{lack}_glob {glob!r}" + (f" ({others} more subjects alike)" if others else "")
            )
    return {subject_id: (sources[subject_id], targets[subject_id]) for subject_id in sorted(sources)}


class PairedNiftiDataset(Dataset):
    """Paired source/target NIfTI files anywhere below a root, found by globs.

    Every source file needs exactly one target file with the same subject id
    and vice versa; with ``mask_glob`` every subject needs a mask (masks of
    subjects that have no source/target are ignored).

    Args:
        root: Folder the globs are relative to.
        source_glob: Pattern of the input files, e.g. ``"*/anat/*_T1w.nii.gz"``.
        target_glob: Pattern of the files to synthesize, e.g. ``"*/anat/*_FLAIR.nii.gz"``.
        subject_pattern: Regex with one group, searched in each file's path
            relative to ``root`` (with ``/`` separators), giving the subject id.
            Default: the first folder below ``root``.
        mask_glob: Pattern of brain mask files (nonzero voxels = brain).
            Default: the nonzero voxels of the source.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        source_glob: str,
        target_glob: str,
        subject_pattern: str | None = None,
        mask_glob: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.source_glob = source_glob
        self.target_glob = target_glob
        self.subject_pattern = subject_pattern
        self.mask_glob = mask_glob
        _check_root(self.root)
        pattern = _compile(subject_pattern)
        walked = walk(self.root)
        sources = _collect(walked, source_glob, "source_glob", pattern)
        targets = _collect(walked, target_glob, "target_glob", pattern)
        self._pairs = _pair(self.root, sources, targets, (source_glob, target_glob))
        _check_distinct(self._pairs)
        self._masks: dict[str, Path] = {}
        if mask_glob is not None:
            self._masks = _collect(walked, mask_glob, "mask_glob", pattern)
            for subject_id in self._pairs:
                if subject_id not in self._masks:
                    raise DataError(
                        f"subject {subject_id}: no mask file matching mask_glob {mask_glob!r} "
                        f"(source file {self._pairs[subject_id][0]})"
                    )
        self.notes_ = self._notes(walked)

    def _notes(self, walked: Walk) -> list[str]:
        used = {path for pair in self._pairs.values() for path in pair}
        masks = {path for subject_id, path in self._masks.items() if subject_id in self._pairs}
        stray_masks = sorted(set(self._masks.values()) - masks)
        globs = ", ".join(name for name, glob in (("source_glob", self.source_glob), ("target_glob", self.target_glob),
                                                  ("mask_glob", self.mask_glob)) if glob is not None)
        unmatched = [path for path in walked.files if path not in used | masks | set(stray_masks)]
        return [
            f"found {len(self._pairs)} subject(s) under {self.root}",
            *left_out(self.root, unmatched, "NIfTI file", "NIfTI files", f"matched by none of {globs}"),
            *left_out(self.root, stray_masks, "mask file", "mask files", "their subjects have no source and target"),
            *walked.notes(),
        ]

    def subject_ids(self) -> list[str]:
        """Return the subject ids, sorted."""
        return sorted(self._pairs)

    def scan_summary(self) -> list[str]:
        """How many subjects the scan found, and each NIfTI file it left out, with why."""
        return list(self.notes_)

    def load(self, subject_id: str) -> SubjectVolumes:
        """Load and validate one subject's source, target (and mask) volumes."""
        if subject_id not in self._pairs:
            raise DataError(f"subject {subject_id}: not found under dataset root {self.root}")
        source_path, target_path = self._pairs[subject_id]
        return load_pair(
            source_path, target_path, subject_id=subject_id, mask_path=self._masks.get(subject_id),
            mask_option="the paired_nifti dataset's mask_glob option",
        )

    def __repr__(self) -> str:
        return (
            f"PairedNiftiDataset(root={str(self.root)!r}, source_glob={self.source_glob!r}, "
            f"target_glob={self.target_glob!r}, subjects={len(self._pairs)})"
        )
