"""Many processes, one run: ``torchrun`` and ``torch.distributed``, used as torch ships them.

``torchrun --nproc_per_node N -m uqsynth run CONFIG --out RUN`` starts N
copies of the command; torchrun puts ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address in each one's environment.
:func:`init_world` joins them into one process group (NCCL between GPUs,
gloo on CPUs) and returns a :class:`World`, which the stages use for the
few collective steps a run needs: training wraps the networks in
``DistributedDataParallel``; sampling, calibration and evaluation take
every ``size``-th subject (:meth:`World.shard`) and meet again in a sum
(:meth:`World.all_reduce_sum`: calibrator summaries, which add up exactly)
or on rank 0 (:meth:`World.gather`: per-subject metrics). Rank 0 alone
writes the logs, checkpoints, metrics and report; every rank writes the
predictions of its own subjects.

Without torchrun (or with one process) :data:`SINGLE` stands in: every
collective is the identity, so the stages have one code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from uqsynth.calibration.base import StreamingCalibrator
from uqsynth.errors import ConfigError

T = TypeVar("T")

#: The environment torchrun gives every process it starts.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes.

    Attributes:
        rank: 0 .. size - 1; rank 0 writes the run's shared files.
        size: Number of processes (1 without torchrun).
        local_rank: Rank on this machine; picks the GPU.
        backend: ``"nccl"``, ``"gloo"``, or None for a single process.
        device: Where this process computes.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        return f"world size {self.size} ({self.backend}), rank {self.rank}, local rank {self.local_rank}, {self.device}"

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``size``-th one, starting at ``rank`` (order kept)."""
        return list(items)[self.rank :: self.size]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` over all ranks (same shape and dtype on every rank).

        Integer arrays are summed as int64 and floating ones as float64, so
        counts stay exact and the sum does not depend on float32 rounding.
        """
        array = np.asarray(array)
        if not self.distributed:
            return array.copy()
        wide = np.int64 if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else np.float64
        tensor = torch.from_numpy(np.array(array, dtype=wide, order="C")).to(self.device)  # 0-d stays 0-d
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy().astype(array.dtype if array.dtype != bool else np.int64).reshape(array.shape)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None elsewhere). Values are pickled between processes."""
        if not self.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = World()


def all_reduce_calibrator(calibrator: StreamingCalibrator, world: World) -> StreamingCalibrator:
    """Fit ``calibrator`` on the voxels every rank fed it: sum the summaries, then refit; return it.

    Streaming summaries are sums over voxels (histogram counts, moments), so
    the result equals one process fitting on all voxels; a rank that saw no
    voxels adds zeros. Per-subject summaries (one histogram row per subject)
    are first spread so that each rank's rows have places of their own, and
    the sum is the union of the ranks' subjects. Every rank ends with the
    same fitted calibrator.
    """
    local = calibrator.summary() if hasattr(calibrator, "n_") else calibrator.empty_summary()
    per_subject = "subject_keys_" in local  # subject-level calibrators (uqsynth.calibration.risk)
    if per_subject and world.distributed:
        local = _spread_subject_rows(local, world)
    total = {name: world.all_reduce_sum(value) for name, value in sorted(local.items())}
    if per_subject:
        from uqsynth.calibration.risk import combine_subject_summaries

        total = combine_subject_summaries([total])  # a subject two ranks saw: its rows added
    if int(total["n_"]) == 0:
        raise ValueError(f"{type(calibrator).__name__}: no rank saw any voxels to fit on")
    return calibrator.load_summary(total)


def _spread_subject_rows(local: dict[str, np.ndarray], world: World) -> dict[str, np.ndarray]:
    """A per-subject summary laid out so that the element-wise sum over ranks joins the ranks' subjects.

    Each rank's subject rows go after those of the ranks before it (their
    counts are all-reduced first); the shared histograms stay as they are,
    since they add up anyway.
    """
    sizes = np.zeros(world.size, dtype=np.int64)
    sizes[world.rank] = local["subject_keys_"].size
    sizes = world.all_reduce_sum(sizes)
    start, total = int(sizes[: world.rank].sum()), int(sizes.sum())
    spread = dict(local)
    for name in ("counts_", "subject_keys_"):
        rows = np.zeros((total, *local[name].shape[1:]), dtype=local[name].dtype)
        rows[start : start + local[name].shape[0]] = local[name]
        spread[name] = rows
    return spread


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_world(device: torch.device) -> World:
    """Join the process group torchrun set up, or return a single-process world on ``device``.

    ``device`` is the configured one: its type picks the backend (NCCL for
    CUDA, gloo for the CPU) and each process takes GPU ``LOCAL_RANK``, so
    the configuration must say ``cuda`` or ``auto``, not a GPU index.
    """
    if not launched_by_torchrun():
        return World(device=device)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: start several processes "
            "with torchrun (see README: many GPUs, many machines)"
        )
    rank, size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"run.device: {device} names one GPU, but under torchrun each process takes GPU LOCAL_RANK; "
                'use "cuda" or "auto"'
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                "start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend, device=device)


def close_world(world: World) -> None:
    """Leave the process group (a no-op for a single process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
