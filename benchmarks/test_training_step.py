"""Training speed: one step of the main job's phantom arm, with torch's default Adam and with its fused kernel.

Why: on the 2-core CPU the main job's budget is training steps, and a
profile of a step showed a quarter of it in Adam's per-tensor loop
(``lerp_``, ``sqrt``, ``addcdiv_`` per weight). ``train.fused_adam`` does
the same update in one pass; the two are compared side by side, on the
same batches from the same starting weights, in one run::

    pytest benchmarks/test_training_step.py --benchmark-only

The fused kernel rounds differently: ``extra_info["max_weight_difference"]``
records how far the generators' weights are apart after the measured steps,
beside ``max_weight_change_in_training``, how far those steps moved them.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from uqsynth.config import load_config
from uqsynth.pipeline import RunContext, prepare
from uqsynth.plugins import get_host
from uqsynth.training import Trainer

MAIN_JOB = Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml"
STEPS = 20


@pytest.fixture(scope="module")
def phantom_arm(tmp_path_factory):
    """The main job's phantom profile, its MC-dropout arm's networks and 20 batches (a smaller phantom set)."""
    host = get_host()
    # The phantom profile, explicitly (its fallback applies only where data/BraTS2018 is absent), on fewer subjects.
    profile = tomllib.loads(MAIN_JOB.read_text())["profiles"]["phantom"]
    overrides = [f"{key}={json.dumps(value)}" for key, value in profile.items()] + [
        "data.phantom.subjects=6", 'calibration.calibrators=["isotonic"]',  # conformal_risk needs 9 subjects
    ]
    config = load_config(MAIN_JOB, host=host, overrides=overrides)
    out = tmp_path_factory.mktemp("train-step")
    context = RunContext(config, host, out, torch.device("cpu"))
    prepare(context)
    trainer = Trainer(config, "mc_dropout", context.models["mc_dropout"], context.train_set, out, torch.device("cpu"))
    batches = [batch for _, batch in zip(range(STEPS), trainer.batches(1))]
    models = context.models["mc_dropout"]
    start = {name: {k: v.clone() for k, v in getattr(models, name).state_dict().items()}
             for name in ("generator", "discriminator")}
    return config, context, batches, start


results: dict[bool, dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("fused", [False, True], ids=["adam_default", "adam_fused"])
def test_training_steps(benchmark, phantom_arm, fused, tmp_path):
    config, context, batches, start = phantom_arm
    config.train.fused_adam = fused
    models = context.models["mc_dropout"]

    def train():  # every round from the same weights of both networks
        models.generator.load_state_dict(start["generator"])
        models.discriminator.load_state_dict(start["discriminator"])
        torch.manual_seed(0)
        trainer = Trainer(config, "mc_dropout", models, context.train_set, tmp_path, torch.device("cpu"))
        for batch in batches:
            trainer.step(batch)
        return {k: v.detach().clone() for k, v in models.generator.state_dict().items()}

    weights = benchmark.pedantic(train, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["steps"] = STEPS
    benchmark.extra_info["seconds_per_step"] = benchmark.stats.stats.median / STEPS
    results[fused] = weights
    if len(results) == 2:  # how far apart the two kernels' weights are, against how far training moved them
        names = [name for name, _ in models.generator.named_parameters()]
        apart = max(float((results[True][k].double() - results[False][k].double()).abs().max()) for k in names)
        moved = max(float((results[False][k].double() - start["generator"][k].double()).abs().max()) for k in names)
        benchmark.extra_info["max_weight_difference"] = apart
        benchmark.extra_info["max_weight_change_in_training"] = moved
