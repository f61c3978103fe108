"""Atomic file writes: readers never see half a file; and a record of what a run wrote.

Data goes to a temporary file in the destination's directory, is flushed and
fsynced, and is then renamed over the destination (atomic on POSIX). A write
the system refuses (disk full, read-only folder) is the user's to fix: it is
an :class:`~uqsynth.errors.OutputError` naming the file, not a traceback.

Inside a run directory that is being recorded (:func:`recording`), the
writer also keeps the run's :class:`FileRecord`: each temporary is listed
before it is created and each result before it is renamed into place, so a
run killed at any instant has listed every file it left. Cleaning up after
a killed run and ``--force`` remove what the record lists and nothing else,
and a write never replaces a file the record does not list (a file the user
put there). :func:`refuse_replacing` is the same promise for commands that
write beside their inputs (``uqsynth predict``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from uqsynth.errors import ConfigError, OutputError

#: The record of a run's files, at the top of its directory (hidden: it is bookkeeping, not a result).
RECORD = ".uqsynth-files"
TEMPORARY, RESULT = "temporary", "file"


class FileRecord:
    """The files (results and temporaries) a run created under ``root``, as paths relative to it.

    Kept as JSON lines appended to ``root/.uqsynth-files``: one line per new
    entry, flushed before the file it names is created, so a killed run's
    record is complete. Several processes of one run (torchrun) append to
    the same file; an entry another process added is found by reading the
    file again. Only the run's owner (the holder of its lock) compacts it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / RECORD
        self._entries: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        """Read the entries from disk (those other processes of the run added included)."""
        self._entries = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, NotADirectoryError):  # no record (yet)
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: the record of this run's files is unreadable ({exc})") from None
        for line in lines:
            try:
                kind, relative = json.loads(line)
            except (ValueError, TypeError):
                continue  # a line cut by a power loss names nothing that was created after it
            self._entries[relative] = kind

    def relative(self, path: str | Path) -> str | None:
        """``path`` relative to the record's root (links and ``..`` resolved), or None when it lies outside."""
        path = Path(path)
        try:
            return (path.parent.resolve() / path.name).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def add(self, kind: str, path: str | Path) -> None:
        """List ``path`` as a ``"file"`` or a ``"temporary"`` of the run, before it is created."""
        relative = self.relative(path)
        if relative is None or self._entries.get(relative) == kind:
            return
        with open(self.path, "a", encoding="utf-8") as handle:  # one short write: appends do not interleave
            handle.write(json.dumps([kind, relative]) + "\n")
            if kind == RESULT:  # on disk before the fsynced result is renamed into place, so a power loss keeps both
                handle.flush()
                os.fsync(handle.fileno())
        self._entries[relative] = kind

    def owns(self, path: str | Path) -> bool:
        """Whether the run created ``path`` (as a result or a temporary)."""
        relative = self.relative(path)
        if relative is None:
            return False
        if relative not in self._entries:
            self.reload()
        return relative in self._entries

    def paths(self, kind: str) -> list[Path]:
        """The listed paths of ``kind`` that exist now inside the run, deepest first (so emptied folders can follow).

        A listed path reached through a folder that is now a symbolic link
        is not the run's any more (a user may have linked their own data
        there): it is left out, so nothing removes a file through a link.
        """
        found = [self.root / r for r, k in self._entries.items() if k == kind]
        inside = (p for p in found if (p.is_file() or p.is_symlink()) and not linked_below(self.root, p.parent))
        return sorted(inside, key=lambda p: (-len(p.parts), p))

    def compact(self) -> None:
        """Rewrite the record with only the results that still exist; remove it when none do.

        Temporaries are dropped: the owner calls this when no write is under
        way (the temporaries of killed writes are removed first). A run
        directory left with nothing but its lock is an empty folder again.
        """
        self.reload()
        kept = [r for r, k in self._entries.items() if k == RESULT and (self.root / r).is_file()]
        self._entries = dict.fromkeys(kept, RESULT)
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        scratch = self.path.with_name(self.path.name + ".new")
        try:
            with open(scratch, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps([RESULT, r]) + "\n" for r in kept)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(scratch, self.path)
        except OSError:  # a full disk: the longer record is still a true one, and the run's own error matters more
            scratch.unlink(missing_ok=True)


def linked_below(root: Path, folder: Path) -> bool:
    """Whether ``folder`` or one of its parents up to (not including) ``root`` is a symbolic link."""
    for part in (folder, *folder.parents):
        if part == root:
            return False
        if part.is_symlink():
            return True
    return True  # not below root at all


_ACTIVE: list[FileRecord] = []


@contextlib.contextmanager
def recording(root: str | Path, *, owner: bool = False) -> Iterator[FileRecord]:
    """Record every :func:`atomic_path` write under ``root`` in its :class:`FileRecord` while active.

    Args:
        root: The run directory.
        owner: This process holds the run's lock: it compacts the record on the way out.
    """
    record = FileRecord(root)
    _ACTIVE.append(record)
    try:
        yield record
    finally:
        _ACTIVE.remove(record)
        if owner:
            record.compact()


def active_record(path: str | Path) -> FileRecord | None:
    """The record that ``path`` falls under, if a run directory holding it is being recorded."""
    for record in reversed(_ACTIVE):
        if record.relative(path) is not None:
            return record
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The caller writes the temporary file by any means (e.g. a library that
    only accepts a file name). On an exception it is removed and ``path`` is
    left as it was. Under a recorded run directory both are listed in its
    record first (see :func:`recording`).

    Raises:
        OutputError: The system refused a write (``OSError``: no space left,
            permission denied, ...), or ``path`` is a file of a recorded run
            directory that the run did not create; one line naming ``path``.
    """
    path = Path(path)
    record = active_record(path)
    if record is not None and (path.exists() or path.is_symlink()) and not record.owns(path):
        raise OutputError(f"cannot write {path}: uqsynth did not create that file, so it does not replace it; "
                          "move it away, or choose another --out")
    suffix = "".join(path.suffixes)  # keep ".nii.gz" so libraries pick the right format
    # Named here (not by mkstemp) so that the record lists it before it exists.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        if record is not None:
            record.add(TEMPORARY, tmp)
        # 0o666 less the umask, as for any new file (mkstemp's 0600 would hide results from the group).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if record is not None:
            record.add(RESULT, path)  # before the rename: a kill between the two leaves no unlisted result
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise


def _cannot_write(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {error.strerror or error}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts; the columns are their keys in first-seen order) as CSV, atomically."""
    import csv
    import io

    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _identities(path: Path) -> set[object]:
    """What writing to, or reading from, ``path`` reaches: its directory entry and the file behind it.

    The entry once links and ``..`` in its folder are resolved, the file a
    link at ``path`` points to, and, for a file that exists, its device and
    inode (as :func:`os.path.samefile` compares them: hard links included).
    """
    found: set[object] = {path.parent.resolve() / path.name, path.resolve()}
    try:
        status = path.stat()
    except OSError:  # not there (yet)
        return found
    found.add((status.st_dev, status.st_ino))
    return found


def refuse_replacing(outputs: Iterable[str | Path], inputs: Iterable[tuple[str, str | Path]], where: str) -> None:
    """Refuse, before anything is written, an output that would replace or change one of the inputs.

    Args:
        outputs: Every path the command is about to write.
        inputs: ``(what, path)`` of every file it reads (``what`` names the
            option it came from, e.g. ``"--input"``).
        where: How the message names the output folder (``"--out d"``).

    Raises:
        ConfigError: An output reaches an input; one line naming both.
    """
    reached: dict[object, tuple[str, Path]] = {}
    for what, source in inputs:
        for identity in _identities(Path(source)):
            reached.setdefault(identity, (what, Path(source)))
    for output in outputs:
        for identity in _identities(Path(output)):
            if identity in reached:
                what, source = reached[identity]
                raise ConfigError(f"{where}: the output {output} would replace the input {source} ({what}); "
                                  "choose another --out")
