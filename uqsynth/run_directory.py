"""The run directory (``--out``): who may write it, and whether it holds this run.

A run directory belongs to one configuration and, while a run is alive, to
one process. :class:`RunLock` takes an exclusive ``flock`` on ``RUN/.lock``
and writes the owner's pid and host into it; the kernel drops the lock when
the owner exits, however it dies (SIGKILL, preemption), so a killed run
never blocks its own restart and there is no stale-lock guessing.
:func:`existing_run_difference` compares a saved ``config.toml`` with the
new configuration (more epochs and another device are the same run), and
:func:`clear_run` removes what a run of another configuration left, for
``--force``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tomllib
from pathlib import Path

from uqsynth.config import Config, config_to_dict
from uqsynth.errors import ConfigError

LOCK_FILE = ".lock"
#: Files a run writes at the top of its directory (arms get one folder each).
RUN_FILES = ("config.toml", "split.json", "timing.json", "metrics.json", "metrics.csv", "report.html")
RUN_FIGURES = "fig*.png"
TEMPORARY_PATTERN = ".*.tmp*"  # what uqsynth._files.atomic_path names its temporary files


class RunLock:
    """An exclusive lock on a run directory for the lifetime of this process (or until :meth:`release`).

    Raises:
        ConfigError: Another live process holds it; the message gives its pid and host.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        try:
            self._handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        except OSError as exc:
            raise ConfigError(f"--out {out_dir}: cannot write the run directory: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            owner = self._handle.read().strip() or "unknown pid"
            self._handle.close()
            raise ConfigError(
                f"--out {out_dir} is in use by another uqsynth run ({owner}); wait for it to finish or "
                "choose another --out"
            ) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._handle.flush()

    def release(self) -> None:
        """Unlock; the file stays (removing it could let two later runs lock different files)."""
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files of atomic writes a killed run left behind (never read); return how many.

    Only safe under the :class:`RunLock`: a live writer's temporaries look the same.
    """
    stale = [path for path in out_dir.rglob(TEMPORARY_PATTERN) if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def existing_run_difference(out_dir: Path, config: Config) -> str | None:
    """The first difference between the run saved in ``out_dir`` and ``config``, or None if it is the same run.

    Epochs and device may differ: training further, or on another device, continues the same run.
    """
    saved = out_dir / "config.toml"
    if not saved.exists():
        return None
    try:
        old = tomllib.loads(saved.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return f"its config.toml is unreadable ({exc})"
    new = config_to_dict(config)
    for tables in (old, new):
        tables.get("train", {}).pop("epochs", None)
        tables.get("run", {}).pop("device", None)
    return _first_difference(old, new)


def check_existing_run(out_dir: Path, config: Config, *, force: bool = False) -> bool:
    """Refuse an ``--out`` holding a run of another configuration, unless ``force``.

    Returns:
        True when ``force`` is needed and given: the caller must :func:`clear_run` once it holds the lock.
    """
    difference = existing_run_difference(out_dir, config)
    if difference is None:
        return False
    if force:
        return True
    raise ConfigError(
        f"--out {out_dir} holds a run with a different configuration ({difference}); choose another --out, "
        "or pass --force to replace it"
    )


def clear_run(out_dir: Path, config: Config) -> list[str]:
    """Remove the files and arm folders a run left in ``out_dir``, before ``config`` runs there; return what was removed.

    Only what a run writes is touched (its top-level files, figures, and the
    folders of the arms named by the saved ``config.toml`` or by ``config``,
    whose folders would otherwise be resumed), so an ``--out`` pointed at a
    folder holding other things keeps them.
    """
    removed = []
    arms: list[str] = list(config.arms)
    try:
        saved = tomllib.loads((out_dir / "config.toml").read_text(encoding="utf-8")).get("arms", {})
        arms += [arm for arm in saved if arm not in arms]
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass  # unreadable: the new configuration's arms are still cleared
    for arm in arms:
        if (out_dir / arm).is_dir():
            shutil.rmtree(out_dir / arm)
            removed.append(arm + "/")
    for path in [*(out_dir / name for name in RUN_FILES), *sorted(out_dir.glob(RUN_FIGURES))]:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed


def _first_difference(old: object, new: object, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r} there, {new!r} now"
