"""Many processes: calibrator sums across ranks, sharded evaluation, and a torchrun smoke run on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.distributed import World, all_reduce_calibrator
from uqsynth.metrics import CohortEvaluator

REPO = Path(__file__).resolve().parents[1]
CALIBRATORS = {"isotonic": IsotonicCalibrator, "sigma_scaling": SigmaScaling, "conformal": ConformalCalibrator}


def voxels(n: int = 60_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions whose std is too small by a factor of about 2, so every calibrator has work to do."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0, 1, n)
    std = rng.uniform(0.01, 0.1, n)
    target = mean + 2 * std * rng.standard_normal(n)
    return mean, std, target


def _rank_fits_its_half(rank: int, size: int, store_path: str, out_dir: str) -> None:
    """One process of the test below: fit on this rank's half of the voxels, then all-reduce."""
    store = dist.FileStore(store_path, size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    try:
        world = World(rank=rank, size=size, backend="gloo")
        mean, std, target = voxels()
        # Uneven shards, fed in two batches each: the sum must not care how the voxels were split.
        cut = 22_000 if rank == 0 else 0
        part = slice(0, cut) if rank == 0 else slice(22_000, None)
        for name, make in CALIBRATORS.items():
            calibrator = make()
            m, s, t = mean[part], std[part], target[part]
            half = len(m) // 2
            calibrator.partial_fit(m[:half], s[:half], t[:half]).partial_fit(m[half:], s[half:], t[half:])
            all_reduce_calibrator(calibrator, world)
            np.savez(Path(out_dir) / f"{name}_rank{rank}.npz", **calibrator.summary())
    finally:
        dist.destroy_process_group()


def test_calibrator_summaries_reduced_over_two_ranks_equal_one_process_on_the_same_voxels(tmp_path):
    mp.spawn(_rank_fits_its_half, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    mean, std, target = voxels()
    for name, make in CALIBRATORS.items():
        single = make().fit(mean, std, target)
        expected = single.summary()
        for rank in (0, 1):
            reduced = dict(np.load(tmp_path / f"{name}_rank{rank}.npz"))
            assert set(reduced) == set(expected), name
            for key, value in expected.items():
                if np.issubdtype(value.dtype, np.integer):
                    np.testing.assert_array_equal(reduced[key], value, err_msg=f"{name}.{key}")
                else:  # float sums in another order: equal to rounding
                    np.testing.assert_allclose(reduced[key], value, rtol=1e-12, atol=0, err_msg=f"{name}.{key}")
            # The fitted corrections follow: same quantiles as the single process.
            rebuilt = make().load_summary(reduced)
            q = np.array([0.05, 0.5, 0.95])
            np.testing.assert_allclose(
                rebuilt.quantile(mean[:100, None], std[:100, None], q), single.quantile(mean[:100, None], std[:100, None], q),
                rtol=1e-10, atol=1e-12, err_msg=name,
            )


def test_a_rank_without_voxels_adds_nothing():
    mean, std, target = voxels(5000)
    calibrator = SigmaScaling()
    world = World()  # one process: the reduction is the identity
    fitted = all_reduce_calibrator(SigmaScaling().fit(mean, std, target), world)
    np.testing.assert_allclose(fitted.scale_, calibrator.fit(mean, std, target).scale_)
    with pytest.raises(ValueError, match="no rank saw any voxels"):
        all_reduce_calibrator(SigmaScaling(), world)


def _subject(seed: int, shape=(12, 14, 6)):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 1, shape)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 2:-2, :] = True
    mean = truth + 0.05 * rng.standard_normal(shape)
    std = rng.uniform(0.02, 0.08, shape)
    return truth, mean, std, mask


def test_sharded_evaluation_merged_equals_one_evaluator():
    ids = [f"s{i}" for i in range(5)]
    whole = CohortEvaluator(axis=2, voxel_points=50)
    shards = [CohortEvaluator(axis=2, voxel_points=50) for _ in range(2)]
    for index, subject in enumerate(ids):
        whole.add(subject, *_subject(index))
        shards[index % 2].add(subject, *_subject(index))  # what World.shard gives 2 ranks
    merged = shards[0].merge(shards[1], order=ids).result()
    expected = whole.result()
    assert list(merged["rmse_per_subject"]) == ids
    assert merged["rmse_per_subject"] == expected["rmse_per_subject"]
    np.testing.assert_allclose(
        merged["gaussian"]["calibration"]["observed"], expected["gaussian"]["calibration"]["observed"], rtol=1e-12
    )
    assert merged["gaussian"]["crps"] == pytest.approx(expected["gaussian"]["crps"], rel=1e-12)
    assert merged["sparsification"]["ause"] == pytest.approx(expected["sparsification"]["ause"], rel=1e-12)
    assert merged["levels"]["voxel"]["pearson"] == pytest.approx(expected["levels"]["voxel"]["pearson"], rel=1e-12)
    with pytest.raises(ValueError, match="both hold subject"):
        whole.merge(shards[1])
    with pytest.raises(ValueError, match="different slice axes or settings"):
        CohortEvaluator(axis=1).merge(CohortEvaluator(axis=2))


SHIPPED = REPO / "plugins" / "bcgan_t1t2.toml"


def torchrun_smoke(run: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m uqsynth run <shipped config> --smoke --out RUN`` on the CPU (gloo)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "uqsynth", "run", str(SHIPPED), "--smoke", "--out", str(run), "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=cwd,
    )


def test_torchrun_smoke_with_two_cpu_processes(tmp_path):
    run = tmp_path / "R"
    completed = torchrun_smoke(run, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "distributed: world size 2 (gloo)" in completed.stderr
    assert "effective batch" in completed.stderr
    assert "train.parallel_arms = 3 does not apply under torchrun" in completed.stderr  # the phantom profile's
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    for arm, numbers in metrics["arms"].items():
        # Both ranks' subjects were sampled and every test subject was evaluated once.
        assert sorted(numbers["rmse_per_subject"]) == sorted(split["test"])
        for subject in split["test"]:
            assert (run / arm / "predictions" / f"{subject}_mean.nii.gz").is_file()
        assert (run / arm / "generator.safetensors").is_file()
        log_lines = (run / arm / "train_log.csv").read_text().splitlines()
        assert len(log_lines) == 1 + epochs(run), "rank 0 alone writes the log, one row per epoch"


def epochs(run: Path) -> int:
    return tomllib.loads((run / "config.toml").read_text())["train"]["epochs"]


def numbers(document: object, path: str = "") -> dict[str, float]:
    """Every number in a JSON document by its path (the timing block left out: wall-clock seconds)."""
    if isinstance(document, dict):
        return {k: v for key, value in document.items() if key != "timing"
                for k, v in numbers(value, f"{path}.{key}").items()}
    if isinstance(document, list):
        return {k: v for i, value in enumerate(document) for k, v in numbers(value, f"{path}[{i}]").items()}
    return {path: float(document)} if isinstance(document, (int, float)) and not isinstance(document, bool) else {}


def test_sharded_sampling_calibration_and_evaluation_reproduce_one_process(tmp_path):
    """Same weights: two ranks' sampling, calibration and evaluation give one process's metrics.

    Each subject's dropout masks depend on the subject, not on the rank that
    samples it, calibrator summaries add up exactly, and evaluations merge;
    only the order of a few floating-point sums differs.
    """
    from uqsynth.cli import main

    single = tmp_path / "single"
    assert main(["run", str(SHIPPED), "--smoke", "--out", str(single), "--device", "cpu"]) == 0
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    for stale in [*sharded.glob("*/predictions"), *sharded.glob("*/calibrators")]:
        shutil.rmtree(stale)
    (sharded / "metrics.json").unlink()
    completed = torchrun_smoke(sharded, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "already trained" in completed.stderr
    expected = numbers(json.loads((single / "metrics.json").read_text()))
    found = numbers(json.loads((sharded / "metrics.json").read_text()))
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
