"""Finding the files under a data root: links followed, nothing left out unsaid.

Every loader that scans a folder (:mod:`uqsynth.data.brats`,
:mod:`uqsynth.data.paired_nifti`, and ``uqsynth predict --input DIR``) walks it
with :func:`walk`, so they agree on what a root holds:

* Symbolic links are followed, to folders and to files, because a cohort is
  usually assembled by linking subject folders from elsewhere (``Path.rglob``
  in Python 3.11 does not follow linked folders, which made such a root look
  empty, or silently smaller). A link back to a folder being walked (a loop)
  is not followed again and is reported. A broken link is an error naming
  it: it points at data the user meant to include.
* NIfTI files are recognized by name without regard to case, ``.nii`` or
  ``.nii.gz`` (some exports write ``S01_T1.NII.GZ``).
* Hidden entries (names starting with ``.``: the ``._<name>`` twins macOS
  leaves in unpacked archives, ``.git``) are not read, and reported when they
  are folders or look like NIfTI files.
* A folder that cannot be listed is an error, not a skipped subtree.

Loaders turn what they did not use into lines with :func:`left_out`; a
dataset exposes them as ``scan_summary()``, which ``uqsynth run`` prints.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uqsynth.errors import DataError

#: A NIfTI file name, in any case: ``<stem>.nii`` or ``<stem>.nii.gz``.
NIFTI_NAME = re.compile(r"^(?P<stem>.+)\.nii(?:\.gz)?$", re.IGNORECASE)

#: How many paths a :func:`left_out` line shows before "and N more".
EXAMPLES = 3


def nifti_stem(name: str) -> str | None:
    """Return the name without its NIfTI ending (any case), or ``None`` if it is not a NIfTI name."""
    match = NIFTI_NAME.match(name)
    return match["stem"] if match else None


@dataclass
class Walk:
    """What a walk of a root found, paths as seen from the root (through links).

    Attributes:
        root: The folder walked.
        files: NIfTI-named files, sorted.
        folders: Every folder walked, the root included, with how many files
            of each ending (``.nii.gz``, ``.mha``, ...) it holds itself.
        hidden: Hidden folders and hidden NIfTI-named files, not read.
        loops: Links to a folder already being walked, not followed again.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    folders: dict[Path, Counter] = field(default_factory=dict)
    hidden: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The lines every loader reports: hidden entries and link loops."""
        return [
            *left_out(self.root, self.hidden, "hidden entry", "hidden entries",
                      "names starting with '.', e.g. macOS '._' twins; not read"),
            *left_out(self.root, self.loops, "link", "links", "they loop back to a folder already searched"),
        ]


def describe_endings(endings: Counter) -> str:
    """What a folder holds, for messages: ``"2 .mha files"``, ``"empty"``."""
    if not endings:
        return "empty"
    return ", ".join(f"{n} {ending} file{'s' if n > 1 else ''}" for ending, n in sorted(endings.items()))


def leaf_folders(walked: Walk) -> list[Path]:
    """The walked folders with no walked folder inside them (where a subject's files would be)."""
    parents = {folder.parent for folder in walked.folders if folder != walked.root}
    return [folder for folder in walked.folders if folder not in parents]


def _ending(name: str) -> str:
    if nifti_stem(name) is not None:
        return ".nii.gz" if name.lower().endswith(".gz") else ".nii"
    suffix = Path(name).suffix.lower()
    return suffix or "(no extension)"


def walk(root: str | Path) -> Walk:
    """Walk ``root`` following links, refusing broken links and unreadable folders.

    Raises:
        DataError: A broken link (named with its target) or a folder that cannot be listed.
    """
    root = Path(root)
    found = Walk(root)

    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise DataError(f"cannot list folder {folder}: {error.strerror or error}") from None
        endings: Counter = Counter()
        found.folders[folder] = endings
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                if entry.is_dir() or nifti_stem(entry.name.lstrip("._")) is not None:
                    found.hidden.append(path)
                continue
            if entry.is_symlink() and not os.path.exists(path):
                raise DataError(f"broken symbolic link {path} -> {os.readlink(path)} (its target does not exist)")
            if entry.is_dir():
                status = entry.stat()
                key = (status.st_dev, status.st_ino)
                if key in ancestors:
                    found.loops.append(path)
                else:
                    visit(path, ancestors | {key})
            elif entry.is_file():
                endings[_ending(entry.name)] += 1
                if nifti_stem(entry.name) is not None:
                    found.files.append(path)

    status = root.stat()
    visit(root, frozenset({(status.st_dev, status.st_ino)}))
    found.files.sort()
    return found


def left_out(
    root: Path, paths: Sequence[Path], one: str, many: str, why: str, detail: dict[Path, str] | None = None
) -> list[str]:
    """One line saying which ``paths`` (relative to ``root``) a loader did not use and why; none if empty.

    ``detail`` adds a note after a shown path (e.g. what a left-out folder holds).
    """
    if not paths:
        return []
    detail = detail or {}
    shown = [
        _relative(root, path) + (f" ({detail[path]})" if path in detail else "") for path in sorted(paths)[:EXAMPLES]
    ]
    more = f" and {len(paths) - EXAMPLES} more" if len(paths) > EXAMPLES else ""
    return [f"left out {len(paths)} {one if len(paths) == 1 else many} ({why}): {', '.join(shown)}{more}"]


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
