"""Calibrators: the contract for every registered one and the example plugin's, and each one's guarantee."""

from __future__ import annotations

from pathlib import Path

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.optimize import minimize
from scipy.special import ndtr
from sklearn.isotonic import IsotonicRegression

from uqsynth.calibration.conformal import ConformalCalibrator, in_scale_share
from uqsynth.calibration.io import load_calibrator, save_calibrator
from uqsynth.calibration.fitting import takes_subjects
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.risk import RiskControl
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.errors import DataError
from uqsynth.model_files import checksum_path, load_tensors, save_tensors, sha256_of
from uqsynth.plugins import get_host
from uqsynth.testing.calibrator_contract import (
    CALIBRATOR_CHECKS,
    QUALITY_CHECKS,
    parametrize_with_checks,
)

EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "uqsynth-gaussian-dropout" / "src"

REGISTERED = [entry.factory for entry in get_host()["calibrator"]]


def predictions(n: int, *, std_ratio: float, seed: int, noise: str = "normal", zero_std: float = 0.0,
                floor: float = 0.0):
    """A synthetic predictor: per-voxel mean and std, and truths whose std is ``std_ratio`` times the predicted one.

    With ``zero_std``, that share of the voxels has std 0 (every MC sample
    agreed); with ``floor``, the truth's std is ``sqrt((std_ratio * std)^2 + floor^2)``
    for every voxel, the model the built-in calibrators fit.
    """
    rng = np.random.default_rng(seed)
    mean = rng.uniform(20.0, 230.0, n)
    std = rng.uniform(1.0, 10.0, n)
    std[rng.random(n) < zero_std] = 0.0
    if noise == "normal":
        eps = rng.standard_normal(n)
    else:  # heavy tails: Student t with 3 degrees of freedom
        eps = rng.standard_t(3, n)
    return mean, std, mean + np.hypot(std_ratio * std, floor) * eps


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


#: The quality bars ask that a 90 % interval cover 90 % of fresh voxels on average. Risk control
#: (RCPS) promises more, on purpose: with probability 1 - delta over the calibration draw, at most
#: alpha missed, so its average coverage lies above the level (tests/test_risk_control.py checks
#: its own promise instead).
AVERAGE_COVERAGE = [factory for factory in REGISTERED if factory is not RiskControl]


@pytest.mark.parametrize("check", QUALITY_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("factory", AVERAGE_COVERAGE, ids=lambda factory: factory.__name__)
def test_registered_calibrators_meet_the_quality_bars(factory, check):
    check(factory)


@pytest.mark.parametrize("check", CALIBRATOR_CHECKS, ids=lambda check: check.__name__)
def test_example_plugin_calibrator_passes_the_contract(check, monkeypatch):
    """The example's shift-and-scale passes every check, the zero-std ones included (its fitted floor)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale

    check(GaussianShiftScale)


# --- every calibrator repairs a miscalibrated predictor ------------------------------------------


def _all_factories(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale

    return [*AVERAGE_COVERAGE, GaussianShiftScale]


def test_each_calibrator_restores_90_percent_coverage_of_an_overconfident_predictor(monkeypatch):
    calibration = predictions(20000, std_ratio=2.0, seed=1)  # predicted std half the truth's
    held_out = predictions(20000, std_ratio=2.0, seed=2)
    raw = float(np.mean(np.abs(held_out[2] - held_out[0]) <= 1.6449 * held_out[1]))
    assert raw < 0.65  # the uncalibrated Gaussian 90 % interval holds the truth only ~59 % of the time
    subjects = np.arange(calibration[0].size) % 400  # for calibrators whose unit is the subject
    for factory in _all_factories(monkeypatch):
        calibrator = factory()
        if takes_subjects(calibrator.fit):
            calibrator.fit(*calibration, subject=subjects)
        else:
            calibrator.fit(*calibration)
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
    assert float(streamed.floor_) < 0.5  # far below every std here (1 to 10): each voxel keeps its own z
    exact = exact_kuleshov_map(ndtr((target - mean) / streamed.effective_std(std)))

    tails = np.geomspace(1e-9, 1e-2, 200)
    grid = np.concatenate([tails, np.linspace(0.01, 0.99, 2000), 1 - tails])
    difference = np.abs(streamed.recalibrate(grid) - exact.predict(grid)).max()
    resolution = streamed.counts_.max() / streamed.n_ + 1 / streamed.n_
    assert difference <= resolution  # the guaranteed bound (see IsotonicCalibrator)
    assert difference <= 3e-4  # in practice (default 20000 bins), tails included: half the fullest bin


def test_isotonic_summary_is_bounded_and_batches_add_up():
    data = predictions(50_000, std_ratio=2.0, seed=4)
    whole = IsotonicCalibrator(bins=2000).fit(*data)
    small = IsotonicCalibrator(bins=2000).fit(*(a[:500] for a in data))
    # The state is the same size for 500 voxels or 50,000: memory does not grow with the data.
    assert whole.counts_.shape == small.counts_.shape == (2002,)
    assert whole.counts2d_.shape == small.counts2d_.shape
    assert whole.map_x_.size <= 2001
    first = IsotonicCalibrator(bins=2000).fit(*(a[:20_000] for a in data))
    second = IsotonicCalibrator(bins=2000).fit(*(a[20_000:] for a in data))
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.counts_, whole.counts_)
    np.testing.assert_array_equal(merged.counts2d_, whole.counts2d_)
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


def test_sigma_scaling_fits_the_gaussian_nll_minimum_of_scale_and_floor():
    """The binned fit finds the maximum-likelihood (s, c) of the raw voxels, zero stds included."""
    mean, std, target = predictions(20000, std_ratio=1.7, seed=7, zero_std=0.05, floor=2.0)
    calibrator = SigmaScaling().fit(mean, std, target)

    def nll(log_params):
        s, c = np.exp(log_params)
        variance = (s * std) ** 2 + c**2
        return np.sum(0.5 * np.log(variance) + 0.5 * (target - mean) ** 2 / variance)

    exact = np.exp(minimize(nll, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-10}).x)
    assert float(calibrator.scale_) == pytest.approx(exact[0], rel=0.005)
    assert float(calibrator.floor_) == pytest.approx(exact[1], rel=0.02)
    assert float(calibrator.scale_) == pytest.approx(1.7, rel=0.03)
    assert float(calibrator.floor_) == pytest.approx(2.0, rel=0.1)
    assert float(calibrator.outlier_fraction_) < 0.001
    streamed = SigmaScaling().partial_fit(mean[:7000], std[:7000], target[:7000])
    streamed.partial_fit(mean[7000:], std[7000:], target[7000:])
    np.testing.assert_array_equal(streamed.counts_, calibrator.counts_)
    assert float(streamed.scale_) == float(calibrator.scale_) and float(streamed.floor_) == float(calibrator.floor_)


def test_sigma_scaling_ignores_one_percent_of_gross_errors():
    """1 % of voxels 1e4 stds off must not widen the Gaussian (the old closed form gave s ~ 1000, a step at 0.5)."""
    mean, std, target = predictions(50000, std_ratio=1.7, seed=12)
    rng = np.random.default_rng(13)
    gross = rng.random(mean.size) < 0.01
    target[gross] = mean[gross] + rng.choice([-1.0, 1.0], gross.sum()) * rng.uniform(0.5, 2.0, gross.sum()) * 1e4 * std[gross]
    calibrator = SigmaScaling().fit(mean, std, target)
    assert float(calibrator.outlier_fraction_) == pytest.approx(0.01, abs=0.003)
    held_out = predictions(50000, std_ratio=1.7, seed=14)  # the inliers' distribution
    for level in (0.5, 0.8, 0.9, 0.95):
        assert coverage(calibrator, *held_out, level) == pytest.approx(level, abs=0.02), level


def test_round_off_stds_get_the_floor_their_residuals_call_for():
    """Voxels whose MC samples agreed (std 0 or 1e-8) are fitted with the rest and covered like the rest.

    The old fit divided by their std: a dozen of them among 100,000 made the scale over 100,
    and a std of 0 was refused, so the pipeline left them out and gave them zero-width intervals.
    """
    def voxels(seed):
        rng = np.random.default_rng(seed)
        std = rng.uniform(0.01, 0.05, 100_000)
        std[:1000] = 0.0
        std[1000:2000] = 1e-8
        truth = rng.normal(0.0, np.hypot(3.0 * std, 0.02))  # the model's std is 3x too small, and a floor of 0.02
        return np.zeros_like(truth), std, truth

    mean, std, truth = voxels(0)
    fresh = voxels(1)
    unresolved = fresh[1] < 1e-6
    for calibrator in (SigmaScaling(), IsotonicCalibrator(), ConformalCalibrator()):
        calibrator.fit(mean, std, truth)
        lower, upper = calibrator.interval(*fresh[:2], 0.9)
        inside = (fresh[2] >= lower) & (fresh[2] <= upper)
        name = type(calibrator).__name__
        assert (upper - lower)[unresolved].min() > 0, name
        assert float(np.mean(inside)) == pytest.approx(0.9, abs=0.01), name
        # (conformal promises coverage over all voxels, not per group: it rounds the floor to a candidate)
        assert float(np.mean(inside[unresolved])) == pytest.approx(0.9, abs=0.04 if name != "ConformalCalibrator" else 0.07), name
        assert float(np.mean(inside[~unresolved])) == pytest.approx(0.9, abs=0.01), name
    assert float(SigmaScaling().fit(mean, std, truth).scale_) == pytest.approx(3.0, rel=0.05)


def test_every_builtin_reports_its_fit():
    data = predictions(5000, std_ratio=1.5, seed=15, zero_std=0.02)
    for name in ("sigma_scaling", "isotonic", "conformal"):
        report = get_host()["calibrator"].create(name).fit(*data).fit_report()
        assert report["floor"] > 0 and all(isinstance(v, float) for v in report.values()), name
    assert "clamped_fraction" in IsotonicCalibrator().fit(*data).fit_report()


# --- isotonic: adaptive range, loud clamping -------------------------------------------------------


def test_isotonic_map_spans_the_data_not_a_fixed_range():
    """The knots run from the smallest to the largest z_eff seen (the old map always ran from -z_max to z_max)."""
    mean, std, target = predictions(20000, std_ratio=1.0, seed=16)
    calibrator = IsotonicCalibrator().fit(mean, std, target)
    z_eff = (target - mean) / calibrator.effective_std(std)
    assert calibrator.map_x_[0] == pytest.approx(z_eff.min(), abs=0.01)
    assert calibrator.map_x_[-1] == pytest.approx(z_eff.max(), abs=0.01)
    assert float(calibrator.clamped_fraction_) == 0.0


def test_isotonic_clamping_is_counted_and_warned():
    data = predictions(20000, std_ratio=3.0, seed=17)
    with pytest.warns(UserWarning, match=r"IsotonicCalibrator: \d+\.\d+% of standardized residuals were beyond z_max = 2"):
        calibrator = IsotonicCalibrator(z_max=2.0).fit(*data)
    z_eff = (data[2] - data[0]) / calibrator.effective_std(data[1])
    assert float(calibrator.clamped_fraction_) == pytest.approx(np.mean(np.abs(z_eff) > 2.0), abs=2e-3)
    assert calibrator.fit_report()["clamped_fraction"] == float(calibrator.clamped_fraction_)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IsotonicCalibrator().fit(*data)  # nothing clamped at the default z_max: no warning


# --- conformal ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_conformal_coverage_guarantee_on_exchangeable_data(level):
    """Heavy tails, a wrong std and 10 % of voxels with std 0 (whose truth is spread like the others'):
    a Gaussian interval would miss; the guarantee is distribution-free, zero stds included."""
    repeats, n = 200, 60
    covered, bound = [], []
    for seed in range(repeats):
        calibration = predictions(n, std_ratio=2.0, seed=1000 + seed, noise="t3", zero_std=0.1, floor=4.0)
        test = predictions(1000, std_ratio=2.0, seed=5000 + seed, noise="t3", zero_std=0.1, floor=4.0)
        calibrator = ConformalCalibrator().fit(*calibration)
        lower, upper = calibrator.interval(test[0], test[1], level)
        inside = (test[2] >= lower) & (test[2] <= upper)
        covered.append(float(np.mean(inside)))
        assert np.all(upper[test[1] == 0] > lower[test[1] == 0])  # no zero-width interval for a zero std
        bound.append(level + 1 / (int(calibrator.n_quantile_) + 1))
    average = float(np.mean(covered))
    tolerance = 0.01  # about 3 Monte Carlo standard errors of the average over 200 repeats
    assert average >= level - tolerance
    assert average <= float(np.mean(bound)) + 0.02 + tolerance  # + the binning's widening


def test_conformal_interval_is_infinite_when_the_level_needs_more_calibration_voxels():
    calibration = predictions(12, std_ratio=1.0, seed=14)
    scored = ~in_scale_share(*calibration)
    calibrator = ConformalCalibrator().fit(*calibration)
    n = int(calibrator.n_quantile_)
    assert n == int(scored.sum()) == 9  # three of the twelve fit the floor
    lower, upper = calibrator.interval(100.0, 5.0, 0.9)  # ceil(10 * 0.9) = 9 <= 9: finite
    assert np.isfinite(lower) and np.isfinite(upper)
    lower, upper = calibrator.interval(100.0, 5.0, 0.95)  # ceil(10 * 0.95) = 10 > 9
    assert lower == -np.inf and upper == np.inf
    assert calibrator.quantile(100.0, 5.0, 0.975) == np.inf


def test_conformal_binning_only_widens_intervals_and_by_less_than_a_bin():
    mean, std, target = predictions(2000, std_ratio=1.3, seed=9, zero_std=0.05, floor=1.0)
    calibrator = ConformalCalibrator().fit(mean, std, target)
    scored = ~in_scale_share(mean, std, target)
    scores = np.sort(np.abs(target - mean)[scored] / calibrator.effective_std(std[scored]))
    assert scores.size == int(calibrator.n_quantile_)
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


def test_a_calibrator_file_of_the_old_format_is_refused_in_one_line(tmp_path):
    """Files written before the floor (format uqsynth-calibrator-1) hold a state of r / std alone: never load it."""
    old = tmp_path / "isotonic.safetensors"
    save_tensors(old, {"counts_": np.zeros(10000, dtype=np.int64), "n_": np.asarray(5, dtype=np.int64)},
                 {"format": "uqsynth-calibrator-1", "calibrator": "isotonic", "arm": "mc",
                  "params": json.dumps({"bins": 10000, "z_max": 100.0})})
    message = _io_error(old)
    assert "old format 'uqsynth-calibrator-1'" in message and "uqsynth-calibrator-3" in message
    assert "rerun `uqsynth run`" in message


def test_a_calibrator_file_with_a_stale_summary_is_refused_in_one_line(tmp_path):
    fitted = IsotonicCalibrator(bins=100).fit(*predictions(1000, std_ratio=1.0, seed=18))
    path = tmp_path / "isotonic.safetensors"
    save_calibrator(fitted, path, name="isotonic", arm="mc")
    tensors, metadata = load_tensors(path, what="calibrator file", framework="np")
    del tensors["counts2d_"]
    save_tensors(path, tensors, metadata)
    assert "lacks the summary counts2d_" in _io_error(path)
    tensors["counts2d_"] = np.zeros((3, 4), dtype=np.int64)
    save_tensors(path, tensors, metadata)
    assert "summary counts2d_ has shape (3, 4)" in _io_error(path)
    tensors["counts2d_"] = fitted.counts2d_
    tensors["scale_"] = np.asarray(1.0)
    save_tensors(path, tensors, metadata)
    assert "holds scale_, which IsotonicCalibrator does not fit" in _io_error(path)


def test_saved_calibrators_refit_identically_from_their_summary(tmp_path):
    data = predictions(3000, std_ratio=1.5, seed=19, zero_std=0.05)
    for name in ("sigma_scaling", "isotonic", "conformal"):
        fitted = get_host()["calibrator"].create(name).fit(*data)
        path = tmp_path / f"{name}.safetensors"
        save_calibrator(fitted, path, name=name, arm="mc")
        _, loaded = load_calibrator(path, host=get_host(), arm="mc")
        assert loaded.fit_report() == fitted.fit_report(), name
        np.testing.assert_array_equal(loaded.interval(data[0], data[1], 0.9), fitted.interval(data[0], data[1], 0.9))


def test_fit_partial_fit_and_merge_agree_exactly_with_zero_stds():
    mean, std, target = predictions(9000, std_ratio=2.0, seed=20, zero_std=0.05)
    for name in ("sigma_scaling", "isotonic", "conformal"):
        make = lambda: get_host()["calibrator"].create(name)  # noqa: E731
        whole = make().fit(mean, std, target)
        streamed = make()
        for batch in np.array_split(np.arange(mean.size), 7):
            streamed.partial_fit(mean[batch], std[batch], target[batch])
        merged = make().fit(mean[:4000], std[:4000], target[:4000]).merge(make().fit(mean[4000:], std[4000:], target[4000:]))
        for other in (streamed, merged):
            for key, value in whole.summary().items():
                np.testing.assert_array_equal(getattr(other, key), value, err_msg=f"{name}.{key}")
            np.testing.assert_array_equal(other.interval(mean[:50], std[:50], 0.9), whole.interval(mean[:50], std[:50], 0.9))
