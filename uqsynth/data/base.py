"""The dataset interface: a collection of paired subjects.

A dataset plugin only says which subjects exist and loads one subject's
volumes as they are stored. Everything the paper does to them afterwards
(axial slicing found from the affine, per-slice normalization, resizing,
cropping, slice selection) is shared by all datasets and lives in
:mod:`uqsynth.data.slices`, so a new data source never re-implements it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass
class SubjectVolumes:
    """One subject's co-registered source/target volumes, as stored on disk.

    Arrays keep the file's own axis order; ``affine`` maps voxel indices to
    world (RAS+ mm, as nibabel reports it) and is what outputs are written with.

    Attributes:
        subject_id: Unique id of the subject within its dataset.
        source: Source contrast (e.g. T1w), float32, 3D.
        target: Target contrast (e.g. T2w), float32, 3D, same shape as ``source``.
        mask: Brain mask, bool, same shape; nonzero voxels unless a mask file is given.
        affine: 4x4 voxel-to-world matrix shared by source and target.
        header: The source file's NIfTI header (``None`` for in-memory data), so
            outputs can be written in the input's own grid with its metadata.
        source_path: Where ``source`` was read from (``None`` when generated).
        target_path: Where ``target`` was read from (``None`` when generated).
        info: Dataset-specific facts about the subject (e.g. the mask file).
        warnings: One line each for what looks wrong but not fatal about the
            inputs (:mod:`uqsynth.data.assumptions`), e.g. a volume that may not
            be skull-stripped; every consumer shows or records them.
        regions: Per-voxel region labels (integers, same shape as ``source``,
            0 = no region), so evaluation can say where the uncertainty fails
            (e.g. in the lesion); ``None`` when the dataset has none for the subject.
        region_names: Label -> the region's name, for every nonzero label
            ``regions`` may hold (empty when ``regions`` is ``None``). Names,
            not labels, identify a region across subjects and datasets.
    """

    subject_id: str
    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    header: object | None = None
    source_path: Path | None = None
    target_path: Path | None = None
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    regions: np.ndarray | None = None
    region_names: dict[int, str] = field(default_factory=dict)


class Dataset(ABC):
    """Interface of dataset plugins: which subjects exist, and how to load one.

    Implementations validate what they can cheaply in ``__init__`` (the root
    exists, subjects are complete, ids are unique) and raise
    :class:`uqsynth.errors.DataError` naming the subject and file; ``load``
    raises the same for unreadable or inconsistent images.
    """

    @abstractmethod
    def subject_ids(self) -> list[str]:
        """Return the ids of all subjects, in a stable order."""

    @abstractmethod
    def load(self, subject_id: str) -> SubjectVolumes:
        """Load one subject's volumes (validated: shapes, affines, finite values)."""

    def scan_summary(self) -> list[str]:
        """Lines for the run's log: how many subjects were found, and what was left out and why.

        Datasets that scan folders override this to name every file or
        folder they did not use (:mod:`uqsynth.data.discovery`).
        """
        return [f"found {len(self)} subject(s)"]

    def __len__(self) -> int:
        return len(self.subject_ids())


class RecordingDataset(Dataset):
    """A dataset seen through a recorder of what each subject loaded said: its warnings and, optionally, a digest.

    Consumers that load subjects indirectly (``TrainSlices`` loads the
    training subjects itself) pass this instead, then report
    :attr:`warnings` (subject id -> lines), so no warning is lost on the
    way, and :attr:`digests` (subject id -> ``digest(volumes)``), so a
    content digest costs no second read.
    """

    def __init__(self, dataset: Dataset, digest: Callable[[SubjectVolumes], str] | None = None) -> None:
        self.dataset = dataset
        self.digest = digest
        self.warnings: dict[str, list[str]] = {}
        self.digests: dict[str, str] = {}

    def subject_ids(self) -> list[str]:
        """The wrapped dataset's subject ids."""
        return self.dataset.subject_ids()

    def load(self, subject_id: str) -> SubjectVolumes:
        """Load through the wrapped dataset, keeping the subject's warnings (and digest)."""
        volumes = self.dataset.load(subject_id)
        if volumes.warnings:
            self.warnings[subject_id] = list(volumes.warnings)
        if self.digest is not None:
            self.digests[subject_id] = self.digest(volumes)
        return volumes

    def scan_summary(self) -> list[str]:
        """The wrapped dataset's summary."""
        return self.dataset.scan_summary()


def copy_volumes(volumes: SubjectVolumes) -> SubjectVolumes:
    """A copy whose arrays (and lists, dicts) the caller may modify without changing ``volumes``."""
    return replace(
        volumes,
        source=volumes.source.copy(),
        target=volumes.target.copy(),
        mask=volumes.mask.copy(),
        affine=volumes.affine.copy(),
        info=dict(volumes.info),
        warnings=list(volumes.warnings),
        regions=None if volumes.regions is None else volumes.regions.copy(),
        region_names=dict(volumes.region_names),
    )


def volumes_bytes(volumes: SubjectVolumes) -> int:
    """The memory of a subject's arrays."""
    arrays = (volumes.source, volumes.target, volumes.mask, volumes.affine, volumes.regions)
    return sum(a.nbytes for a in arrays if a is not None)


class CachedDataset(Dataset):
    """A dataset that keeps the subjects in ``keep`` in memory after their first read, up to ``max_bytes``.

    A run reads every test subject again in each stage and for each arm
    (sampling, certificates, evaluation, the report's viewer) and every
    calibration subject once per arm: on the phantom each read generates the
    subject anew, on files it decompresses them. Kept subjects are read once
    instead, and every stage then sees exactly the volumes the run checked
    and digested before training. Each load returns a copy, so a consumer
    that modifies its arrays does not change what the next one gets.

    Subjects outside ``keep`` (the training subjects, read once) pass
    through. When the budget is full the least recently used subject makes
    room; one larger than the whole budget is not kept. ``max_bytes = 0``
    keeps nothing.
    """

    def __init__(self, dataset: Dataset, keep: Iterable[str], max_bytes: int) -> None:
        self.dataset = dataset
        self.keep = frozenset(keep)
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, SubjectVolumes] = OrderedDict()
        self._bytes = 0

    def subject_ids(self) -> list[str]:
        """The wrapped dataset's subject ids."""
        return self.dataset.subject_ids()

    def load(self, subject_id: str) -> SubjectVolumes:
        """A copy of the kept subject, or the wrapped dataset's load (kept if it is one to keep and fits)."""
        if subject_id in self._kept:
            self._kept.move_to_end(subject_id)
            return copy_volumes(self._kept[subject_id])
        volumes = self.dataset.load(subject_id)
        size = volumes_bytes(volumes)
        if subject_id in self.keep and size <= self.max_bytes:
            while self._bytes + size > self.max_bytes:
                _, dropped = self._kept.popitem(last=False)
                self._bytes -= volumes_bytes(dropped)
            self._kept[subject_id] = copy_volumes(volumes)
            self._bytes += size
        return volumes

    def scan_summary(self) -> list[str]:
        """The wrapped dataset's summary."""
        return self.dataset.scan_summary()

    def __repr__(self) -> str:
        return f"CachedDataset({self.dataset!r}, {len(self.keep)} subject(s) to keep, max_bytes={self.max_bytes})"
