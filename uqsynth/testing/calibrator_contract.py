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


def _probe(voxels: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of a few test voxels at which outputs are examined."""
    mean, std, _ = _data((voxels,), seed)
    return mean, std


def _fitted(factory: CalibratorFactory) -> Calibrator:
    return factory().fit(*_data())


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
    returned = calibrator.fit(*_data())
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
    calibrator.fit(*_data())
    fresh = clone(calibrator)
    with pytest.raises(NotFittedError):
        fresh.cdf(*_probe(), 0.0)
        raise AssertionError("a clone of a fitted calibrator must be unfitted")
    _assert_same_outputs(calibrator, fresh.fit(*_data()), "fitting a clone on the same data")


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
    calibrator = factory().fit(mean, std, target)
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
    """``fit`` raises ``ValueError`` for std <= 0, NaN anywhere, or shapes that do not match.

    Why: a voxel outside the brain mask (NaN) or a background voxel every MC
    sample agrees on (std 0) would otherwise turn the fitted state into NaN
    or infinity without a word, and every calibrated output with it.
    """
    mean, std, target = _data((50,))
    cases = {
        "a zero std": (mean, np.where(np.arange(50) == 3, 0.0, std), target),
        "a negative std": (mean, -std, target),
        "a NaN std": (mean, np.where(np.arange(50) == 3, np.nan, std), target),
        "a NaN target": (mean, std, np.where(np.arange(50) == 3, np.nan, target)),
        "a NaN mean": (np.where(np.arange(50) == 3, np.nan, mean), std, target),
        "mismatched shapes": (mean, std, target[:40]),
    }
    for what, arrays in cases.items():
        with pytest.raises(ValueError):
            factory().fit(*arrays)
            raise AssertionError(f"fit with {what} must raise ValueError")


def check_predict_rejects_invalid_inputs(factory: CalibratorFactory) -> None:
    """``cdf``/``quantile``/``interval`` raise ``ValueError`` for std <= 0, NaN, bad shapes or q outside (0, 1).

    Why: the same masked or degenerate voxels reach the calibrated outputs;
    an error is noticed, a NaN in a metric average is not.
    """
    calibrator = _fitted(factory)
    mean, std = _probe(10)
    zero_std = np.where(np.arange(10) == 3, 0.0, std)
    nan_mean = np.where(np.arange(10) == 3, np.nan, mean)
    cases = {
        "cdf with a zero std": lambda: calibrator.cdf(mean, zero_std, mean),
        "cdf with a NaN mean": lambda: calibrator.cdf(nan_mean, std, mean),
        "cdf with mismatched shapes": lambda: calibrator.cdf(mean, std, mean[:4]),
        "quantile with a zero std": lambda: calibrator.quantile(mean, zero_std, 0.9),
        "quantile with a negative std": lambda: calibrator.quantile(mean, -std, 0.9),
        "quantile with q = 1.5": lambda: calibrator.quantile(mean, std, 1.5),
        "quantile with q = NaN": lambda: calibrator.quantile(mean, std, np.nan),
        "interval with a zero std": lambda: calibrator.interval(mean, zero_std, 0.9),
        "interval at level 1.2": lambda: calibrator.interval(mean, std, 1.2),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError):
            call()
            raise AssertionError(f"{what} must raise ValueError")


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
    assert streamed.partial_fit(mean[:half], std[:half], target[:half]) is streamed, "partial_fit must return self"
    streamed.partial_fit(mean[half:], std[half:], target[half:])
    _assert_same_outputs(factory().fit(mean, std, target), streamed, "two partial_fit batches vs one fit",
                         exact=False)
    refit = streamed.fit(mean[:half], std[:half], target[:half])
    _assert_same_outputs(factory().fit(mean[:half], std[:half], target[:half]), refit,
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
                    broken.fit(*_data((50,)))
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
)


def check_calibrator(factory: CalibratorFactory) -> None:
    """Run every check of :data:`CALIBRATOR_CHECKS` on the calibrators built by ``factory``.

    Args:
        factory: Zero-argument callable returning a fresh, unfitted calibrator,
            e.g. ``lambda: IsotonicCalibrator(bins=1000)``.

    Raises:
        AssertionError: At the first failed check, naming the check and the calibrator.
    """
    run_checks(CALIBRATOR_CHECKS, factory, _name(factory))


def parametrize_with_checks(factories: Sequence[CalibratorFactory]) -> pytest.MarkDecorator:
    """A pytest parametrization over every (factory, check) pair, one test item each.

    The decorated test takes the arguments ``factory`` and ``check`` and calls
    ``check(factory)``. Item ids read like ``IsotonicCalibrator()-check_intervals_nested``.

    Args:
        factories: Zero-argument callables each returning a fresh calibrator.

    Returns:
        A ``pytest.mark.parametrize`` decorator.
    """
    return parametrize(CALIBRATOR_CHECKS, factories, _name)
