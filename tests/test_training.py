"""Training through `uqsynth run`: layout, logs, learned p, resume, phantom round trip."""

from __future__ import annotations

import csv
import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from uqsynth.cli import main
from uqsynth.data.brats import BratsDataset

TINY = """
[run]
name = "tiny"
seed = 3

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
batch_size = 8
max_steps_per_epoch = 3

[arms.mc]
stochastic_layer = { name = "mc_dropout", p = 0.5 }
positions = [2, 3]
lambda_kl = 0.0

[arms.concrete]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.toml"
    config.write_text(TINY)
    status = main(["run", str(config), "--out", str(root / "out"), "--device", "cpu"])
    return root, config, status


def read_log(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_trains_every_arm_and_writes_the_layout(tiny_run, capsys):
    root, _, status = tiny_run
    assert status == 0
    out = root / "out"
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["data"]["phantom"]["subjects"] == 3
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 2 and len(split["test"]) == 1
    for arm in ("mc", "concrete"):
        rows = read_log(out / arm / "train_log.csv")
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert all(float(r["seconds"]) > 0 and float(r["loss_d"]) > 0 for r in rows)
        weights = load_file(out / arm / "generator.safetensors")
        assert any(name.endswith("p_logit") for name in weights) == (arm == "concrete")


def test_concrete_arm_learns_and_reports_its_dropout_probabilities(tiny_run):
    root, _, _ = tiny_run
    rows = read_log(root / "out" / "concrete" / "train_log.csv")
    probabilities = [float(rows[-1][f"p_{i}"]) for i in (1, 2)]
    assert all(abs(p - 0.1) > 1e-6 for p in probabilities)  # moved away from init_p (Adam, 6 steps of lr 2e-4)
    assert "p_1" not in read_log(root / "out" / "mc" / "train_log.csv")[0]


def test_rerun_of_a_finished_run_skips_training_and_keeps_the_weights(tiny_run, capsys):
    root, config, _ = tiny_run
    out = root / "out"
    before = load_file(out / "concrete" / "generator.safetensors")
    assert main(["run", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "arm concrete: already trained (2 epochs), skipping" in err
    after = load_file(out / "concrete" / "generator.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resumed_training_matches_uninterrupted_training(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.split("[arms.mc]")[0] + "[arms.concrete]" + TINY.split("[arms.concrete]")[1])
    one = tmp_path / "straight"
    assert main(["run", str(config), "--out", str(one)]) == 0
    two = tmp_path / "resumed"
    assert main(["run", str(config), "--out", str(two), "--set", "train.epochs=1"]) == 0
    assert main(["run", str(config), "--out", str(two)]) == 0
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err
    a = load_file(one / "concrete" / "generator.safetensors")
    b = load_file(two / "concrete" / "generator.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_holds_then_falls_linearly_over_the_decay_epochs():
    from uqsynth.config import TrainConfig
    from uqsynth.training import learning_rate_factor

    fixed = TrainConfig(epochs=4)
    assert {learning_rate_factor(fixed, e, s, 5) for e in range(1, 5) for s in range(5)} == {1.0}
    train = TrainConfig(epochs=4, lr_decay_epochs=2)
    factors = [learning_rate_factor(train, e, s, 5) for e in range(1, 5) for s in range(5)]
    assert factors[:11] == [1.0] * 11  # two full epochs, then the first decay step at full rate
    assert all(b < a for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(1 / 10)


def test_learning_rate_decay_shows_in_the_log(tmp_path):
    config = tmp_path / "tiny.toml"
    single_arm = TINY.split("[arms.mc]")[0] + "[arms.concrete]" + TINY.split("[arms.concrete]")[1]
    config.write_text(single_arm.replace("epochs = 2", "epochs = 3\nlr_decay_epochs = 2"))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    rates = [float(row["lr"]) for row in read_log(tmp_path / "run" / "concrete" / "train_log.csv")]
    # Epoch 1 at the full rate; the last step of epochs 2 and 3 at 4/6 and 1/6 of it (3 steps per epoch).
    assert rates == pytest.approx([2e-4, 2e-4 * 4 / 6, 2e-4 / 6])


def tiny_trainer(tmp_path, train_lines: str):
    """A Trainer for TINY's concrete arm with ``train_lines`` added to its [train] table."""
    from uqsynth.config import load_config
    from uqsynth.pipeline import RunContext, prepare
    from uqsynth.plugins import get_host
    from uqsynth.training import Trainer

    config_path = tmp_path / "tiny.toml"
    config_path.write_text(TINY.replace("max_steps_per_epoch = 3", f"max_steps_per_epoch = 3\n{train_lines}"))
    host = get_host()
    config = load_config(config_path, host=host)
    context = RunContext(config, host, tmp_path / "run", torch.device("cpu"))
    prepare(context)
    return Trainer(config, "concrete", context.models["concrete"], context.train_set,
                   tmp_path / "run" / "concrete", torch.device("cpu"))


def test_the_moving_average_of_the_generator_replaces_its_trained_weights(tmp_path):
    trainer = tiny_trainer(tmp_path, "ema_decay = 0.5")
    expected = None
    for batch in trainer.batches(1):
        trainer.step(batch)
        now = {k: v.clone() for k, v in trainer.generator.state_dict().items() if v.is_floating_point()}
        # The first step's weights start the average; each later step moves it halfway (decay 0.5).
        expected = now if expected is None else {k: 0.5 * expected[k] + 0.5 * now[k] for k in now}
    trainer.use_average()
    averaged = trainer.generator.state_dict()
    assert all(torch.allclose(averaged[k], expected[k], atol=1e-7) for k in expected)
    assert not all(torch.equal(averaged[k], now[k]) for k in now)  # not the last step's weights


def test_a_checkpoint_without_a_weight_average_is_not_resumed_with_one(tmp_path):
    from uqsynth.errors import ConfigError

    plain = tiny_trainer(tmp_path, "")
    plain.out_dir.mkdir(parents=True)
    plain.save_checkpoint()
    averaging = tiny_trainer(tmp_path, "ema_decay = 0.9")
    with pytest.raises(ConfigError, match="trained without train.ema_decay, so it has no weight average"):
        averaging.load_checkpoint()


def test_phantom_command_writes_subjects_the_brats_loader_reads(tmp_path):
    out = tmp_path / "P"
    assert main(["phantom", "--out", str(out), "--subjects", "3", "--seed", "1"]) == 0
    dataset = BratsDataset(root=out)
    assert len(dataset.subject_ids()) == 3
    subject = dataset.load(dataset.subject_ids()[0])
    assert subject.source.shape == subject.target.shape and subject.mask.any()


def test_bad_subject_count_for_phantom_is_a_user_error(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "P"), "--subjects", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --subjects must be at least 1, found 0"


def test_slices_too_small_for_the_discriminator_are_a_configuration_error(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    status = main(["run", str(config), "--out", str(tmp_path / "o"), "--set", "data.image_size=16", "--set", "data.load_size=20"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.discriminator (PatchGANDiscriminator) cannot take 16x16 slices (data.image_size)")


def test_bad_input_leaves_no_run_directory(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "o"
    assert main(["run", str(config), "--out", str(out), "--set", "data.image_size=48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: arms.mc: cannot build generator unet / discriminator patchgan at data.image_size 48")
    assert "power of two" in err
    assert not out.exists()


def test_an_out_directory_holding_another_configuration_is_refused(tiny_run, capsys):
    root, config, _ = tiny_run
    out = root / "out"
    saved = (out / "config.toml").read_text()
    assert main(["run", str(config), "--out", str(out), "--set", "train.lr=0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --out {out} holds a run with a different configuration (train.lr: 0.0002 there, 0.001 now)")
    assert (out / "config.toml").read_text() == saved


def test_training_further_discards_the_shorter_runs_predictions_and_calibrators(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "o"
    assert main(["run", str(config), "--out", str(out), "--set", "train.epochs=1"]) == 0
    old = (out / "mc" / "predictions").stat().st_mtime_ns, (out / "mc" / "calibrators").stat().st_mtime_ns
    first = sorted(p.name for p in (out / "mc" / "predictions").iterdir())
    assert main(["run", str(config), "--out", str(out)]) == 0
    assert [int(r["epoch"]) for r in read_log(out / "mc" / "train_log.csv")] == [1, 2]
    new = (out / "mc" / "predictions").stat().st_mtime_ns, (out / "mc" / "calibrators").stat().st_mtime_ns
    assert all(n > o for n, o in zip(new, old))  # sampled and fitted again for the 2-epoch weights
    assert sorted(p.name for p in (out / "mc" / "predictions").iterdir()) == first
