"""Calibrators: the contract for every registered one and the example plugin's, and each one's guarantee."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.optimize import minimize_scalar
from scipy.special import ndtr
from sklearn.isotonic import IsotonicRegression

from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.io import load_calibrator, save_calibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.errors import DataError
from uqsynth.model_files import checksum_path, sha256_of
from uqsynth.plugins import get_host
from uqsynth.testing.calibrator_contract import CALIBRATOR_CHECKS, parametrize_with_checks

EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "uqsynth-gaussian-dropout" / "src"

REGISTERED = [entry.factory for entry in get_host()["calibrator"]]


def predictions(n: int, *, std_ratio: float, seed: int, noise: str = "normal"):
    """A synthetic predictor: per-voxel mean and std, and truths whose std is ``std_ratio`` times the predicted one."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(20.0, 230.0, n)
    std = rng.uniform(1.0, 10.0, n)
    if noise == "normal":
        eps = rng.standard_normal(n)
    else:  # heavy tails: Student t with 3 degrees of freedom
        eps = rng.standard_t(3, n)
    return mean, std, mean + std_ratio * std * eps


def coverage(calibrator, mean, std, target, level):
    lower, upper = calibrator.interval(mean, std, level)
    return float(np.mean((target >= lower) & (target <= upper)))


# --- the contract ---------------------------------------------------------------------------------


def test_builtin_calibrators_are_registered():
    registry = get_host()["calibrator"]
    assert {"isotonic", "sigma_scaling", "conformal"} <= set(registry.names())
    assert registry.create("isotonic", bins=100).get_params()["bins"] == 100


@parametrize_with_checks(REGISTERED)
def test_registered_calibrators_pass_the_contract(factory, check):
    check(factory)


@pytest.mark.parametrize("check", CALIBRATOR_CHECKS, ids=lambda check: check.__name__)
def test_example_plugin_calibrator_passes_the_contract(check, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale

    check(GaussianShiftScale)


# --- every calibrator repairs a miscalibrated predictor ------------------------------------------


def _all_factories(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale

    return [*REGISTERED, GaussianShiftScale]


def test_each_calibrator_restores_90_percent_coverage_of_an_overconfident_predictor(monkeypatch):
    calibration = predictions(20000, std_ratio=2.0, seed=1)  # predicted std half the truth's
    held_out = predictions(20000, std_ratio=2.0, seed=2)
    raw = float(np.mean(np.abs(held_out[2] - held_out[0]) <= 1.6449 * held_out[1]))
    assert raw < 0.65  # the uncalibrated Gaussian 90 % interval holds the truth only ~59 % of the time
    for factory in _all_factories(monkeypatch):
        calibrator = factory().fit(*calibration)
        assert coverage(calibrator, *held_out, 0.9) == pytest.approx(0.9, abs=0.012), factory.__name__


# --- isotonic: streaming equals the paper's exact fit ---------------------------------------------


def exact_kuleshov_map(pit: np.ndarray) -> IsotonicRegression:
    """The paper's recalibration as written: isotonic regression of P_hat on every sorted PIT value."""
    p = np.sort(pit)
    x = np.concatenate([[0.0], p, [1.0]])
    y = np.concatenate([[0.0], np.arange(1, p.size + 1) / p.size, [1.0]])
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)


@pytest.mark.parametrize(
    "std_ratio", [0.5, 1.0, 3.0, 10.0], ids=["underconfident", "calibrated", "overconfident", "overconfident10"]
)
def test_streaming_isotonic_fit_matches_the_exact_sort_based_fit(std_ratio):
    mean, std, target = predictions(100_000, std_ratio=std_ratio, seed=3)
    streamed = IsotonicCalibrator()
    for batch in np.array_split(np.arange(mean.size), 10):  # ten "subjects", one at a time
        streamed.partial_fit(mean[batch], std[batch], target[batch])
    exact = exact_kuleshov_map(ndtr((target - mean) / std))

    tails = np.geomspace(1e-9, 1e-2, 200)
    grid = np.concatenate([tails, np.linspace(0.01, 0.99, 2000), 1 - tails])
    difference = np.abs(streamed.recalibrate(grid) - exact.predict(grid)).max()
    resolution = streamed.counts_.max() / streamed.n_ + 1 / streamed.n_
    assert difference <= resolution  # the guaranteed bound (see IsotonicCalibrator)
    assert difference <= 2 / streamed.bins  # what it comes to in practice, tails included


def test_isotonic_summary_is_bounded_and_batches_add_up():
    data = predictions(50_000, std_ratio=2.0, seed=4)
    whole = IsotonicCalibrator(bins=2000).fit(*data)
    small = IsotonicCalibrator(bins=2000).fit(*(a[:500] for a in data))
    # The state is the same size for 500 voxels or 50,000: memory does not grow with the data.
    assert whole.counts_.shape == small.counts_.shape == (2000,)
    assert whole.map_x_.size <= 2001
    first = IsotonicCalibrator(bins=2000).fit(*(a[:20_000] for a in data))
    second = IsotonicCalibrator(bins=2000).fit(*(a[20_000:] for a in data))
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.counts_, whole.counts_)
    np.testing.assert_array_equal(merged.map_y_, whole.map_y_)
    with pytest.raises(ValueError, match="parameters must match"):
        IsotonicCalibrator(bins=100).fit(*data).merge(whole)
    changed = IsotonicCalibrator(bins=100).fit(*data)
    changed.set_params(bins=200)
    with pytest.raises(ValueError, match="call fit to start over"):
        changed.partial_fit(*data)


@pytest.mark.parametrize("std_ratio", [3.0, 10.0])
def test_isotonic_recalibrates_the_tails_of_an_overconfident_model(std_ratio):
    calibration = predictions(50_000, std_ratio=std_ratio, seed=5)
    mean, std, target = predictions(50_000, std_ratio=std_ratio, seed=6)
    calibrator = IsotonicCalibrator().fit(*calibration)
    levels = np.linspace(0.01, 0.99, 99)
    below = [np.mean(target <= calibrator.quantile(mean, std, q)) for q in levels]
    rms = np.sqrt(np.mean((np.array(below) - levels) ** 2))
    assert rms < 0.005  # the paper's figure of merit, near its sampling noise at this size


# --- sigma scaling ---------------------------------------------------------------------------------


def test_sigma_scaling_closed_form_is_the_gaussian_nll_minimum():
    mean, std, target = predictions(5000, std_ratio=1.7, seed=7)
    calibrator = SigmaScaling().fit(mean, std, target)

    def nll(s):
        scaled = s * std
        return np.sum(np.log(scaled) + 0.5 * ((target - mean) / scaled) ** 2)

    numeric = minimize_scalar(nll, bounds=(0.1, 10.0), method="bounded", options={"xatol": 1e-10}).x
    assert float(calibrator.scale_) == pytest.approx(numeric, rel=1e-6)
    assert float(calibrator.scale_) == pytest.approx(1.7, rel=0.03)
    streamed = SigmaScaling().partial_fit(mean[:2000], std[:2000], target[:2000])
    streamed.partial_fit(mean[2000:], std[2000:], target[2000:])
    assert float(streamed.scale_) == pytest.approx(float(calibrator.scale_), rel=1e-12)


# --- conformal ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_conformal_coverage_guarantee_on_exchangeable_data(level):
    # Heavy-tailed noise and a wrong std: a Gaussian interval would miss; the guarantee is distribution-free.
    repeats, n = 200, 50
    covered = []
    for seed in range(repeats):
        calibration = predictions(n, std_ratio=2.0, seed=1000 + seed, noise="t3")
        test = predictions(1000, std_ratio=2.0, seed=5000 + seed, noise="t3")
        covered.append(coverage(ConformalCalibrator().fit(*calibration), *test, level))
    average = float(np.mean(covered))
    tolerance = 0.01  # about 3 Monte Carlo standard errors of the average over 200 repeats
    assert average >= level - tolerance
    assert average <= level + 1 / (n + 1) + tolerance


def test_conformal_interval_is_infinite_when_the_level_needs_more_calibration_voxels():
    calibration = predictions(9, std_ratio=1.0, seed=8)
    calibrator = ConformalCalibrator().fit(*calibration)
    lower, upper = calibrator.interval(100.0, 5.0, 0.9)  # ceil(10 * 0.9) = 9 <= 9: finite
    assert np.isfinite(lower) and np.isfinite(upper)
    lower, upper = calibrator.interval(100.0, 5.0, 0.95)  # ceil(10 * 0.95) = 10 > 9
    assert lower == -np.inf and upper == np.inf
    assert calibrator.quantile(100.0, 5.0, 0.975) == np.inf


def test_conformal_binning_only_widens_intervals_and_by_less_than_a_bin():
    mean, std, target = predictions(2000, std_ratio=1.3, seed=9)
    calibrator = ConformalCalibrator().fit(mean, std, target)
    scores = np.sort(np.abs(target - mean) / std)
    bin_width = (calibrator.high / calibrator.low) ** (1 / calibrator.bins) - 1
    for level in (0.5, 0.9, 0.95):
        exact = scores[int(np.ceil((scores.size + 1) * level)) - 1]
        binned = float(calibrator.score_quantile(level))
        assert exact <= binned <= exact * (1 + bin_width)
        lower, upper = calibrator.interval(mean[:3], std[:3], level)
        np.testing.assert_allclose(lower, calibrator.quantile(mean[:3], std[:3], (1 - level) / 2))
        np.testing.assert_allclose(upper, calibrator.quantile(mean[:3], std[:3], (1 + level) / 2))


# --- saving and loading ---------------------------------------------------------------------------


def test_saved_calibrator_loads_by_name_for_its_arm(tmp_path):
    data = predictions(3000, std_ratio=1.5, seed=10)
    fitted = get_host()["calibrator"].create("conformal", bins=500).fit(*data)
    path = tmp_path / "conformal.safetensors"
    save_calibrator(fitted, path, name="conformal", arm="concrete")
    name, loaded = load_calibrator(path, host=get_host(), arm="concrete")
    assert name == "conformal" and loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.interval(data[0], data[1], 0.9), fitted.interval(data[0], data[1], 0.9))


def _io_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load_calibrator(path, host=get_host(), **kwargs)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def with_checksum(path):
    """Record ``path``'s checksum as uqsynth does, so the checks after it are reached."""
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")


def test_unusable_calibrator_files_give_one_line_errors_naming_the_file(tmp_path):
    fitted = IsotonicCalibrator(bins=100).fit(*predictions(1000, std_ratio=1.0, seed=11))
    assert "does not exist" in _io_error(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not a safetensors header")
    assert "has no checksum file garbage.safetensors.sha256 beside it" in _io_error(garbage)
    with_checksum(garbage)
    assert "not a safetensors file" in _io_error(garbage)

    bare = tmp_path / "bare.safetensors"
    save_file({"counts_": np.zeros(3)}, str(bare))
    with_checksum(bare)
    assert "no uqsynth calibrator metadata" in _io_error(bare)

    pickled = tmp_path / "pickled.safetensors"
    torch.save({"counts_": torch.zeros(3)}, pickled)
    assert "holds pickled Python objects" in _io_error(pickled)

    tampered = tmp_path / "tampered.safetensors"
    save_calibrator(fitted, tampered, name="isotonic", arm="mc")
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    assert "does not match its checksum" in _io_error(tampered)

    unknown = tmp_path / "unknown.safetensors"
    save_calibrator(fitted, unknown, name="isotonik", arm="mc")
    message = _io_error(unknown)
    assert 'unknown calibrator "isotonik"' in message and '"isotonic"' in message

    other_arm = tmp_path / "other_arm.safetensors"
    save_calibrator(fitted, other_arm, name="isotonic", arm="mc")
    assert "was fitted for arm 'mc', not 'concrete'" in _io_error(other_arm, arm="concrete")


def test_voxels_with_round_off_std_are_left_out_of_the_fit_so_they_cannot_dominate_it():
    from uqsynth.calibration.sigma_scaling import SigmaScaling
    from uqsynth.pipeline import resolved_spread

    rng = np.random.default_rng(0)
    std = np.full(100_000, 0.02)
    std[:12] = 1e-8  # every MC sample agreed up to float32 round-off
    truth = rng.normal(0.0, 3 * 0.02, std.shape)  # the model's std is 3x too small
    mean = np.zeros_like(truth)
    usable = resolved_spread(std, np.ones_like(std, dtype=bool))
    assert usable.sum() == std.size - 12
    everything = SigmaScaling().fit(mean, std, truth)
    resolved = SigmaScaling().fit(mean[usable], std[usable], truth[usable])
    assert everything.scale_ > 100  # what a dozen round-off voxels do to the Gaussian fit
    assert resolved.scale_ == pytest.approx(3.0, rel=0.02)
