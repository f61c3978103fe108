"""Accuracy and calibration of each arm of a trained run, beside the time its evaluation takes.

One benchmark per arm times :func:`uqsynth.evaluation.evaluate_arm` (every
metric of the arm over the run's test subjects, from its saved predictions
and fitted calibrators) and records the scores in ``extra_info``, so one
``--benchmark-json`` file compares plugins on speed and on quality.

The run: ``--uqsynth-run RUN`` or ``$UQSYNTH_BENCH_RUN``; without either, a
tiny phantom run (two arms, 32x32, a few steps) is trained once per session,
which checks the plumbing, not the paper's numbers.
"""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
import torch
from benchmarks._bench import Tracked, env_int, median_seconds
from benchmarks._runs import TINY_RUN, run_directory

from uqsynth.config import load_config
from uqsynth.evaluation import arm_summary, evaluate_arm
from uqsynth.metrics._voxels import level_key
from uqsynth.pipeline import build_dataset
from uqsynth.plugins import get_host
from uqsynth.inference import load_arm
from uqsynth.training import dropout_probabilities

ROUNDS = env_int("UQSYNTH_BENCH_QUALITY_ROUNDS", 3)


def pytest_generate_tests(metafunc):
    if "arm" not in metafunc.fixturenames:
        return
    run = run_directory(metafunc.config)
    try:
        text = (run / "config.toml").read_text(encoding="utf-8") if run is not None else TINY_RUN
        arms = list(tomllib.loads(text).get("arms", {}))
    except (OSError, tomllib.TOMLDecodeError):
        arms = []  # the trained_run fixture reports what is wrong with the directory
    metafunc.parametrize("arm", arms or ["(no arms)"])


def describe(spec) -> str:
    params = ", ".join(f"{key}={value}" for key, value in spec.params.items())
    return f"{spec.name}({params})" if params else spec.name


def test_evaluate_arm(benchmark, trained_run, arm):
    host = get_host()
    config = load_config(trained_run / "config.toml", host=host)
    if arm not in config.arms:
        pytest.fail(f"{trained_run / 'config.toml'}: no arm {arm!r}")
    dataset = build_dataset(config, host)
    test_ids = list(json.loads((trained_run / "split.json").read_text(encoding="utf-8"))["test"])
    arm_dir = trained_run / arm
    learned_p = dropout_probabilities(load_arm(arm_dir, host).generator)

    benchmark.group = f"evaluate {trained_run.name}"
    tracked = Tracked(evaluate_arm, torch.device("cpu"))
    evaluation = benchmark.pedantic(
        tracked, args=(config, dataset, test_ids, arm_dir, learned_p), rounds=ROUNDS, warmup_rounds=0, iterations=1
    )
    summary = arm_summary(evaluation)
    gaussian_picp = summary["picp"]
    key95 = level_key(0.95)
    voxels = sum(subject["n_voxels"] for subject in evaluation.result["subjects"].values())
    seconds = median_seconds(benchmark)
    calibrators = [
        describe(spec)
        for spec in config.calibration.calibrators
        if (arm_dir / "calibrators" / f"{spec.name}.safetensors").is_file()
    ]
    benchmark.extra_info.update(finite({
        "run": str(trained_run),
        "arm": arm,
        "generator": describe(config.model.generator),
        "stochastic_layer": describe(config.arms[arm].stochastic_layer),
        "positions": list(config.arms[arm].positions),
        "calibrators": calibrators,
        "samples": config.sampling.samples,
        "subjects": len(test_ids),
        "voxels": voxels,
        "seconds": seconds,
        "voxels_per_s": voxels / seconds,
        "peak_memory_mb": tracked.peak(),
        "memory_measure": tracked.how,
        "other_load_cores": tracked.other_load(),
        "rmse": summary["rmse_mean"],
        "psnr": summary["psnr_mean"],
        "ssim": summary["ssim_mean"],
        "calibration_rms_before": summary["calibration_rms_before"],
        "calibration_rms_after": summary["calibration_rms_after"],
        "crps": summary["crps"],
        "crps_after": summary["crps_after"],
        "ause": summary["ause"],
        "ause_normalized": summary["ause_normalized"],
        "picp_95": gaussian_picp.get(key95),
        "picp_95_after": {name: picp.get(key95) for name, picp in summary["picp_after"].items()},
        "learned_p": learned_p,
    }))


def finite(value):
    """NaN and infinities become ``None``, so the JSON stays valid."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
