"""Training several arms at once, each in a process of its own (``train.parallel_arms``).

Why: the arms of a run are independent (each starts from the same seed and
reads the same slices), and on a CPU the small networks of a phantom-scale
run do not keep several cores busy. On the project's 2-core Xeon a phantom
step of the concrete-Laplace arm (ngf 16, ndf 16) took 71 ms on two
threads and 88 ms on one, and the main job's three arms trained 1.36x
faster side by side than one after another
(``benchmarks/test_parallel_arms.py``).

Each worker process is started with ``spawn`` (a forked child would inherit
the parent's OpenMP thread pool, which GNU OpenMP does not survive), gets its
share of the parent's threads (at least one), and trains its arm with the
same :class:`~uqsynth.training.Trainer` as a sequential run: from the
networks the parent built (pickled, so the first weights are those of the
sequential run), writing the same log, checkpoint and generator files under
the run's record. The parent then resumes every arm from its finished
checkpoint, which loads the trained weights (and their moving average) into
its own networks for the later stages. A parallel arm follows the same
training as a sequential one up to the rounding of a different thread
count; an arm's random draws never depend on the others.

A worker's error reaches the caller as it was raised (a diverged arm stays a
:class:`~uqsynth.errors.TrainingDiverged`), and the other workers are stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from uqsynth._files import recording
from uqsynth.config import Config
from uqsynth.errors import ConfigError
from uqsynth.training import ArmModels, Trainer


def worker_count(config: Config) -> int:
    """How many worker processes train at once: ``train.parallel_arms``, no more than there are arms."""
    return min(config.train.parallel_arms, len(config.arms))


def worker_threads(processes: int) -> int:
    """Intra-op threads of each of ``processes`` workers: an equal share of this process's, at least one."""
    return max(1, torch.get_num_threads() // processes)


def check_picklable(models: dict[str, ArmModels]) -> None:
    """Refuse, before anything is trained, networks that cannot be sent to a worker process.

    A spawned process finds classes by their module's name: a class defined
    inside a function, or typed into a notebook or a REPL (an ``__main__``
    without a file), cannot be found there; the sequential path trains it
    as it is.

    Raises:
        ConfigError: Naming the arm and the reason, and how to train it anyway.
    """
    for arm_name, arm_models in models.items():
        try:
            pickle.dumps(arm_models)
            interactive = _interactive_classes(arm_models)
            if interactive:  # pickled by name, but a spawned process has no such __main__ to find them in
                raise TypeError(f"{', '.join(interactive)} defined interactively in __main__")
        except Exception as exc:  # pickle raises PicklingError, AttributeError, TypeError, ...
            raise ConfigError(
                f"train.parallel_arms: arm {arm_name}'s networks cannot be sent to a worker process "
                f"({type(exc).__name__}: {exc}); define their classes in an importable module, "
                "or set train.parallel_arms = 1"
            ) from None


def _interactive_classes(arm_models: ArmModels) -> list[str]:
    """Classes of ``arm_models`` defined in an interactive ``__main__`` (a notebook, a REPL: no file to import)."""
    if getattr(sys.modules.get("__main__"), "__file__", None) is not None:
        return []
    parts = [*arm_models.generator.modules(), *arm_models.discriminator.modules(),
             arm_models.likelihood, arm_models.adversarial_loss]
    return sorted({type(part).__qualname__ for part in parts if type(part).__module__ == "__main__"})


def train_in_parallel(
    config: Config,
    models: dict[str, ArmModels],
    train_set: torch.utils.data.Dataset,
    out_dir: Path,
    device: torch.device,
) -> None:
    """Train ``models`` (arm name -> networks) in up to ``config.train.parallel_arms`` processes.

    On return every arm's networks in ``models`` hold their trained weights,
    as after :meth:`Trainer.fit` in this process.
    """
    processes = worker_count(config)
    threads = worker_threads(processes)
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_worker,
                                   initargs=(threads,))
    try:
        futures = [
            executor.submit(_train_arm, config, arm_name, arm_models, train_set, out_dir, device)
            for arm_name, arm_models in models.items()
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
    except BaseException:
        _stop(executor)
        raise
    executor.shutdown()
    for arm_name, arm_models in models.items():  # loads each finished checkpoint and its weight average
        Trainer(config, arm_name, arm_models, train_set, out_dir / arm_name, device, log=lambda line: None).fit()


def _start_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


def _train_arm(
    config: Config,
    arm_name: str,
    models: ArmModels,
    train_set: torch.utils.data.Dataset,
    out_dir: Path,
    device: torch.device,
) -> None:
    with recording(out_dir):  # the parent owns the run's record; the worker's files join it
        Trainer(config, arm_name, models, train_set, out_dir / arm_name, device, progress=False).fit()


def _stop(executor: ProcessPoolExecutor) -> None:
    """Stop the workers now: a failed or interrupted run must not train on in the background."""
    workers = list(getattr(executor, "_processes", {}).values())  # the pool has no public way to kill them
    for process in workers:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    executor.shutdown(wait=True, cancel_futures=True)
