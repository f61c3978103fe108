"""Arms trained side by side in worker processes (``train.parallel_arms``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from uqsynth.cli import main
from uqsynth.config import load_config
from uqsynth.distributed import World
from uqsynth.errors import ConfigError
from uqsynth.parallel_arms import check_picklable
from uqsynth.pipeline import RunContext, prepare, stage_train, trains_in_parallel
from uqsynth.plugins import get_host
from uqsynth.training import GENERATOR_WEIGHTS, TRAIN_LOG, ArmModels

TWO_ARMS = """
[run]
name = "two"
seed = 5

[data]
source = "phantom"
image_size = 32
test_fraction = 0.34

[data.phantom]
subjects = 3
shape = [24, 28, 20]

[model]
generator = { name = "unet", ngf = 4 }
discriminator = { name = "patchgan", ndf = 8 }

[train]
epochs = 2
batch_size = 4
max_steps_per_epoch = 3
ema_decay = 0.9

[arms.mc]
stochastic_layer = { name = "mc_dropout", p = 0.5 }
positions = [2, 3]
lambda_kl = 0.0

[arms.laplace]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
likelihood = "laplace"
"""


@pytest.fixture
def one_thread_per_worker():
    """Two threads here, so that two workers get one each (the sequential reference runs on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def two_arms_config(tmp_path):
    config_path = tmp_path / "two.toml"
    config_path.write_text(TWO_ARMS)
    return config_path


def trained(tmp_path, name: str, parallel_arms: int) -> RunContext:
    host = get_host()
    config = load_config(two_arms_config(tmp_path), overrides=[f"train.parallel_arms={parallel_arms}"], host=host)
    context = RunContext(config, host, tmp_path / name, torch.device("cpu"))
    prepare(context)
    context.out_dir.mkdir()
    stage_train(context)
    return context


def test_arms_trained_side_by_side_get_the_weights_of_sequential_training(tmp_path, one_thread_per_worker):
    parallel = trained(tmp_path, "parallel", 2)
    torch.set_num_threads(1)  # the workers' thread count: the same kernels, the same rounding
    sequential = trained(tmp_path, "sequential", 1)
    for arm in ("mc", "laplace"):
        a = load_file(parallel.out_dir / arm / GENERATOR_WEIGHTS)
        b = load_file(sequential.out_dir / arm / GENERATOR_WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
        # The parent's networks hold the trained weights (the later stages sample them), not the initial ones.
        held = parallel.models[arm].generator.state_dict()
        assert all(torch.equal(held[k], a[k]) for k in a), arm
        logs = [(run.out_dir / arm / TRAIN_LOG).read_text().splitlines() for run in (parallel, sequential)]
        strip_seconds = [[",".join(line.split(",")[:-2]) for line in log] for log in logs]  # ..., lr, seconds
        assert len(logs[0]) == 3 and strip_seconds[0] == strip_seconds[1], arm


def test_a_run_with_parallel_arms_says_so_and_finishes(tmp_path, capfd, one_thread_per_worker):
    config = tmp_path / "two.toml"
    config.write_text(TWO_ARMS)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--set", "train.parallel_arms=3"]) == 0
    err = capfd.readouterr().err  # the workers write to the process's stderr itself
    assert "train: 2 arms, 2 at a time, each in a process of its own on 1 thread(s)" in err
    assert "arm mc epoch 2/2" in err and "arm laplace epoch 2/2" in err
    for arm in ("mc", "laplace"):
        assert (tmp_path / "run" / arm / "predictions").is_dir()


def test_a_diverging_arm_in_a_worker_stops_the_run_with_its_own_error(tmp_path, capsys):
    config = tmp_path / "two.toml"
    config.write_text(TWO_ARMS)
    status = main(["run", str(config), "--out", str(tmp_path / "run"),
                   "--set", "train.parallel_arms=2", "--set", "train.lr=1e10"])
    assert status == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: arm ") and "training diverged in epoch 1" in last and "lower train.lr" in last


def test_under_torchrun_the_arms_train_one_after_another(tmp_path):
    config = load_config(two_arms_config(tmp_path), overrides=["train.parallel_arms=2"], host=get_host())
    world = World(rank=0, size=2, backend="gloo")
    assert trains_in_parallel(RunContext(config, get_host(), tmp_path, torch.device("cpu"), world=world)) is False
    assert trains_in_parallel(RunContext(config, get_host(), tmp_path, torch.device("cpu"))) is True


def test_networks_a_worker_cannot_import_are_refused_naming_the_arm():
    class NotImportable(nn.Module):  # a local class, as in a notebook: pickle cannot find it by name
        pass

    models = ArmModels(NotImportable(), NotImportable(), None, None)
    with pytest.raises(ConfigError, match="arm nb's networks cannot be sent to a worker process .*train.parallel_arms = 1"):
        check_picklable({"nb": models})


def test_networks_of_an_interactive_session_are_refused(monkeypatch):
    class Net(nn.Module):
        pass

    Net.__module__, Net.__qualname__ = "__main__", "Net"  # as typed into a notebook: its __main__ has no file
    notebook = types.ModuleType("__main__")
    notebook.Net = Net
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    with pytest.raises(ConfigError, match=r"arm nb's .* \(TypeError: Net defined interactively in __main__\)"):
        check_picklable({"nb": ArmModels(Net(), nn.Identity(), None, None)})
