"""Properties that must hold for every input, checked on many generated ones (hypothesis).

Three families: the configuration parser and ``--set`` overrides (values
round-trip, unknown keys are named, a saved configuration loads back as
itself), the calibrators (a CDF in [0, 1] that never decreases, quantiles
that grow with the level, nested central intervals) and the metrics
(bounds and invariances). Examples are derived from the test's own code
(``derandomize``), so a failure reproduces on any machine.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib

import numpy as np
import pytest
import tomli_w
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_config import ARMS, error_of, load

from uqsynth.config import Config, DataConfig, RunConfig, SamplingConfig, TrainConfig, config_from_dict, dumps_config
from uqsynth.metrics import (
    calibration_curve,
    calibration_rms,
    crps_gaussian,
    interval_scores,
    mae,
    miscalibration_area,
    psnr,
    rmse,
    sparsification_curve,
)
from uqsynth.plugins import get_host

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def get(config: Config, key: str):
    """The value at a dotted key, e.g. ``"train.epochs"``."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def toml_literal(value) -> str:
    """``value`` written as a TOML literal, as a user would type it after ``--set key=``."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


# ------------------------------------------------------------ configuration and overrides

#: Integer keys and their allowed range (smallest, largest; None: unbounded).
INTEGER_KEYS = {
    "run.seed": (0, 2**32 - 1),  # what numpy and torch both accept as a seed
    "data.image_size": (8, None),
    "train.epochs": (1, None),
    "train.batch_size": (1, None),
    "train.max_steps_per_epoch": (0, None),
    "sampling.samples": (2, None),
    "calibration.max_subjects": (0, None),
}

#: Number keys and their allowed range, as (low, high, low included, high included).
NUMBER_KEYS = {
    "train.lr": (0.0, math.inf, False, False),
    "train.lambda_l1": (0.0, math.inf, True, False),
    "data.min_brain_fraction": (0.0, 1.0, True, True),
    "data.test_fraction": (0.0, 1.0, False, False),
}


@PROPERTY
@given(key=st.sampled_from(sorted(INTEGER_KEYS)), value=st.integers(-(2**63), 2**63 - 1))
def test_integer_overrides_round_trip_or_name_the_key(key, value):
    minimum, maximum = INTEGER_KEYS[key]
    override = f"{key}={value}"
    if value < minimum:
        assert error_of(ARMS, override) == f"--set {override}: {key} must be >= {minimum}, found {value}"
    elif maximum is not None and value > maximum:
        assert error_of(ARMS, override) == f"--set {override}: {key} must be < {maximum + 1}, found {value}"
    else:
        assert get(load(ARMS, override), key) == value


@PROPERTY
@given(key=st.sampled_from(sorted(NUMBER_KEYS)), value=st.floats(allow_nan=False, allow_infinity=False))
def test_number_overrides_round_trip_or_name_the_key(key, value):
    low, high, low_included, high_included = NUMBER_KEYS[key]
    override = f"{key}={value!r}"
    inside = (low <= value if low_included else low < value) and (value <= high if high_included else value < high)
    if inside:
        assert get(load(ARMS, override), key) == value
    else:
        assert error_of(ARMS, override).startswith(f"--set {override}: {key} must be ")


@PROPERTY
@given(name=st.text(max_size=30))
def test_any_string_round_trips_as_a_toml_literal(name):
    assert load(ARMS, f"run.name={toml_literal(name)}").run.name == name


@PROPERTY
@given(first=st.integers(1, 1000), last=st.integers(1, 1000))
def test_the_last_override_of_a_key_wins(first, last):
    assert load(ARMS, f"train.epochs={first}", f"train.epochs={last}").train.epochs == last


TABLES = {"run": RunConfig, "data": DataConfig, "train": TrainConfig, "sampling": SamplingConfig}


@PROPERTY
@given(table=st.sampled_from(sorted(TABLES)), key=st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
       value=st.one_of(st.integers(), st.booleans(), st.text(max_size=5)))
def test_an_unknown_key_is_an_error_naming_it(table, key, value):
    assume(key not in {field.name for field in dataclasses.fields(TABLES[table])})
    override = f"{table}.{key}={toml_literal(value)}"
    assert error_of(ARMS, override).startswith(f"--set {override}: unknown key {table}.{key}")


@PROPERTY
@given(
    name=st.text(max_size=20),
    seed=st.integers(0, 2**32),
    epochs=st.integers(1, 500),
    lr=st.floats(1e-8, 1.0),
    image_size=st.integers(8, 512),
    samples=st.integers(2, 100),
    p=st.floats(0.0, 0.99),
    positions=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    calibrators=st.lists(st.sampled_from(["isotonic", "sigma_scaling", "conformal"]), min_size=1, max_size=3,
                         unique=True),
)
def test_a_saved_configuration_loads_back_as_itself(name, seed, epochs, lr, image_size, samples, p, positions,
                                                    calibrators):
    config = load(
        ARMS,
        f"run.name={toml_literal(name)}", f"run.seed={seed}", f"train.epochs={epochs}", f"train.lr={lr!r}",
        f"data.image_size={image_size}", f"sampling.samples={samples}", f"arms.mc.stochastic_layer.p={p!r}",
        f"arms.mc.positions={positions}", f"calibration.calibrators={toml_literal(calibrators)}",
    )
    again = config_from_dict(tomllib.loads(dumps_config(config)), host=get_host())
    assert again == config


# ------------------------------------------------------------ calibrators

CALIBRATORS = ("isotonic", "sigma_scaling", "conformal")


@st.composite
def fitted(draw, name: str):
    """A calibrator fitted on a random calibration set (any residuals, up to far beyond its resolved range)."""
    residuals = np.array(draw(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=300)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mean = rng.uniform(0.0, 1.0, residuals.size)
    std = rng.uniform(1e-3, 0.5, residuals.size)
    calibrator = get_host()["calibrator"].create(name)
    return calibrator.fit(mean, std, mean + std * residuals)


def one_voxel():
    """Mean and std of the voxel the calibrated distribution is asked about."""
    return st.tuples(st.floats(-10.0, 10.0), st.floats(1e-3, 10.0))


def ascending(values: np.ndarray) -> bool:
    """Non-decreasing, infinities included (``np.diff`` would give NaN for inf - inf)."""
    return bool(np.all(values[1:] >= values[:-1]))


probabilities = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)


@pytest.mark.parametrize("name", CALIBRATORS)
@PROPERTY
@given(data=st.data(), voxel=one_voxel(), values=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=40))
def test_calibrated_cdf_is_a_cdf(name, data, voxel, values):
    calibrator = data.draw(fitted(name))
    cdf = calibrator.cdf(*voxel, np.sort(values))
    assert np.all((cdf >= 0.0) & (cdf <= 1.0))
    assert ascending(cdf)


@pytest.mark.parametrize("name", CALIBRATORS)
@PROPERTY
@given(data=st.data(), voxel=one_voxel(), q=st.lists(probabilities, min_size=2, max_size=40))
def test_calibrated_quantiles_grow_with_the_level(name, data, voxel, q):
    calibrator = data.draw(fitted(name))
    assert ascending(calibrator.quantile(*voxel, np.sort(q)))


@pytest.mark.parametrize("name", CALIBRATORS)
@PROPERTY
@given(data=st.data(), voxel=one_voxel(), levels=st.lists(probabilities, min_size=2, max_size=2, unique=True))
def test_a_wider_level_gives_a_containing_interval(name, data, voxel, levels):
    calibrator = data.draw(fitted(name))
    narrow, wide = (calibrator.interval(*voxel, level) for level in sorted(levels))
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


@pytest.mark.parametrize("name", ["isotonic", "sigma_scaling"])  # conformal scores the level itself
def test_a_level_too_close_to_one_is_refused_by_name(name):
    """Found by hypothesis: for the largest float below 1 the upper quantile level ``1 - (1 - level) / 2`` is 1.0."""
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(0, 1, 500), rng.uniform(0.01, 0.1, 500)
    calibrator = get_host()["calibrator"].create(name).fit(mean, std, mean + std * rng.standard_normal(500))
    with pytest.raises(ValueError, match="level 0.9999999999999999 is too close to 1"):
        calibrator.interval(np.array([0.5]), np.array([0.1]), 0.9999999999999999)
    lower, upper = calibrator.interval(np.array([0.5]), np.array([0.1]), 0.999999)
    assert lower[0] < 0.5 < upper[0]


@pytest.mark.parametrize("name", ["isotonic", "sigma_scaling"])
@PROPERTY
@given(data=st.data(), voxel=one_voxel(), q=probabilities)
def test_continuous_calibrators_invert_their_cdf(name, data, voxel, q):
    """For continuous ones, ``cdf(quantile(q)) = q`` (conformal is a step function; it brackets q instead)."""
    calibrator = data.draw(fitted(name))
    assert calibrator.cdf(*voxel, calibrator.quantile(*voxel, q)) == pytest.approx(q, abs=1e-6)


# ------------------------------------------------------------ metrics


@st.composite
def predictions(draw):
    """Truth, predicted mean and std of some voxels, float32 as the saved maps (normalized scale)."""
    n = draw(st.integers(1, 200))
    intensity = arrays(np.float32, n, elements=st.floats(0.0, 1.0, width=32))
    std = arrays(np.float32, n, elements=st.floats(2.0**-13, 1.0, width=32))
    return draw(intensity), draw(intensity), draw(std)


@PROPERTY
@given(voxels=predictions(), data=st.data())
def test_rmse_is_a_distance_blind_to_voxel_order(voxels, data):
    truth, mean, _ = voxels
    order = data.draw(st.permutations(range(truth.size)))
    error = rmse(truth, mean)
    assert error >= 0.0
    assert (error == 0.0) == np.array_equal(truth, mean)
    assert rmse(truth, truth) == 0.0
    assert rmse(mean, truth) == error
    assert rmse(truth[order], mean[order]) == pytest.approx(error, rel=1e-12)
    assert rmse(truth, mean, scale=1.0) * 255.0 == pytest.approx(error, rel=1e-12)
    assert mae(truth, mean) <= error * (1 + 1e-12)  # the mean is at most the root mean square


@PROPERTY
@given(voxels=predictions(), factor=st.floats(0.01, 100.0))
def test_psnr_does_not_depend_on_the_intensity_scale(voxels, factor):
    truth, mean, _ = voxels
    assume(not np.array_equal(truth, mean))
    scaled = psnr(truth.astype(np.float64) * factor, mean.astype(np.float64) * factor, data_range=factor)
    assert scaled == pytest.approx(psnr(truth, mean), rel=1e-9)


@PROPERTY
@given(voxels=predictions())
def test_coverage_is_a_fraction_that_grows_with_the_level(voxels):
    levels = (0.1, 0.5, 0.9, 0.99)
    scores = interval_scores(*voxels, levels=levels)
    picp = [scores["picp"][key] for key in sorted(scores["picp"], key=float)]
    width = [scores["width"][key] for key in sorted(scores["width"], key=float)]
    assert all(0.0 <= value <= 1.0 for value in picp)
    assert picp == sorted(picp) and width == sorted(width) and width[0] >= 0.0


@PROPERTY
@given(voxels=predictions())
def test_calibration_error_is_bounded(voxels):
    expected, observed = calibration_curve(*voxels)
    assert np.all((observed >= 0.0) & (observed <= 1.0)) and ascending(observed)
    assert 0.0 <= calibration_rms(expected, observed) <= 1.0
    assert 0.0 <= miscalibration_area(expected, observed) <= 0.5


@PROPERTY
@given(voxels=predictions())
def test_crps_lies_within_its_bounds_around_the_mae(voxels):
    """CRPS = E|X - y| - E|X - X'| / 2, so MAE - mean(std) / sqrt(pi) <= CRPS <= MAE + mean(std) sqrt(2 / pi)."""
    truth, mean, std = voxels
    crps, error = crps_gaussian(truth, mean, std), mae(truth, mean)
    spread = 255.0 * float(np.mean(std, dtype=np.float64))
    assert crps >= 0.0
    assert error - spread / math.sqrt(math.pi) - 1e-9 <= crps <= error + spread * math.sqrt(2.0 / math.pi) + 1e-9


@PROPERTY
@given(voxels=predictions())
def test_crps_of_a_certain_prediction_is_the_mae(voxels):
    """properscoring's convention: as std -> 0 the CRPS becomes the absolute error."""
    truth, mean, std = voxels
    assert crps_gaussian(truth, mean, np.zeros_like(std)) == pytest.approx(mae(truth, mean), abs=1e-3)


@PROPERTY
@given(voxels=predictions())
def test_no_ranking_beats_the_oracle(voxels):
    """Sparsification by std never beats removing the largest errors first, so AUSE >= 0; ranking by error gives 0."""
    truth, mean, std = voxels
    curve = sparsification_curve(truth, mean, std)
    assert np.all(np.array(curve["rmse"]) >= np.array(curve["rmse_oracle"]) - 1e-9)
    assert curve["ause"] >= -1e-9
    by_error = np.abs(mean.astype(np.float64) - truth)
    assert sparsification_curve(truth, mean, by_error)["ause"] == pytest.approx(0.0, abs=1e-9)
