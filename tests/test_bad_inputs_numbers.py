"""Numbers that are not numbers, and user errors that looked like bugs (issue 15, classes 4 and 6; issue 16, 5).

uqsynth never writes a number it should not believe with exit status 0: a
non-finite value in the configuration, a loss or weight of a diverging run,
a tensor of a weight or calibrator file, or a map about to be written is one
``error:`` line naming the key, arm, file or map. Plugin parameters have one
constraint vocabulary (``Annotated[int, Interval(1, None)]`` and
``param_rules``, :mod:`uqsynth.config`), checked when the configuration
loads, so ``bins = 0`` no longer fails after training. A misspelt hook is a
broken plugin. Weight files follow the umask. The catalogue rows are in
tests/test_bad_inputs.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_distribution
from safetensors import safe_open
from sklearn.base import clone
from test_bad_inputs import VALID, assert_named, refused, stderr_of_refusal, write_config
from test_data_nifti import brain, write

from uqsynth.calibration.io import save_calibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.config import config_from_dict, dumps_config
from uqsynth.errors import DataError, TrainingDiverged
from uqsynth.model_files import checksum_path, save_tensors, sha256_of
from uqsynth.plugins import get_host
from uqsynth.inference import write_maps
from uqsynth.testing.calibrator_contract import check_declared_constraints
from uqsynth.training import CHECKPOINT, GENERATOR_WEIGHTS, TRAIN_LOG, Trainer, build_arm, build_generator


def rewrite(path: Path, change, framework: str = "pt") -> None:
    """Let ``change`` edit the tensors of a safetensors file in place (a dict); keep its metadata and checksum.

    Written with safetensors itself: uqsynth's ``save_tensors`` refuses to
    write what these tests need (a NaN or infinite tensor), as a file written
    elsewhere, or by an older uqsynth, may hold.
    """
    with safe_open(str(path), framework=framework) as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors)
    if framework == "np":
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")


# ------------------------------------------------------------ class 4: the configuration


def refused_at_load(tables: dict, overrides: tuple[str, ...], fragment: str, tmp_path, capsys) -> None:
    """:data:`VALID` with ``tables`` and ``overrides`` is refused before anything runs, naming ``fragment``.

    ``C: `` in ``fragment`` stands for the configuration file's path.
    """
    config = write_config(tmp_path / "c.toml", **tables)
    out = tmp_path / "out"
    sets = [arg for item in overrides for arg in ("--set", item)]
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu", *sets)
    assert_named(line, fragment.replace("C: ", f"{config}: "))
    assert not out.exists()


@pytest.mark.parametrize(
    ("tables", "overrides", "fragment"),
    [
        pytest.param({}, ("train.lr=nan",), "--set train.lr=nan: train.lr must be a finite number, found nan",
                     id="lr_nan_in_set"),
        pytest.param({}, ("train.lr=inf",), "--set train.lr=inf: train.lr must be a finite number, found inf",
                     id="lr_inf_in_set"),
        pytest.param({"train": {"lr": -math.inf}}, (), "C: train.lr must be a finite number, found -inf",
                     id="lr_minus_inf_in_file"),
        pytest.param({"sampling": {"samples": 2, "memory_budget_mb": math.nan}}, (),
                     "C: sampling.memory_budget_mb must be a finite number, found nan", id="optional_float_nan"),
        pytest.param({"calibration": {"calibrators": [{"name": "isotonic", "z_max": math.nan}]}}, (),
                     "C: calibration.calibrators[0].z_max must be a finite number, found nan",
                     id="plugin_parameter_nan"),
    ],
)
def test_non_finite_configuration_values_are_refused_at_load(tables, overrides, fragment, tmp_path, capsys):
    """The issue's ``--set train.lr=nan`` died inside Adam with status 1; nan and inf are TOML literals."""
    refused_at_load(tables, overrides, fragment, tmp_path, capsys)


# ------------------------------------------------------------ class 4: losses and weights while training


def test_a_diverging_run_stops_naming_the_arm_and_epoch_and_saves_nothing(tmp_path, capsys):
    """The issue's ``--set train.lr=1e10``: one step overflows a BatchNorm statistic of the discriminator.

    Before, the run went on to write all-NaN predictions (and failed later as an internal error).
    """
    out = tmp_path / "out"
    lines = stderr_of_refusal(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(out),
                              "--device", "cpu", "--set", "train.lr=1e10")
    assert_named(lines[-1], "error: arm mc: training diverged in epoch 1 after step 1", "/discriminator/",
                 "infinite values", "lower train.lr (now 1e+10)", "--force")
    arm = out / "mc"
    assert not any((arm / name).exists() for name in (CHECKPOINT, GENERATOR_WEIGHTS, TRAIN_LOG, "predictions"))


def tiny_trainer(out: Path, **train) -> Trainer:
    """A trainer of :data:`VALID`'s arm on four random slices (seeded), for training-loop cases."""
    host = get_host()
    config = config_from_dict({**VALID, "train": {**VALID["train"], **train}}, host=host)
    torch.manual_seed(0)
    models = build_arm(config, "mc", host)
    slices = torch.Generator().manual_seed(0)
    data = [{"source": torch.rand(1, 32, 32, generator=slices) * 2 - 1,
             "target": torch.rand(1, 32, 32, generator=slices) * 2 - 1} for _ in range(4)]
    return Trainer(config, "mc", models, data, out, torch.device("cpu"), log=lambda line: None)


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path):
    """A NaN loss at the first step of epoch 2: the checkpoint and the log of epoch 1 stay as they were."""
    arm = tmp_path / "mc"
    tiny_trainer(arm, epochs=1).fit()
    checkpoint, log = (arm / CHECKPOINT).read_bytes(), (arm / TRAIN_LOG).read_text()
    with pytest.raises(TrainingDiverged) as info:
        tiny_trainer(arm, epochs=2, lr=1e30).fit()  # resumes after epoch 1
    assert_named(str(info.value), "arm mc: training diverged in epoch 2 at step 1", "loss", "is nan",
                 "lower train.lr (now 1e+30)", "--set train.epochs=1")
    assert (arm / CHECKPOINT).read_bytes() == checkpoint and (arm / TRAIN_LOG).read_text() == log
    assert not (arm / GENERATOR_WEIGHTS).exists()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("loss_g_likelihood", math.inf, "the generator's likelihood loss (loss_g_likelihood) is inf"),
    ("loss_g_kl", math.nan, "the stochastic layers' KL term (loss_g_kl) is nan"),
])
def test_a_non_finite_loss_names_which_loss(key, value, named, tmp_path):
    trainer = tiny_trainer(tmp_path / "mc")
    losses = {"loss_d": 0.7, "loss_g_adversarial": 0.8, "loss_g_likelihood": 0.5, "loss_g_kl": 0.0, "loss_g_total": 50.0}
    with pytest.raises(TrainingDiverged, match="epoch 3 at step 7") as info:
        trainer.check_losses({**losses, key: value}, epoch=3, step=7)
    assert named in str(info.value)


# ------------------------------------------------------------ class 4: weights and calibrators read from files


@pytest.fixture
def trained_arm(tmp_path) -> Path:
    """RUN/mc as ``uqsynth predict`` reads it: the run's config.toml and (untrained, seeded) generator weights."""
    host = get_host()
    config = config_from_dict(VALID, host=host)
    arm = tmp_path / "run" / "mc"
    arm.mkdir(parents=True)
    (arm.parent / "config.toml").write_text(dumps_config(config))
    torch.manual_seed(0)
    weights = build_generator(config, config.arms["mc"], host).state_dict()
    save_tensors(arm / GENERATOR_WEIGHTS, {k: v.detach().contiguous() for k, v in weights.items()})
    return arm


def predict(capsys, arm: Path, tmp_path: Path, *, sampled: bool = False) -> tuple[str, Path]:
    """``uqsynth predict`` on one T1w volume, refused: before anything ran, or (``sampled``) once sampled."""
    out = tmp_path / "predicted"
    t1 = write(tmp_path / "t1.nii.gz", brain())
    argv = ("predict", "--model", str(arm), "--input", str(t1), "--out", str(out), "--device", "cpu", "--samples", "2")
    line = stderr_of_refusal(capsys, *argv)[-1] if sampled else refused(capsys, *argv)
    return line, out


def test_generator_weights_with_a_nan_are_refused_naming_the_file_and_tensor(trained_arm, tmp_path, capsys):
    weights = trained_arm / GENERATOR_WEIGHTS
    rewrite(weights, lambda tensors: tensors["downs.1.conv.weight"].view(-1)[:1].fill_(math.nan))
    line, out = predict(capsys, trained_arm, tmp_path)
    assert_named(line, f"generator weights {weights} is unusable", "tensor downs.1.conv.weight holds 1 NaN")
    assert not out.exists()


def test_a_calibrator_file_with_an_infinite_value_is_refused(trained_arm, tmp_path, capsys):
    folder = trained_arm / "calibrators"
    folder.mkdir()
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(0, 1, 500), rng.uniform(0.1, 0.2, 500)
    save_calibrator(SigmaScaling().fit(mean, std, mean + std * rng.standard_normal(500)),
                    folder / "sigma_scaling.safetensors", name="sigma_scaling", arm="mc")
    rewrite(folder / "sigma_scaling.safetensors", lambda tensors: tensors.update(sum_sq_=np.array(np.inf)), "np")
    line, out = predict(capsys, trained_arm, tmp_path)
    assert_named(line, f"calibrator file {folder / 'sigma_scaling.safetensors'} is unusable",
                 "tensor sum_sq_ holds 0 NaN and 1 infinite values")
    assert not out.exists()


def test_a_checkpoint_with_a_nan_is_not_resumed(tmp_path):
    arm = tmp_path / "mc"
    tiny_trainer(arm, epochs=1).fit()
    rewrite(arm / CHECKPOINT, lambda tensors: tensors["/generator/downs.0.conv.weight"].fill_(math.nan))
    with pytest.raises(DataError, match=r"arm mc: checkpoint .* is unusable: its tensor /generator/downs.0.conv"):
        tiny_trainer(arm, epochs=2).fit()


def test_uqsynth_never_writes_a_non_finite_tensor(tmp_path):
    with pytest.raises(ValueError, match="tensor w holds 1 NaN"):
        save_tensors(tmp_path / "w.safetensors", {"w": torch.tensor([1.0, math.nan])})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ class 4: maps about to be written


def test_predict_writes_no_map_from_weights_that_overflow(trained_arm, tmp_path, capsys):
    """The issue's all-NaN maps with exit 0: finite weights of a diverged run (x 1e10) give NaN everywhere."""
    def overflow(tensors):
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and "running" not in key:
                tensor.mul_(1e10)

    rewrite(trained_arm / GENERATOR_WEIGHTS, overflow)
    line, out = predict(capsys, trained_arm, tmp_path, sampled=True)
    assert_named(line, "error: t1: map mean holds", "NaN", "none of its maps was written")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("bad", "value", "counts"), [
    ("std", np.inf, "0 NaN and 1 infinite"),
    ("upper", np.nan, "1 NaN and 0 infinite"),
])
def test_write_maps_writes_all_maps_of_a_volume_or_none(bad, value, counts, tmp_path):
    """Checked before the first file: a bad last map leaves no first map behind.

    An infinite interval bound passes: a conformal calibrator with too few calibration voxels says so.
    """
    from uqsynth.data.base import SubjectVolumes

    volume = brain()
    subject = SubjectVolumes(subject_id="S01", source=volume, target=None, mask=volume != 0,
                             affine=np.eye(4), header=None, source_path=None)
    maps = {name: np.zeros(volume.shape, np.float32) for name in ("mean", "std", "lower", "upper")}
    maps["lower"][1, 2, 3] = -np.inf
    maps[bad][3, 4, 5] = value
    with pytest.raises(DataError, match=f"S01: map {bad} holds {counts} values"):
        write_maps(maps, subject, tmp_path, "S01")
    assert list(tmp_path.iterdir()) == []
    maps[bad][3, 4, 5] = 0.0
    assert len(write_maps(maps, subject, tmp_path, "S01")) == 4


# ------------------------------------------------------------ class 6: seeds and plugin parameters


@pytest.mark.parametrize(
    ("tables", "overrides", "fragment"),
    [
        pytest.param({}, ("run.seed=-1",), "--set run.seed=-1: run.seed must be >= 0, found -1", id="negative_seed"),
        pytest.param({}, ("run.seed=1099511627776",), "run.seed must be < 4294967296, found 1099511627776",
                     id="seed_beyond_2_32"),
        pytest.param({"calibration": {"calibrators": [{"name": "isotonic", "bins": 0}]}}, (),
                     "C: calibration.calibrators[0].bins must be >= 1, found 0", id="isotonic_bins_0"),
        pytest.param({"calibration": {"calibrators": [{"name": "conformal", "low": 2, "high": 1}]}}, (),
                     "C: calibration.calibrators[0]: low must be below high, found low = 2.0, high = 1.0",
                     id="conformal_low_above_high"),
        pytest.param({}, ('calibration.calibrators=[{ name = "sigma_scaling", min_scale = -0.5 }]',),
                     "calibration.calibrators[0].min_scale must be > 0.0, found -0.5", id="negative_min_scale"),
        pytest.param({"calibration": {"calibrators": [{"name": "conformal", "bins": 10, "low": 0}]}}, (),
                     "C: calibration.calibrators[0].low must be > 0.0, found 0.0", id="conformal_low_0"),
    ],
)
def test_bad_seeds_and_plugin_parameters_are_refused_at_load(tables, overrides, fragment, tmp_path, capsys):
    """Before: an internal error (numpy refuses a negative seed), or one after training (bins = 0)."""
    refused_at_load(tables, overrides, fragment, tmp_path, capsys)


def test_code_building_a_calibrator_gets_the_same_refusal():
    with pytest.raises(ValueError, match="IsotonicCalibrator: bins must be >= 1, found 0"):
        IsotonicCalibrator(bins=0).fit(np.zeros(5), np.ones(5), np.zeros(5))


def test_the_contract_suite_checks_the_declared_constraints():
    """A calibrator whose own parameters break its declarations, or whose fit ignores them, fails the contract."""
    with pytest.raises(AssertionError, match="its own parameters break its declared constraints: .*bins must be >= 1"):
        check_declared_constraints(lambda: IsotonicCalibrator(bins=0))

    class Unchecked(SigmaScaling):
        def partial_fit(self, mean, std, target):  # skips _validate_params, as a careless plugin might
            self.scale_ = np.asarray(1.0)
            return self

        fit = partial_fit

    with pytest.raises(AssertionError, match=r"fit accepted min_scale=0.0, outside the range declared"):
        check_declared_constraints(lambda: clone(Unchecked()))


THIRD_PARTY_CALIBRATOR = """
    import numpy as np
    import uqsynth
    from uqsynth.calibration.sigma_scaling import SigmaScaling

    class Shrink(SigmaScaling):
        def __init__(self, *, min_scale=1e-6, alpha=0.1):   # no hints, no declarations
            self.min_scale = min_scale
            self.alpha = alpha

    @uqsynth.hookimpl
    def uqsynth_register_calibrators(register):
        register("thirdparty_shrink", Shrink)
"""


def test_a_factory_without_declarations_keeps_working_but_not_with_nan(site_dir, tmp_path, capsys):
    make_distribution(site_dir, "shrink-dist", "0.1", {"shrink": "thirdparty_shrink"},
                      {"thirdparty_shrink": THIRD_PARTY_CALIBRATOR})
    raw = {**VALID, "calibration": {"calibrators": [{"name": "thirdparty_shrink", "alpha": -1}]}}
    assert config_from_dict(raw, host=get_host()).calibration.calibrators[0].params == {"alpha": -1}
    config = write_config(tmp_path / "c.toml", calibration={
        "calibrators": [{"name": "thirdparty_shrink", "alpha": [0.5, math.nan]}]})
    line = refused(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert_named(line, f"{config}: calibration.calibrators[0].alpha[1] must be a finite number, found nan")


# ------------------------------------------------------------ class 6: a misspelt hook


MISSPELT_HOOKS = {
    "issue_example": """
        import uqsynth

        @uqsynth.hookimpl
        def uqsynth_register_calibrator(register):
            pass
    """,
    "specname": """
        import uqsynth

        @uqsynth.hookimpl(specname="uqsynth_register_calibrator")
        def register_mine(register):
            pass
    """,
    "prefix": """
        import uqsynth

        @uqsynth.hookimpl
        def uqsnyth_register_calibrators(register):
            pass
    """,
}


@pytest.mark.parametrize("case", MISSPELT_HOOKS)
def test_a_misspelt_hook_is_a_broken_plugin_with_pluggys_message(case, site_dir, tmp_path, capsys):
    """Before: ignored without a word (a marked hook of another name), or reported without pluggy's text."""
    make_distribution(site_dir, "typo-dist", "0.1", {"typo": "thirdparty_typo"},
                      {"thirdparty_typo": MISSPELT_HOOKS[case]})
    hook = "uqsnyth_register_calibrators" if case == "prefix" else "uqsynth_register_calibrator"
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(tmp_path / "out"))
    assert_named(line, f'plugin "typo" implements unknown hook {hook} (did you mean "uqsynth_register_calibrators"',
                 f"PluginValidationError: unknown hook '{hook}' in plugin <module 'thirdparty_typo'")
    assert "typo" not in get_host().plugins, "a broken plugin registers nothing"


def test_a_hook_with_a_wrong_argument_keeps_pluggys_whole_message(site_dir, tmp_path, capsys):
    source = MISSPELT_HOOKS["issue_example"].replace("uqsynth_register_calibrator(register)",
                                                     "uqsynth_register_calibrators(registr)")
    make_distribution(site_dir, "args-dist", "0.1", {"args": "thirdparty_args"}, {"thirdparty_args": source})
    line = refused(capsys, "run", str(write_config(tmp_path / "c.toml")), "--out", str(tmp_path / "out"))
    assert_named(line, 'plugin "args" cannot be registered', "Argument(s) {'registr'} are declared in the hookimpl")


# ------------------------------------------------------------ issue 16, item 5: weight files follow the umask


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_weight_files_follow_the_umask(kind, umask, tmp_path):
    """checkpoint/generator (torch) and calibrator (numpy) files were 0o600 whatever the umask."""
    value = torch.zeros(3) if kind == "torch" else np.zeros(3)
    previous = os.umask(umask)
    try:
        save_tensors(tmp_path / "w.safetensors", {"w": value})
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
