"""A reusable contract for calibrators, in the spirit of scikit-learn's estimator checks.

Every calibrator, built in or from a plugin, is used the same way by the
pipeline: fitted on a calibration set, asked for CDF values, quantiles and
intervals, saved next to the arm and loaded back. This suite checks the rules
that makes safe, independently of *how* a calibrator recalibrates. A plugin
author tests a new calibrator in one line::

    from uqsynth.testing.calibrator_contract import check_calibrator

    def test_my_calibrator():
        check_calibrator(lambda: MyCalibrator(alpha=0.1))

or gets one pytest item per check (so a failure names the check)::

    from uqsynth.testing.calibrator_contract import parametrize_with_checks

    @parametrize_with_checks([functools.partial(MyCalibrator, alpha=0.1)])
    def test_my_calibrator(factory, check):
        check(factory)

Each check takes a *factory* (a zero-argument callable returning a fresh,
unfitted calibrator), so no check sees state left by another. The data are
synthetic, drawn from seeded local generators, so the checks are
deterministic and leave global random state alone.

Zero std. The pipeline fits calibrators on every brain voxel and asks them
for every brain voxel's interval, including voxels whose MC samples all
agree (std 0, or round-off such as 1e-9). :func:`check_fit_with_zero_std`
and :func:`check_zero_std_outputs` require a finite interval of positive
width for them; a calibrator that refuses them, or divides by their std,
fails with a line saying which call did what and how the built-ins avoid
it (an effective scale ``sqrt((s * std)^2 + c^2)`` with a fitted floor ``c``).

Quality. :data:`QUALITY_CHECKS` (not part of :data:`CALIBRATOR_CHECKS`) are
bars the built-in calibrators meet and a plugin may claim:
``check_calibrator(factory, quality=True)``. Today: the 90 % interval covers
heavy-tailed (Student t, 3 degrees of freedom) data with zero-std voxels
within 0.02 of 90 %.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

from uqsynth.testing._contract import parametrize, run_checks
from uqsynth.calibration.base import Calibrator
from uqsynth.calibration.io import load_calibrator, save_calibrator
from uqsynth.config import Interval, declaration_problems, declared_constraints, validate_params

CalibratorFactory = Callable[[], Calibrator]
CalibratorCheck = Callable[[CalibratorFactory], None]

#: Voxels in the calibration set most checks fit on.
FIT_VOXELS = 4000

#: Probabilities at which quantiles are checked.
QUANTILE_GRID = np.linspace(0.01, 0.99, 99)

#: Interval levels, nested in this order.
LEVELS = (0.5, 0.9, 0.95)

#: Slack on probabilities (CDF values, quantile levels) for floating-point rounding.
PROBABILITY_TOLERANCE = 1e-6


def _data(shape: tuple[int, ...] = (FIT_VOXELS,), seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions on an intensity scale and a truth they describe badly.

    Why this data: intensities like those of a [0, 255] image, a std that
    varies per voxel, and a truth with a bias and a std 1.5 times the
    predicted one, so every calibrator has something to correct.
    """
    rng = np.random.default_rng(seed)
    mean = rng.uniform(20.0, 230.0, shape)
    std = rng.uniform(1.0, 10.0, shape)
    target = mean + 0.3 * std + 1.5 * std * rng.standard_normal(shape)
    return mean, std, target


#: Share of voxels with std exactly 0, and with round-off std (``ROUND_OFF_STD``), in the zero-std checks.
ZERO_STD_SHARE = 0.05

#: A std that is MC round-off: every sample agreed to float32 precision.
ROUND_OFF_STD = 1e-9


def _data_with_zero_std(
    shape: tuple[int, ...] = (FIT_VOXELS,), seed: int = 0, noise: str = "normal"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_data` where a share of the voxels have std 0 and as many a round-off std.

    Their truth lies about the mean like that of the most confident
    resolved voxels (std 1.5 on this data's [0, 255]-like scale): what a
    voxel the model is sure of does, and what a fitted floor should find.
    """
    rng = np.random.default_rng(seed + 100)
    mean = rng.uniform(20.0, 230.0, shape)
    std = rng.uniform(1.0, 10.0, shape)
    eps = rng.standard_normal(shape) if noise == "normal" else rng.standard_t(3, shape)
    target = mean + 0.3 * std + 1.5 * std * eps
    kind = rng.random(shape)
    zero, round_off = kind < ZERO_STD_SHARE, (kind >= ZERO_STD_SHARE) & (kind < 2 * ZERO_STD_SHARE)
    unresolved = zero | round_off
    target = np.where(unresolved, mean + 1.5 * eps, target)
    std = np.where(zero, 0.0, np.where(round_off, ROUND_OFF_STD, std))
    return mean, std, target


_ZERO_STD_HINT = (
    "the pipeline fits and queries every brain voxel, including those whose MC samples all agree "
    "(std 0 or round-off): give them a positive width, e.g. with an effective scale "
    "sqrt((s * std)^2 + c^2) whose floor c is fitted"
)


def _call_with_zero_std(what: str, call: Callable[[], object]) -> object:
    """``call()``, or an ``AssertionError`` naming ``what`` and the error when it raises."""
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            return call()
    except AssertionError:
        raise
    except Exception as error:  # noqa: BLE001 - any error is the finding, reported in one line
        message = str(error).splitlines()[0] if str(error) else ""
        raise AssertionError(f"{what} raised {type(error).__name__}: {message}; {_ZERO_STD_HINT}") from None


def _probe(voxels: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of a few test voxels at which outputs are examined."""
    mean, std, _ = _data((voxels,), seed)
    return mean, std


#: Subjects the checks spread their voxels over, for calibrators whose unit is the subject: enough
#: for risk control (RCPS) to certify the 0.98 central interval the zero-std checks ask for.
CONTRACT_SUBJECTS = 400


def _subjects(mean: np.ndarray) -> np.ndarray:
    """A subject id per voxel (voxel index modulo :data:`CONTRACT_SUBJECTS`), in ``mean``'s shape."""
    return (np.arange(np.size(mean)) % CONTRACT_SUBJECTS).reshape(np.shape(mean))


def _fit(calibrator: Calibrator, mean, std, target) -> Calibrator:
    """``calibrator.fit``, given subject ids when its ``fit`` takes them (as the pipeline does)."""
    from uqsynth.calibration.fitting import takes_subjects

    if takes_subjects(calibrator.fit):
        return calibrator.fit(mean, std, target, subject=_subjects(mean))
    return calibrator.fit(mean, std, target)


def _partial_fit(calibrator: Calibrator, mean, std, target, subject) -> Calibrator:
    """``calibrator.partial_fit``, given subject ids when it takes them."""
    from uqsynth.calibration.fitting import takes_subjects

    if takes_subjects(calibrator.partial_fit):
        return calibrator.partial_fit(mean, std, target, subject=subject)
    return calibrator.partial_fit(mean, std, target)


def _fitted(factory: CalibratorFactory) -> Calibrator:
    return _fit(factory(), *_data())


def _name(factory: CalibratorFactory) -> str:
    """A readable name for a factory, from the calibrator it builds (``IsotonicCalibrator(bins=100)``)."""
    return " ".join(repr(factory()).split())


def _outputs(calibrator: Calibrator) -> list[np.ndarray]:
    """CDF values, quantiles and interval bounds on the probe voxels, for comparing calibrators."""
    mean, std = _probe()
    values = mean[None, :] + std[None, :] * np.linspace(-4.0, 4.0, 17)[:, None]
    quantiles = calibrator.quantile(mean[None, :], std[None, :], QUANTILE_GRID[:, None])
    lower, upper = calibrator.interval(mean, std, 0.9)
    return [np.asarray(calibrator.cdf(mean[None, :], std[None, :], values)), np.asarray(quantiles),
            np.asarray(lower), np.asarray(upper)]


def _assert_same_outputs(a: Calibrator, b: Calibrator, what: str, *, exact: bool = True) -> None:
    for name, x, y in zip(("cdf", "quantile", "interval lower", "interval upper"), _outputs(a), _outputs(b)):
        if exact:
            same = np.array_equal(x, y)
        else:
            same = np.allclose(x, y, rtol=1e-9, atol=1e-9)
        assert same, f"{what}: {name} outputs differ (largest difference {np.nanmax(np.abs(x - y)):.3g})"


def check_is_calibrator(factory: CalibratorFactory) -> None:
    """The factory builds a :class:`Calibrator`, which is a scikit-learn estimator.

    Why: the plugin registry accepts only calibrators, and ``get_params`` /
    ``clone`` (how a TOML table becomes a calibrator) come from ``BaseEstimator``.
    """
    calibrator = factory()
    assert isinstance(calibrator, Calibrator), f"{type(calibrator).__name__} is not a Calibrator"
    assert isinstance(calibrator, BaseEstimator), f"{type(calibrator).__name__} is not a BaseEstimator"


def check_refuses_unfitted_use(factory: CalibratorFactory) -> None:
    """``cdf``, ``quantile``, ``interval`` and saving raise ``NotFittedError`` before ``fit``.

    Why: an unfitted calibrator silently returning the uncalibrated Gaussian
    (or garbage) would report "calibrated" numbers that are not.
    """
    calibrator = factory()
    mean, std = _probe()
    calls = {
        "cdf": lambda: calibrator.cdf(mean, std, mean),
        "quantile": lambda: calibrator.quantile(mean, std, 0.9),
        "interval": lambda: calibrator.interval(mean, std, 0.9),
        "fitted_state": calibrator.fitted_state,
    }
    for name, call in calls.items():
        with pytest.raises(NotFittedError):
            call()
            raise AssertionError(f"{name}() on an unfitted calibrator must raise NotFittedError")


def check_fit_returns_self(factory: CalibratorFactory) -> None:
    """``fit`` returns the calibrator itself, so ``Cal().fit(...).interval(...)`` chains.

    Why: the scikit-learn convention every caller relies on.
    """
    calibrator = factory()
    returned = _fit(calibrator, *_data())
    assert returned is calibrator, f"fit returned {returned!r}, not the calibrator itself"


def check_params_round_trip(factory: CalibratorFactory) -> None:
    """``get_params`` rebuilds an equal calibrator, and equal calibrators fit identically.

    Why: a TOML table maps onto the keyword parameters and a saved file
    stores them; both only work if ``__init__`` stores every parameter
    unchanged under its own name and fitting is deterministic.
    """
    calibrator = factory()
    params = calibrator.get_params()
    rebuilt = type(calibrator)(**params)
    assert rebuilt.get_params() == params, f"{type(calibrator).__name__}(**get_params()) changed the parameters"
    cloned = clone(calibrator)
    assert cloned.get_params() == params, "sklearn.base.clone changed the parameters"
    _fit(calibrator, *_data())
    fresh = clone(calibrator)
    with pytest.raises(NotFittedError):
        fresh.cdf(*_probe(), 0.0)
        raise AssertionError("a clone of a fitted calibrator must be unfitted")
    _assert_same_outputs(calibrator, _fit(fresh, *_data()), "fitting a clone on the same data")


def check_cdf_monotone_and_bounded(factory: CalibratorFactory) -> None:
    """The calibrated CDF lies in [0, 1] and never decreases as the value grows.

    Why: calibration curves, PIT histograms and CRPS all read the CDF as a
    probability; a non-monotone one has no quantiles.
    """
    calibrator = _fitted(factory)
    mean, std = _probe()
    values = mean[None, :] + std[None, :] * np.linspace(-8.0, 8.0, 321)[:, None]
    cdf = np.asarray(calibrator.cdf(mean[None, :], std[None, :], values))
    assert cdf.shape == values.shape, f"cdf has shape {cdf.shape}, values {values.shape}"
    assert np.isfinite(cdf).all(), "cdf must be finite"
    assert (cdf >= 0.0).all() and (cdf <= 1.0).all(), f"cdf must lie in [0, 1], found [{cdf.min()}, {cdf.max()}]"
    assert (np.diff(cdf, axis=0) >= -PROBABILITY_TOLERANCE).all(), "cdf decreases as the value grows"


def check_quantile_monotone_and_consistent(factory: CalibratorFactory) -> None:
    """Quantiles grow with ``q`` and are quantiles of the calibrated CDF.

    Why: intervals and quantile-based scores come from ``quantile``, the
    calibration curve from ``cdf``; they must describe one distribution.
    The check is the definition of a quantile, ``cdf(x-) <= q <= cdf(x)``
    for ``x = quantile(q)``, so it holds both for continuous maps
    (``cdf(quantile(q)) = q``) and for step functions such as a conformal
    distribution built from finitely many scores.
    """
    calibrator = _fitted(factory)
    mean, std = _probe()
    q = QUANTILE_GRID[:, None]
    x = np.asarray(calibrator.quantile(mean[None, :], std[None, :], q))
    assert x.shape == (QUANTILE_GRID.size, mean.size), f"quantile has shape {x.shape}"
    assert not np.isnan(x).any(), "quantile returned NaN"
    assert (x[1:] >= x[:-1]).all(), "quantile decreases as q grows"
    finite = np.isfinite(x)
    step = 1e-9 * (np.abs(np.where(finite, x, 0.0)) + std[None, :])
    xs = np.where(finite, x, 0.0)
    below = np.asarray(calibrator.cdf(mean[None, :], std[None, :], xs - step))
    above = np.asarray(calibrator.cdf(mean[None, :], std[None, :], xs + step))
    qq = np.broadcast_to(q, x.shape)
    bad = finite & ((below > qq + PROBABILITY_TOLERANCE) | (above < qq - PROBABILITY_TOLERANCE))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(
            f"quantile({qq[i, j]:.2f}) = {x[i, j]:.6g} but the cdf just below/above it is "
            f"{below[i, j]:.6f}/{above[i, j]:.6f}, which does not bracket {qq[i, j]:.2f}"
        )


def check_intervals_nested(factory: CalibratorFactory) -> None:
    """Central intervals are ordered (lower <= upper) and nested by level (50 % in 90 % in 95 %).

    Why: a 95 % interval narrower than the 90 % one would make coverage
    plots and interval scores contradict each other.
    """
    calibrator = _fitted(factory)
    mean, std = _probe()
    previous = None
    for level in LEVELS:
        lower, upper = (np.asarray(a) for a in calibrator.interval(mean, std, level))
        assert lower.shape == mean.shape and upper.shape == mean.shape, f"interval shapes at level {level}"
        assert not (np.isnan(lower).any() or np.isnan(upper).any()), f"interval at level {level} holds NaN"
        assert (lower <= upper).all(), f"lower > upper at level {level}"
        if previous is not None:
            assert (lower <= previous[0]).all() and (upper >= previous[1]).all(), (
                f"the {level:.0%} interval does not contain the {previous[2]:.0%} interval"
            )
        previous = (lower, upper, level)


def check_shapes_preserved(factory: CalibratorFactory) -> None:
    """Fitting takes volumes of any shape (float32 too); outputs take the inputs' shape.

    Why: the pipeline passes whole masked volumes, slices or single voxels,
    in the network's float32.
    """
    mean, std, target = (a.astype(np.float32) for a in _data((12, 15, 20)))
    calibrator = _fit(factory(), mean, std, target)
    for shape in ((), (7,), (2, 3, 4)):
        m, s, _ = (np.asarray(a) for a in _data(shape, seed=2))
        assert np.shape(calibrator.cdf(m, s, m)) == shape, f"cdf changed shape {shape}"
        assert np.shape(calibrator.quantile(m, s, 0.9)) == shape, f"quantile with scalar q changed shape {shape}"
        q = np.full(shape, 0.25)
        assert np.shape(calibrator.quantile(m, s, q)) == shape, f"quantile with array q changed shape {shape}"
        lower, upper = calibrator.interval(m, s, 0.9)
        assert np.shape(lower) == shape and np.shape(upper) == shape, f"interval changed shape {shape}"


class _OneCalibrator:
    """Stands in for ``host["calibrator"]`` so a calibrator need not be registered to be checked."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def create(self, name: str, /, **params):
        return self.cls(**params)


def check_save_load_round_trip(factory: CalibratorFactory) -> None:
    """Saving to a safetensors file and loading it back gives identical outputs.

    Why: the run fits calibrators once and the report (or a later
    ``uqsynth report``) loads them; fitted state outside trailing-underscore
    attributes, or state that is not plain arrays, would be lost or refused.
    """
    calibrator = _fitted(factory)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibrator.safetensors"
        save_calibrator(calibrator, path, name="checked", arm="arm_a")
        name, loaded = load_calibrator(path, host={"calibrator": _OneCalibrator(type(calibrator))}, arm="arm_a")
    assert name == "checked", f"loaded name {name!r}"
    assert type(loaded) is type(calibrator), f"loaded a {type(loaded).__name__}"
    assert loaded.get_params() == calibrator.get_params(), "parameters changed through save/load"
    _assert_same_outputs(calibrator, loaded, "after save/load")


def check_fit_rejects_invalid_inputs(factory: CalibratorFactory) -> None:
    """``fit`` raises ``ValueError`` for a negative std, NaN anywhere, or shapes that do not match.

    Why: a voxel outside the brain mask (NaN) or a corrupted std map would
    otherwise turn the fitted state into NaN or infinity without a word, and
    every calibrated output with it. (A std of 0 is valid input:
    :func:`check_fit_with_zero_std`.)
    """
    mean, std, target = _data((50,))
    cases = {
        "a negative std": (mean, np.where(np.arange(50) == 3, -1.0, std), target),
        "an infinite std": (mean, np.where(np.arange(50) == 3, np.inf, std), target),
        "a NaN std": (mean, np.where(np.arange(50) == 3, np.nan, std), target),
        "a NaN target": (mean, std, np.where(np.arange(50) == 3, np.nan, target)),
        "a NaN mean": (np.where(np.arange(50) == 3, np.nan, mean), std, target),
        "mismatched shapes": (mean, std, target[:40]),
    }
    for what, arrays in cases.items():
        with pytest.raises(ValueError):
            _fit(factory(), *arrays)
            raise AssertionError(f"fit with {what} must raise ValueError")


def check_predict_rejects_invalid_inputs(factory: CalibratorFactory) -> None:
    """``cdf``/``quantile``/``interval`` raise ``ValueError`` for a negative std, NaN, bad shapes or q outside (0, 1).

    Why: the same masked or corrupted voxels reach the calibrated outputs;
    an error is noticed, a NaN in a metric average is not.
    """
    calibrator = _fitted(factory)
    mean, std = _probe(10)
    negative_std = np.where(np.arange(10) == 3, -1.0, std)
    nan_mean = np.where(np.arange(10) == 3, np.nan, mean)
    cases = {
        "cdf with a negative std": lambda: calibrator.cdf(mean, negative_std, mean),
        "cdf with a NaN mean": lambda: calibrator.cdf(nan_mean, std, mean),
        "cdf with mismatched shapes": lambda: calibrator.cdf(mean, std, mean[:4]),
        "quantile with a negative std": lambda: calibrator.quantile(mean, -std, 0.9),
        "quantile with q = 1.5": lambda: calibrator.quantile(mean, std, 1.5),
        "quantile with q = NaN": lambda: calibrator.quantile(mean, std, np.nan),
        "interval with a negative std": lambda: calibrator.interval(mean, negative_std, 0.9),
        "interval at level 1.2": lambda: calibrator.interval(mean, std, 1.2),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError):
            call()
            raise AssertionError(f"{what} must raise ValueError")


def _assert_usable_for_zero_std(calibrator: Calibrator, fitted_on: str) -> None:
    """Outputs for voxels with std 0 and round-off std: finite intervals of positive width, a proper CDF."""
    mean, _ = _probe(6)
    for label, std_value in (("std 0", 0.0), (f"std {ROUND_OFF_STD:g}", ROUND_OFF_STD)):
        std = np.full(mean.shape, std_value)
        previous = None
        for level in LEVELS:
            bounds = _call_with_zero_std(
                f"interval(mean, std, {level}) for voxels with {label} (fitted on {fitted_on})",
                lambda: calibrator.interval(mean, std, level),
            )
            lower, upper = (np.asarray(b, dtype=np.float64) for b in bounds)
            assert np.isfinite(lower).all() and np.isfinite(upper).all(), (
                f"the {level:.0%} interval of voxels with {label} is not finite (fitted on {fitted_on}): "
                f"[{lower.flat[0]:.6g}, {upper.flat[0]:.6g}]; {_ZERO_STD_HINT}"
            )
            assert (lower < upper).all(), (
                f"the {level:.0%} interval of voxels with {label} has zero width (fitted on {fitted_on}): "
                f"lower = upper = {lower.flat[0]:.6g}; {_ZERO_STD_HINT}"
            )
            if previous is not None:
                assert (lower <= previous[0]).all() and (upper >= previous[1]).all(), (
                    f"for voxels with {label} the {level:.0%} interval does not contain the narrower one"
                )
            previous = (lower, upper)
        q = QUANTILE_GRID[::7]
        quantiles = np.asarray(_call_with_zero_std(
            f"quantile(mean, std, q) for voxels with {label} (fitted on {fitted_on})",
            lambda: calibrator.quantile(mean[None, :], std[None, :], q[:, None]),
        ), dtype=np.float64)
        assert np.isfinite(quantiles).all(), f"quantiles of voxels with {label} are not finite; {_ZERO_STD_HINT}"
        assert (np.diff(quantiles, axis=0) >= 0).all(), f"quantiles of voxels with {label} decrease as q grows"
        values = quantiles[[0, -1]]
        cdf = np.asarray(_call_with_zero_std(
            f"cdf(mean, std, values) for voxels with {label} (fitted on {fitted_on})",
            lambda: calibrator.cdf(mean[None, :], std[None, :], values),
        ), dtype=np.float64)
        assert np.isfinite(cdf).all() and (cdf >= 0).all() and (cdf <= 1).all(), (
            f"the cdf of voxels with {label} is not a probability (found {cdf.flat[0]!r}); {_ZERO_STD_HINT}"
        )
        assert (cdf[1] >= cdf[0]).all(), f"the cdf of voxels with {label} decreases as the value grows"


def check_fit_with_zero_std(factory: CalibratorFactory) -> None:
    """``fit`` accepts voxels with std 0 and round-off std among the others, and its outputs stay usable.

    Why: those are brain voxels like any other; a calibrator that refuses
    them makes the pipeline leave them out of the fit (and out of the
    calibrated intervals), and one that divides by their std gets infinite
    standardized residuals, which wreck any fit on standardized residuals.
    """
    mean, std, target = _data_with_zero_std()
    calibrator = factory()
    _call_with_zero_std(
        f"fit on voxels of which {ZERO_STD_SHARE:.0%} have std 0 and {ZERO_STD_SHARE:.0%} std {ROUND_OFF_STD:g}",
        lambda: _fit(calibrator, mean, std, target),
    )
    probe_mean, probe_std = _probe()
    lower, upper = (np.asarray(b, dtype=np.float64) for b in calibrator.interval(probe_mean, probe_std, 0.9))
    bad = ~(np.isfinite(lower) & np.isfinite(upper) & (lower < upper))
    assert not bad.any(), (
        "after a fit with zero-std voxels, the 90 % interval of ordinary voxels is not finite with lower < upper "
        f"(found [{lower[bad][0]:.6g}, {upper[bad][0]:.6g}]): the fit divided by a zero std? {_ZERO_STD_HINT}"
    )
    _assert_usable_for_zero_std(calibrator, "voxels with zero std")


def check_zero_std_outputs(factory: CalibratorFactory) -> None:
    """A calibrator fitted on voxels that all have a std gives voxels with std 0 a finite interval of positive width.

    Why: a test voxel may have std 0 even when no calibration voxel had;
    a zero-width interval there claims certainty the model never earned.
    """
    _assert_usable_for_zero_std(_fitted(factory), "voxels that all have a std")


def check_heavy_tailed_coverage(factory: CalibratorFactory) -> None:
    """The 90 % interval covers 90 % (within 0.02) of fresh heavy-tailed data with zero-std voxels.

    Why: MC-dropout errors are heavier-tailed than a Gaussian and some
    voxels have no std; the interval the report shows must still hold what
    it says. The data: a bias of 0.3 std, Student t (3 degrees of freedom)
    errors 1.5 times the std, 5 % of voxels with std 0 and 5 % with a
    round-off std, 20000 voxels to fit and 20000 fresh ones to test
    (sampling error of the coverage 0.002).
    """
    calibrator = _call_with_zero_std(
        "fit on heavy-tailed data with zero-std voxels",
        lambda: _fit(factory(), *_data_with_zero_std((20000,), seed=3, noise="t3")),
    )
    mean, std, target = _data_with_zero_std((20000,), seed=4, noise="t3")
    lower, upper = calibrator.interval(mean, std, 0.9)
    inside = (target >= lower) & (target <= upper)
    picp, zero = float(np.mean(inside)), float(np.mean(inside[std == 0]))
    assert abs(picp - 0.9) <= 0.02, (
        f"the 90 % interval holds {picp:.3f} of fresh heavy-tailed voxels (those with std 0: {zero:.3f})"
    )


def check_calibrate_gives_its_predictive(factory: CalibratorFactory) -> None:
    """``calibrate(GaussianPredictive(mean, std))`` answers with the calibrator's cdf, quantile and interval.

    Why: metrics and maps use a calibrated predictive through the
    :class:`~uqsynth.predictive.Predictive` interface; it must be the same
    distribution the calibrator's own methods describe, with a CRPS and
    moments of the voxels' shape.
    """
    from uqsynth.predictive import GaussianPredictive, Predictive

    calibrator = _fitted(factory)
    mean, std = _probe()
    predictive = calibrator.calibrate(GaussianPredictive(mean, std))
    assert isinstance(predictive, Predictive), f"calibrate returned a {type(predictive).__name__}, not a Predictive"
    for name, ours, theirs in (
        ("cdf", predictive.cdf(mean + std), calibrator.cdf(mean, std, mean + std)),
        ("quantile", predictive.quantile(0.9), calibrator.quantile(mean, std, 0.9)),
        ("interval lower", predictive.interval(0.9)[0], calibrator.interval(mean, std, 0.9)[0]),
        ("interval upper", predictive.interval(0.9)[1], calibrator.interval(mean, std, 0.9)[1]),
    ):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), f"the calibrated predictive's {name} differs"
    crps = np.asarray(predictive.crps(mean + std))
    # A distribution with mass at infinity (a subject-level calibrator fitted on too few subjects to
    # certify its outermost quantiles) has an infinite CRPS; any other must have a finite one.
    from uqsynth.predictive import MIDPOINT_LEVELS

    outer = np.asarray(calibrator.quantile(mean[:1], std[:1], MIDPOINT_LEVELS[[0, -1]]))
    finite_ok = np.isfinite(crps) if np.isfinite(outer).all() else ~np.isnan(crps)
    assert crps.shape == mean.shape and finite_ok.all() and (crps >= 0).all(), (
        "crps must be >= 0, and finite where the outermost quantiles are")
    for name in ("mean", "std"):
        value = np.asarray(getattr(predictive, name))
        assert value.shape == mean.shape and not np.isnan(value).any(), f"the calibrated predictive's {name}"


def check_partial_fit_matches_fit(factory: CalibratorFactory) -> None:
    """If the calibrator has ``partial_fit``: two batches give what one ``fit`` gives, and ``fit`` starts over.

    Why: streaming calibrators are fitted subject by subject to bound memory;
    the result must not depend on how the voxels were batched, and a new
    ``fit`` must not keep batches of an earlier one. Calibrators without
    ``partial_fit`` pass trivially (the scikit-learn way to say "no streaming").
    """
    if not hasattr(factory(), "partial_fit"):
        return
    mean, std, target = _data()
    half = FIT_VOXELS // 2
    streamed = factory()
    first = _partial_fit(streamed, mean[:half], std[:half], target[:half], _subjects(mean)[:half])
    assert first is streamed, "partial_fit must return self"
    _partial_fit(streamed, mean[half:], std[half:], target[half:], _subjects(mean)[half:])
    _assert_same_outputs(_fit(factory(), mean, std, target), streamed, "two partial_fit batches vs one fit",
                         exact=False)
    refit = _fit(streamed, mean[:half], std[:half], target[:half])
    _assert_same_outputs(_fit(factory(), mean[:half], std[:half], target[:half]), refit,
                         "fit after partial_fit vs a fresh fit", exact=False)


def _outside(interval: Interval, like: object) -> list[object]:
    """Values just outside ``interval``, of the type of ``like`` (the parameter's value)."""
    step = 1 if isinstance(like, int) else 1.0
    values = []
    if interval.low is not None:
        values.append(interval.low - step if interval.closed in ("both", "left") else interval.low)
    if interval.high is not None:
        values.append(interval.high + step if interval.closed in ("both", "right") else interval.high)
    return [int(v) if isinstance(like, int) else float(v) for v in values]


def check_declared_constraints(factory: CalibratorFactory) -> None:
    """The calibrator meets the constraints declared on its ``__init__``, and ``fit`` enforces them.

    Why: a configuration is checked against these declarations when it
    loads (``bins = 0`` is refused before training, see
    :mod:`uqsynth.config`). Declarations broken by the calibrator's own
    parameters, rules naming parameters it does not have, or ranges ``fit``
    ignores (code building the calibrator itself would crash later, or
    silently compute nonsense) would make that check say what is not so.
    A calibrator that declares nothing passes.
    """
    calibrator = factory()
    cls = type(calibrator)
    problems = declaration_problems(cls)
    assert not problems, "; ".join(problems)
    params = calibrator.get_params(deep=False)
    try:
        validate_params(cls, params)
    except ValueError as error:
        raise AssertionError(f"its own parameters break its declared constraints: {error}") from None
    for name, intervals in declared_constraints(cls).items():
        for interval in intervals:
            for outside in _outside(interval, params[name]):
                broken = clone(calibrator).set_params(**{name: outside})
                with pytest.raises(ValueError):
                    _fit(broken, *_data((50,)))
                    raise AssertionError(
                        f"fit accepted {name}={outside!r}, outside the range declared on __init__; "
                        "call self._validate_params() first in fit"
                    )


#: Every check of the contract, in the order :func:`check_calibrator` runs them.
CALIBRATOR_CHECKS: tuple[CalibratorCheck, ...] = (
    check_is_calibrator,
    check_refuses_unfitted_use,
    check_fit_returns_self,
    check_params_round_trip,
    check_cdf_monotone_and_bounded,
    check_quantile_monotone_and_consistent,
    check_intervals_nested,
    check_shapes_preserved,
    check_save_load_round_trip,
    check_fit_rejects_invalid_inputs,
    check_predict_rejects_invalid_inputs,
    check_partial_fit_matches_fit,
    check_declared_constraints,
    check_calibrate_gives_its_predictive,
    check_fit_with_zero_std,
    check_zero_std_outputs,
)

#: Quality bars the built-in calibrators meet (see the module docstring); not in :data:`CALIBRATOR_CHECKS`.
QUALITY_CHECKS: tuple[CalibratorCheck, ...] = (check_heavy_tailed_coverage,)


def check_calibrator(factory: CalibratorFactory, *, quality: bool = False) -> None:
    """Run every check of :data:`CALIBRATOR_CHECKS` on the calibrators built by ``factory``.

    Args:
        factory: Zero-argument callable returning a fresh, unfitted calibrator,
            e.g. ``lambda: IsotonicCalibrator(bins=1000)``.
        quality: Also run :data:`QUALITY_CHECKS`.

    Raises:
        AssertionError: At the first failed check, naming the check and the calibrator.
    """
    run_checks(CALIBRATOR_CHECKS + (QUALITY_CHECKS if quality else ()), factory, _name(factory))


def parametrize_with_checks(factories: Sequence[CalibratorFactory], *, quality: bool = False) -> pytest.MarkDecorator:
    """A pytest parametrization over every (factory, check) pair, one test item each.

    The decorated test takes the arguments ``factory`` and ``check`` and calls
    ``check(factory)``. Item ids read like ``IsotonicCalibrator()-check_intervals_nested``.

    Args:
        factories: Zero-argument callables each returning a fresh calibrator.
        quality: Also parametrize over :data:`QUALITY_CHECKS`.

    Returns:
        A ``pytest.mark.parametrize`` decorator.
    """
    return parametrize(CALIBRATOR_CHECKS + (QUALITY_CHECKS if quality else ()), factories, _name)
