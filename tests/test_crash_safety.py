"""Crash-safe runs and safe model files: SIGKILL and rerun, the run lock, --force, pickles and tampering."""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uqsynth.cli import main

# Four short epochs per arm, so a kill can land in training, between epochs, or in a later stage.
TINY = """
[run]
name = "crash"
seed = 5

[data]
source = "phantom"
image_size = 32
test_fraction = 0.34

[data.phantom]
subjects = 3
shape = [24, 28, 20]

[model]
generator = { name = "unet", ngf = 8 }
discriminator = { name = "patchgan", ndf = 8 }

[train]
epochs = 4
lr_decay_epochs = 2    # so that some kills land mid-decay
ema_decay = 0.9       # the weight average must survive the kill too
batch_size = 4
max_steps_per_epoch = 6

[sampling]
samples = 4

[calibration]
calibrators = [{ name = "sigma_scaling" }]

[arms.mc]
stochastic_layer = { name = "mc_dropout", p = 0.5 }
positions = [2, 3]
lambda_kl = 0.0

[arms.concrete]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
"""


def command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uqsynth", "run", str(config), "--out", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "crash.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["run", str(config_file), "--out", str(out), "--device", "cpu"]) == 0
    return out


def weights(run: Path, arm: str) -> dict[str, torch.Tensor]:
    # Copies: safetensors maps the file, which some tests overwrite afterwards.
    return {k: v.clone() for k, v in load_file(run / arm / "generator.safetensors").items()}


def assert_same_weights(a: Path, b: Path) -> None:
    for arm in ("mc", "concrete"):
        left, right = weights(a, arm), weights(b, arm)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{arm}: {key} differs"


def progress(stderr: str) -> tuple[int, int, int] | None:
    """The latest (arm index, epoch, step) shown by the training progress bars in ``stderr``."""
    found = PROGRESS.findall(stderr)
    if not found:
        return None
    arm, epoch, step = found[-1]
    return ARMS.index(arm), int(epoch), int(step)


ARMS = ("mc", "concrete")
#: Environment variable that fixes the random kill step (its value is printed by every run of the test).
KILL_SEED_ENV = "UQSYNTH_KILL_SEED"
PROGRESS = re.compile(r"\b(mc|concrete) (\d+)/4:[^|]*\|[^|]*\| (\d+)/6")


def test_sigkill_at_a_random_step_then_rerun_gives_the_uninterrupted_weights(config_file, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # A random training step (arm, epoch, step) before the last epoch; the run is killed as soon as its
    # progress bar shows it: mid-step, mid-checkpoint or between epochs and arms.
    # Replay a failure with the seed it printed: UQSYNTH_KILL_SEED=<seed> pytest tests/test_crash_safety.py
    seed = int(os.environ.get(KILL_SEED_ENV) or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    target = (rng.randrange(2), rng.randint(1, 3), rng.randint(0, 6))
    print(f"kill at (arm, epoch, step) {target}; replay with {KILL_SEED_ENV}={seed}")
    process = subprocess.Popen(command(config_file, out), stderr=subprocess.PIPE, env=env)
    seen, started = "", time.monotonic()
    while process.poll() is None and time.monotonic() - started < 120:
        if select.select([process.stderr], [], [], 0.5)[0]:
            seen += os.read(process.stderr.fileno(), 1 << 16).decode(errors="replace")
            now = progress(seen)
            if now is not None and now >= target:
                break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    replay = f"{KILL_SEED_ENV}={seed}"
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill at {target} ({replay})"
    assert not (out / "concrete" / "generator.safetensors").exists(), f"the kill at {target} came after training ({replay})"

    rerun = subprocess.run(command(config_file, out), capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, f"{replay}: {rerun.stderr[-2000:]}"
    assert_same_weights(uninterrupted, out)
    assert not list(out.rglob(".*.tmp*")), "temporary files of writes the kill interrupted are cleaned up"


def test_a_second_run_on_a_live_run_directory_is_refused(config_file, tmp_path, capsys):
    out = tmp_path / "busy"
    process = subprocess.Popen(command(config_file, out), stderr=subprocess.DEVNULL)
    try:
        lock = out / ".lock"
        started = time.monotonic()
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() - started < 60:
            time.sleep(0.02)
        status = main(["run", str(config_file), "--out", str(out), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2
        assert err[-1] == (
            f"error: --out {out} is in use by another uqsynth run (pid {process.pid} on {os.uname().nodename}); "
            "wait for it to finish or choose another --out"
        )
    finally:
        process.kill()
        process.wait()


def test_another_configuration_is_refused_unless_forced(config_file, uninterrupted, tmp_path, capsys):
    out = tmp_path / "forced"
    assert main(["run", str(config_file), "--out", str(out), "--device", "cpu", "--set", "train.epochs=2"]) == 0
    other = ["run", str(config_file), "--out", str(out), "--device", "cpu", "--set", "run.seed=6",
             "--set", "train.epochs=2"]
    capsys.readouterr()
    assert main(other) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: --out {out} holds a run with a different configuration (run.seed: 5 there, 6 now); "
                   "choose another --out, or pass --force to replace it"]
    before = weights(out, "mc")
    assert main([*other, "--force"]) == 0
    assert "--force: replaced the run" in capsys.readouterr().err
    after = weights(out, "mc")
    assert any(not torch.equal(before[k], after[k]) for k in before), "--force must train afresh, not resume"
    assert "seed = 6" in (out / "config.toml").read_text()


def test_a_pickled_generator_file_is_refused(uninterrupted, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    torch.save(weights(run, "mc"), run / "mc" / "generator.safetensors")
    status = main(["predict", "--model", str(run / "mc"), "--input", str(run / "nothing.nii.gz"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "holds pickled Python objects" in err[0] and "generator.safetensors" in err[0]
    assert not (tmp_path / "p").exists()


def test_a_tampered_checkpoint_is_refused_on_resume(config_file, uninterrupted, tmp_path, capsys):
    run = tmp_path / "tampered"
    shutil.copytree(uninterrupted, run)
    checkpoint = run / "concrete" / "checkpoint.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    checkpoint.write_bytes(bytes(data))
    status = main(["run", str(config_file), "--out", str(run), "--device", "cpu", "--set", "train.epochs=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1] == (
        f"error: arm concrete: checkpoint {checkpoint} does not match its checksum in checkpoint.safetensors.sha256: "
        "it changed after uqsynth wrote it (tampered with or damaged)"
    )


def test_training_further_removes_the_old_generator_predictions_and_calibrators_first(
    config_file, uninterrupted, tmp_path, monkeypatch, capsys
):
    """A kill in the first new epoch must not leave the old epoch's outputs beside the newer checkpoint."""
    from uqsynth.training import Trainer

    run = tmp_path / "further"
    shutil.copytree(uninterrupted, run)

    def killed(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", killed)
    assert main(["run", str(config_file), "--out", str(run), "--device", "cpu", "--set", "train.epochs=5"]) == 130
    arm = run / "mc"
    assert (arm / "checkpoint.safetensors").is_file()
    assert not (arm / "generator.safetensors").exists()
    assert not (arm / "predictions").exists() and not (arm / "calibrators").exists()
