"""Training speed: the main job's three arms one after another against side by side (``train.parallel_arms``).

Why: on a 2-core CPU the small networks of the phantom profile keep one core
busy better than two (a concrete-Laplace step: 88 ms on one thread, 71 ms on
two), so the main job trains its arms in parallel processes of one thread
each. Both variants train the same arms for the same steps from the same
weights, in one run, spawn and reload included::

    pytest benchmarks/test_parallel_arms.py --benchmark-only

``extra_info["seconds_per_arm_step"]`` is the wall time over arms x steps.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from uqsynth.config import load_config
from uqsynth.parallel_arms import train_in_parallel
from uqsynth.pipeline import RunContext, prepare
from uqsynth.plugins import get_host
from uqsynth.training import Trainer

MAIN_JOB = Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml"
EPOCHS, STEPS_PER_EPOCH = 15, 40
STEPS = EPOCHS * STEPS_PER_EPOCH  # per arm: enough for the workers' start (importing torch, seconds) to be a small part


def main_job_arms(out: Path, parallel_arms: int) -> RunContext:
    """The phantom profile's three arms, fresh, on 8 subjects (5 for training), :data:`STEPS` steps each."""
    host = get_host()
    profile = tomllib.loads(MAIN_JOB.read_text())["profiles"]["phantom"]
    overrides = [f"{key}={json.dumps(value)}" for key, value in profile.items()] + [
        "data.phantom.subjects=8", f"train.epochs={EPOCHS}", f"train.max_steps_per_epoch={STEPS_PER_EPOCH}",
        f"train.parallel_arms={parallel_arms}", 'calibration.calibrators=["isotonic"]',  # conformal_risk needs 9
    ]
    context = RunContext(load_config(MAIN_JOB, host=host, overrides=overrides), host, out, torch.device("cpu"))
    prepare(context)
    return context


@pytest.mark.parametrize("parallel_arms", [1, 3], ids=["one_after_another", "side_by_side"])
def test_training_three_arms(benchmark, parallel_arms, tmp_path_factory):
    def setup():
        context = main_job_arms(tmp_path_factory.mktemp("arms"), parallel_arms)
        return (context,), {}

    def train(context: RunContext) -> None:
        if parallel_arms == 1:
            for arm_name, models in context.models.items():
                Trainer(context.config, arm_name, models, context.train_set, context.out_dir / arm_name,
                        context.device, log=lambda line: None, progress=False).fit()
        else:
            train_in_parallel(context.config, context.models, context.train_set, context.out_dir, context.device)

    benchmark.pedantic(train, setup=setup, rounds=1, iterations=1)  # minutes a round
    benchmark.extra_info["arms"] = 3
    benchmark.extra_info["steps_per_arm"] = STEPS
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["seconds_per_arm_step"] = benchmark.stats.stats.median / (3 * STEPS)
