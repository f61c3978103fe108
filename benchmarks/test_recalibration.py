"""Isotonic recalibration at scale: the streamed histogram fit against the exact sort-based fit.

The streamed fit (:meth:`IsotonicCalibrator.partial_fit`, batch by batch)
sees 10^8 voxels in the memory of one batch. The exact fit (the paper's
recalibration as written: isotonic regression of the empirical CDF on every
sorted PIT value, as ``tests/test_calibrators.py`` does it) holds and sorts
every value, so it runs only up to 10^7 voxels here (about 0.9 GB at its
peak, besides its 0.12 GB of inputs); it grows linearly, so 10^8 would need
some 10 GB, which does not fit comfortably beside anything else on a 23 GB machine.

Synthetic voxels, batch ``i`` from ``numpy.random.default_rng([SEED, i])``:
mean ~ U(0, 1), std ~ U(0.02, 0.1), truth = mean + 2 std N(0, 1), i.e. a model
overconfident by a factor 2, as MC-dropout models are. Generating the batches
is timed separately (``generate_seconds``) from fitting (``fit_seconds``);
the benchmark's own time is both.

Like for like: the streamed map is of ``z = (truth - mean) / effective_std(std)``
(``sqrt(std^2 + floor_^2)``, the floor fitted with the map), so the exact fit
takes its PIT values ``ndtr(z)`` at the streamed calibrator's ``effective_std``
(the streamed one is fitted first, untimed if its own benchmark has not run).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from benchmarks._bench import Tracked, env_int, median_seconds
from scipy.special import ndtr
from sklearn.isotonic import IsotonicRegression

from uqsynth.calibration.isotonic import IsotonicCalibrator

SEED = 7
BATCH = 1_000_000
ROUNDS = env_int("UQSYNTH_BENCH_RECAL_ROUNDS", 2)
CPU = torch.device("cpu")


def synthetic_batch(index: int, size: int = BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, index])
    mean = rng.random(size, dtype=np.float32)
    std = np.float32(0.02) + np.float32(0.08) * rng.random(size, dtype=np.float32)
    truth = mean + np.float32(2.0) * std * rng.standard_normal(size, dtype=np.float32)
    return mean, std, truth


def streamed_fit(voxels: int, timings: dict) -> IsotonicCalibrator:
    calibrator = IsotonicCalibrator()
    generate = fit = 0.0
    for index in range(voxels // BATCH):
        started = time.perf_counter()
        batch = synthetic_batch(index)
        generated = time.perf_counter()
        calibrator.partial_fit(*batch)
        fit += time.perf_counter() - generated
        generate += generated - started
    timings.setdefault("generate", []).append(generate)
    timings.setdefault("fit", []).append(fit)
    return calibrator


def exact_fit(mean: np.ndarray, std: np.ndarray, truth: np.ndarray,
              streamed: IsotonicCalibrator) -> IsotonicRegression:
    """The paper's recalibration as written: isotonic regression of P_hat on every sorted PIT value.

    The PIT values are ``ndtr((truth - mean) / streamed.effective_std(std))``,
    the standardization the streamed map is of, so the two maps are compared like for like.
    """
    p = np.sort(ndtr((truth.astype(np.float64) - mean) / streamed.effective_std(std)))
    x = np.concatenate([[0.0], p, [1.0]])
    y = np.concatenate([[0.0], np.arange(1, p.size + 1) / p.size, [1.0]])
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)


def pit_grid() -> np.ndarray:
    tails = np.geomspace(1e-9, 1e-2, 200)
    return np.concatenate([tails, np.linspace(0.01, 0.99, 2000), 1 - tails])


#: Maps fitted in this session, to compare the two fits on the same voxels.
FITTED: dict[tuple[str, int], object] = {}


def agreement(voxels: int, info: dict) -> None:
    streamed, exact = FITTED.get(("streamed", voxels)), FITTED.get(("exact", voxels))
    if streamed is not None and exact is not None:
        grid = pit_grid()
        info["max_abs_diff_vs_other_fit"] = float(np.abs(streamed.recalibrate(grid) - exact.predict(grid)).max())
        info["resolution_bound"] = float(streamed.counts_.max() / streamed.n_ + 1 / streamed.n_)


@pytest.mark.parametrize("voxels", [10**6, 10**7, 10**8], ids=["1e6", "1e7", "1e8"])
def test_isotonic_streamed_fit(benchmark, voxels):
    timings: dict = {}
    tracked = Tracked(streamed_fit, CPU)
    benchmark.group = f"isotonic fit, {voxels:.0e} voxels"
    calibrator = benchmark.pedantic(tracked, args=(voxels, timings), rounds=ROUNDS, warmup_rounds=0, iterations=1)
    FITTED[("streamed", voxels)] = calibrator
    info = {
        "method": "streamed histogram (IsotonicCalibrator.partial_fit)",
        "voxels": voxels,
        "batch_voxels": BATCH,
        "seconds": median_seconds(benchmark),
        "fit_seconds": float(np.median(timings["fit"])),
        "generate_seconds": float(np.median(timings["generate"])),
        "voxels_per_s": voxels / float(np.median(timings["fit"])),
        "peak_memory_mb": tracked.peak(),
        "memory_measure": tracked.how,
        "other_load_cores": tracked.other_load(),
        "bins": calibrator.bins,
    }
    agreement(voxels, info)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("voxels", [10**6, 10**7], ids=["1e6", "1e7"])
def test_isotonic_exact_sort_fit(benchmark, voxels):
    streamed = FITTED.get(("streamed", voxels))
    if streamed is None:  # its benchmark did not run (e.g. -k exact): fit it here, untimed, for its floor
        streamed = FITTED[("streamed", voxels)] = streamed_fit(voxels, {})
    batches = [synthetic_batch(index) for index in range(voxels // BATCH)]
    mean, std, truth = (np.concatenate(parts) for parts in zip(*batches))
    del batches
    tracked = Tracked(exact_fit, CPU)
    benchmark.group = f"isotonic fit, {voxels:.0e} voxels"
    exact = benchmark.pedantic(tracked, args=(mean, std, truth, streamed), rounds=ROUNDS, warmup_rounds=0, iterations=1)
    FITTED[("exact", voxels)] = exact
    info = {
        "method": "exact: sort every PIT value, sklearn IsotonicRegression on its ECDF",
        "voxels": voxels,
        "seconds": median_seconds(benchmark),
        "fit_seconds": median_seconds(benchmark),
        "voxels_per_s": voxels / median_seconds(benchmark),
        "peak_memory_mb": tracked.peak(),
        "memory_measure": tracked.how + " (the inputs, 12 bytes a voxel, are allocated before)",
        "other_load_cores": tracked.other_load(),
        "knots": int(exact.X_thresholds_.size),
        "floor": float(streamed.floor_),
    }
    agreement(voxels, info)
    benchmark.extra_info.update(info)
