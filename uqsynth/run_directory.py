"""The run directory (``--out``): who may write it, whether it holds this run, and on which data.

A run directory belongs to one configuration and, while a run is alive, to
one process. :class:`RunLock` takes an exclusive ``flock`` on ``RUN/.lock``
and writes the owner's pid and host into it; the kernel drops the lock when
the owner exits, however it dies (SIGKILL, preemption), so a killed run
never blocks its own restart and there is no stale-lock guessing.

uqsynth removes and replaces only files it created. Every file a run writes
is listed in its record (:class:`uqsynth._files.FileRecord`) before it
exists; cleaning up a killed run's temporaries and ``--force``
(:func:`clear_run`) remove what the record lists and nothing else. An
``--out`` that holds files but no record (a data folder, a run of a uqsynth
that kept none) is refused rather than guessed at: a name that merely looks
like a run's file may be the user's. In a run directory, a file the record
does not list where this run writes (an arm's folder, the run's own
top-level names) is refused as well, before anything is written.

A rerun must not reuse state that no longer matches its inputs.
:func:`existing_run_difference` compares a saved ``config.toml`` with the new
configuration (more epochs and another device are the same run);
:func:`inputs_difference` compares ``split.json`` (written before training:
each role's subjects and a digest of each subject's content) with what the
data and configuration give now, so that a subject added, removed or
changed, or a split that would move a training subject into the test set,
is refused instead of scored; :func:`outputs_difference` checks that an
arm's predictions and calibrators were made by the generator beside them.
Each refusal says that ``--force`` retrains.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uqsynth._files import RECORD, RESULT, TEMPORARY, FileRecord, atomic_write_text
from uqsynth.config import Config, config_to_dict
from uqsynth.data.base import SubjectVolumes
from uqsynth.errors import ConfigError

LOCK_FILE = ".lock"
#: What a run directory holds besides the files its record lists.
BOOKKEEPING = (LOCK_FILE, RECORD, RECORD + ".new")
SPLIT_FILE = "split.json"
#: Files a run writes at the top of its directory (arms get one folder each).
RUN_FILES = ("config.toml", SPLIT_FILE, "timing.json", "metrics.json", "metrics.csv", "report.html")
#: Which generator (sha256 of its file) made an arm's predictions and calibrators.
OUTPUTS_FILE = "outputs.json"
PREDICTIONS, CALIBRATORS = "predictions", "calibrators"
DERIVED = (PREDICTIONS, CALIBRATORS)
ROLES = ("train", "test", "calibration")
_LISTED = 6  # changes named in one message before "and N more"


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


# ------------------------------------------------------------------ files the run owns


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporaries of atomic writes a killed run left behind (never read); return how many.

    Only those the record lists: a file that merely looks like a temporary is
    not ours to delete. Only safe under the :class:`RunLock`: a live
    writer's temporaries look the same.
    """
    stale = FileRecord(out_dir).paths(TEMPORARY)
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


#: Files operating systems and file managers leave in any folder they show; nobody misses them.
SYSTEM_JUNK = (".DS_Store", "Thumbs.db", "desktop.ini")


def _files_below(directory: Path) -> list[Path]:
    """Files (and links) below ``directory``, but the ones a file manager drops (``.DS_Store``, ``._*`` twins)."""
    return sorted(
        p for p in directory.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name not in SYSTEM_JUNK and not p.name.startswith("._")
    )


def check_ownership(out_dir: Path, config: Config) -> None:
    """Refuse an ``--out`` where this run would remove or replace a file that no uqsynth run created.

    An existing folder is used when it is empty or is a run directory (it
    has a record of its files). Then every file where this run writes (the
    run's top-level names and the folder of each configured arm) must be one
    the record lists. (Figures are named after arms; one of the user's that
    bears a figure's name is refused when the report would replace it, by
    :func:`uqsynth._files.atomic_path`.)

    Raises:
        ConfigError: Naming the first such file; ``--force`` does not lift it.
    """
    if not out_dir.is_dir():
        return
    record = FileRecord(out_dir)
    if not record.path.exists():
        files = [p for p in _files_below(out_dir) if p.relative_to(out_dir).as_posix() not in BOOKKEEPING]
        if files:
            listed = ", ".join(p.relative_to(out_dir).as_posix() for p in files[:3])
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            # A run of a uqsynth that kept no record is not guessed at either: which of its files are its own?
            legacy = "; a run of an earlier uqsynth is not continued" if (out_dir / "config.toml").is_file() else ""
            raise ConfigError(
                f"--out {out_dir} holds files that no uqsynth run recorded ({listed}{more}); uqsynth writes only "
                "into a new or empty folder or a run directory of its own, so that it never removes or replaces "
                f"a file it did not create{legacy}: choose another --out"
            )
        return
    top = [p for p in (out_dir / name for name in RUN_FILES) if p.exists() or p.is_symlink()]
    arms = [out_dir / arm for arm in config.arms]
    for path in [*top, *(arm for arm in arms if arm.is_file()), *(f for arm in arms for f in _files_below(arm))]:
        if not record.owns(path):
            relative = path.relative_to(out_dir)
            where = f"arm {relative.parts[0]}'s folder" if relative.parts[0] in config.arms else "every run writes it"
            raise ConfigError(
                f"--out {out_dir}: {relative.as_posix()} was not written by uqsynth, but this run writes there "
                f"({where}); move it away, or choose another --out"
            )


def clear_run(out_dir: Path) -> list[str]:
    """Remove every file the record of ``out_dir`` lists (for ``--force``); return what was removed.

    Folders left empty by that go too; anything else (files the record does
    not list, the folders holding them) stays, wherever it is.
    """
    record = FileRecord(out_dir)
    removed = []
    for path in record.paths(TEMPORARY) + record.paths(RESULT):
        path.unlink(missing_ok=True)
        removed.append(path.relative_to(record.root).as_posix())
        for folder in path.parents:
            if folder == record.root or folder.is_symlink() or any(folder.iterdir()):
                break
            folder.rmdir()
    record.compact()
    return removed


# ------------------------------------------------------------------ the same configuration


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


def check_existing_run(out_dir: Path, config: Config, inputs: RunInputs | None = None, *, force: bool = False) -> bool:
    """Refuse an ``--out`` holding other files, or a run of another configuration or other data, unless ``force``.

    Args:
        out_dir: The run directory (it may not exist yet).
        config: The configuration about to run.
        inputs: The subjects and their digests it is about to train on (``None``: not compared).
        force: Replace a run of another configuration or other data instead of refusing it.

    Returns:
        True when ``force`` is needed and given: the caller must :func:`clear_run` once it holds the lock.

    Raises:
        ConfigError: One line saying what differs (and that ``--force`` replaces the run), or naming a file
            this run would replace that uqsynth did not write (which ``force`` does not lift).
    """
    check_ownership(out_dir, config)
    difference = existing_run_difference(out_dir, config)
    if difference is not None:
        if force:
            return True
        raise ConfigError(
            f"--out {out_dir} holds a run with a different configuration ({difference}); choose another --out, "
            "or pass --force to replace it"
        )
    stale = inputs_difference(out_dir, inputs) if inputs is not None else None
    for arm in config.arms:
        stale = stale or outputs_difference(out_dir / arm, arm)
    if stale is None:
        return False
    if force:
        return True
    raise ConfigError(f"--out {out_dir}: {stale}; pass --force to retrain it from scratch, or choose another --out")


@dataclass(frozen=True)
class ArmPaths:
    """Where an arm's files live, ``RUN/<arm>/...``: the one place the run layout is spelt out.

    Stages, evaluation, the report's viewer and the library all find an
    arm's generator, predictions and calibrators through it.
    """

    directory: Path

    @property
    def name(self) -> str:
        """The arm's name (its folder's)."""
        return self.directory.name

    @property
    def generator(self) -> Path:
        """The exported generator weights, ``generator.safetensors``."""
        from uqsynth.training import GENERATOR_WEIGHTS

        return self.directory / GENERATOR_WEIGHTS

    @property
    def predictions(self) -> Path:
        return self.directory / PREDICTIONS

    @property
    def calibrators(self) -> Path:
        return self.directory / CALIBRATORS

    def prediction(self, subject_id: str, map_name: str) -> Path:
        """A test subject's saved map, ``predictions/<id>_<map>.nii.gz``."""
        return self.predictions / f"{subject_id}_{map_name}.nii.gz"

    def calibrator(self, name: str) -> Path:
        """A fitted calibrator's file, ``calibrators/<name>.safetensors``."""
        return self.calibrators / f"{name}.safetensors"

    def fitted(self, names: list[str]) -> list[str]:
        """Those of ``names`` (calibrators, in the configured order) that have been fitted for this arm."""
        return [name for name in names if self.calibrator(name).is_file()]


# ------------------------------------------------------------------ the same data


def content_digest(volumes: SubjectVolumes) -> str:
    """SHA-256 of what a subject is to a run: its source, target and mask arrays and affine (with shapes, types)."""
    digest = hashlib.sha256()
    for name in ("source", "target", "mask", "affine"):
        value = getattr(volumes, name)
        if value is None:
            digest.update(f"{name}:none;".encode())
            continue
        array = np.ascontiguousarray(value)
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunInputs:
    """What a run trains, calibrates and is scored on, as ``split.json`` records it.

    Attributes:
        subjects: Every subject id of the dataset.
        roles: ``train``, ``test``, ``calibration`` -> sorted subject ids (a
            subject can be in train and calibration: the paper calibrates on
            the training subjects).
        digests: Subject id -> :func:`content_digest`, for the subjects that
            were read (a run reads all; ``uqsynth report`` its test subjects).
        warnings: Subject id -> the warnings its inputs raised when read
            (:mod:`uqsynth.data.assumptions`), kept so that ``uqsynth report``,
            which reads only the test subjects, reports them all again.
    """

    subjects: list[str]
    roles: dict[str, list[str]]
    digests: dict[str, str]
    warnings: dict[str, list[str]] = field(default_factory=dict)

    def dumps(self) -> str:
        """The ``split.json`` text: the roles (as before), ``sha256`` (each subject's digest), ``input_warnings``."""
        record = {**{role: self.roles[role] for role in ROLES}, "sha256": dict(sorted(self.digests.items())),
                  "input_warnings": dict(sorted(self.warnings.items()))}
        return json.dumps(record, indent=2) + "\n"

    def roles_of(self, subject_id: str) -> set[str]:
        return {role for role in ROLES if subject_id in self.roles[role]}


def _primary(roles: set[str]) -> str:
    """How messages name a subject's role: train, test, calibration (held out) or none."""
    return next((role for role in ROLES if role in roles), "no role")


def _trained_state(out_dir: Path) -> list[str]:
    """Results the record lists below the top level of ``out_dir`` (weights, logs, predictions) that exist."""
    record = FileRecord(out_dir)
    return [path.relative_to(record.root).as_posix() for path in record.paths(RESULT) if path.parent != record.root]


def inputs_difference(out_dir: Path, inputs: RunInputs) -> str | None:
    """What differs between the subjects the run in ``out_dir`` was trained on and ``inputs``, or None.

    Only a run holding trained state is compared (a run killed before its
    first checkpoint has nothing to reuse). A subject added, removed or
    changed, and a role that moved, are each named (a role that moved while
    the data did not means ``split.json`` was edited).
    """
    trained = _trained_state(out_dir)
    if not trained:
        return None
    path = out_dir / SPLIT_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        roles = {role: set(saved[role]) for role in ROLES}
        digests = {str(k): str(v) for k, v in saved["sha256"].items()}
    except FileNotFoundError:
        return (f"the run there holds trained state ({trained[0]}) but no {SPLIT_FILE} saying which subjects "
                "it was trained on")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{path} does not say which subjects the run was trained on, and their digests (unreadable: {exc!r})"
    old, new = set(digests), set(inputs.subjects)
    changes = [f"subject {s} is new" for s in sorted(new - old)]
    changes += [f"subject {s} is gone" for s in sorted(old - new)]
    changes += [f"subject {s} changed content" for s in sorted(old & new)
                if s in inputs.digests and inputs.digests[s] != digests[s]]
    data_changed = bool(changes)
    for s in sorted(old & new):
        before, now = {r for r in ROLES if s in roles[r]}, inputs.roles_of(s)
        if _primary(before) != _primary(now):
            was, will = _primary(before), _primary(now)
            changes.append(f"the split would move {s} from {was} to {will}" if data_changed
                           else f"{SPLIT_FILE} puts {s} in {was}, the data and configuration in {will}")
        elif before != now:
            changes.append(f"the split would change whether {s} is a calibration subject" if data_changed
                           else f"{SPLIT_FILE} and the configuration disagree on whether {s} is a calibration subject")
    if not changes:
        return None
    more = f"; and {len(changes) - _LISTED} more" if len(changes) > _LISTED else ""
    what = "the run there was trained on other data" if data_changed else f"the run's {SPLIT_FILE} was edited"
    return f"{what}: {'; '.join(changes[:_LISTED])}{more}"


# ------------------------------------------------------------------ outputs of the same weights


def _generator_digest(arm_dir: Path) -> str | None:
    from uqsynth.model_files import sha256_of
    from uqsynth.training import GENERATOR_WEIGHTS

    path = arm_dir / GENERATOR_WEIGHTS
    return sha256_of(path) if path.is_file() else None


def _bound_digest(arm_dir: Path) -> str | None:
    try:
        return str(json.loads((arm_dir / OUTPUTS_FILE).read_text(encoding="utf-8"))["generator_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def outputs_difference(arm_dir: Path, arm: str) -> str | None:
    """Why arm ``arm``'s predictions and calibrators do not belong to the generator beside them, or None.

    They are bound (``outputs.json``) to the sha256 of the generator file
    that made them. Without a generator file there is nothing to compare
    (training exports it again from the checkpoint, or trains afresh and
    discards them).
    """
    record = FileRecord(arm_dir.parent)
    folders = [record.root / arm_dir.name / name for name in DERIVED]
    derived = [p for p in record.paths(RESULT) if any(p.is_relative_to(folder) for folder in folders)]
    digest = _generator_digest(arm_dir) if derived else None
    if digest is None:
        return None
    bound = _bound_digest(arm_dir)
    if bound == digest:
        return None
    made_by = f"sha256 {bound[:12]} then, {digest[:12]} now" if bound else "nothing records which generator made them"
    return (f"arm {arm}'s predictions and calibrators were made by another generator than "
            f"{arm_dir.name}/generator.safetensors ({made_by})")


def bind_outputs(arm_dir: Path, arm: str) -> None:
    """Record that what is written into ``arm_dir``'s predictions and calibrators now comes from its generator.

    Called before the first prediction or calibrator is written (rank 0).

    Raises:
        ConfigError: Some already there came from another generator.
    """
    stale = outputs_difference(arm_dir, arm)
    if stale is not None:
        raise ConfigError(f"{arm_dir.parent}: {stale}; pass --force to retrain it from scratch")
    digest = _generator_digest(arm_dir)
    if digest is not None and _bound_digest(arm_dir) != digest:
        atomic_write_text(arm_dir / OUTPUTS_FILE, json.dumps({"generator_sha256": digest}) + "\n")


def _first_difference(old: object, new: object, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r} there, {new!r} now"
