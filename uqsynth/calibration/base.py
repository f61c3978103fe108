"""The calibrator interface: scikit-learn estimators over predictive distributions.

A calibrator sees, per voxel, the model's predictive mean and standard
deviation (the Gaussian of the paper's MC sampling) and, when fitting, the
truth. It learns a correction and then answers three questions about the
corrected distribution: its CDF at given values, its quantiles, and central
intervals at a level. :meth:`Calibrator.calibrate` wraps those answers as a
:class:`uqsynth.predictive.Predictive` (mean, std, cdf, quantile, interval,
nll, crps), so a calibrated distribution is used like the model's own
:class:`~uqsynth.predictive.GaussianPredictive`.

A std of 0 is valid input: a voxel every MC sample agreed on. The
pipeline fits calibrators on every brain voxel and asks them for every
brain voxel's interval, so a calibrator must give such voxels a finite,
positive width. The built-in ones do by working with an effective scale
``sigma_eff^2 = (s * std)^2 + c^2`` whose floor ``c`` they fit
(:mod:`uqsynth.calibration._scale`); the contract suite
(:mod:`uqsynth.testing.calibrator_contract`) checks it of every calibrator.

As in scikit-learn: ``__init__`` only stores keyword-only parameters (so
``get_params`` round-trips a TOML table), ``fit`` validates, learns and
returns ``self``, learned state lives in attributes ending in ``_``, and using
an unfitted calibrator raises :class:`sklearn.exceptions.NotFittedError`.
Parameter ranges are declared on ``__init__`` in the configuration's
vocabulary (``bins: Annotated[int, Interval(1, None)]``, and ``param_rules``
for conditions between parameters, see :mod:`uqsynth.config`): a TOML table
breaking them is refused when the configuration loads, and ``fit`` refuses
them too (:meth:`Calibrator._validate_params`, as scikit-learn's).
Learned state is plain arrays (:meth:`Calibrator.fitted_state`), so it is
saved without pickling code.

:func:`check_inputs` and :func:`check_probabilities` are the shared input
checks (plugins should use them too, so every calibrator refuses NaN,
infinite values, negative std and mismatched shapes alike).
:class:`StreamingCalibrator` is the base of calibrators fitted from an
additive, bounded summary (``partial_fit``, ``merge``); calibrators without
``partial_fit`` need all voxels at once. :meth:`Calibrator.fit_report` gives
the numbers a run should log about a fit (e.g. the fraction of residuals
an isotonic map had to clamp).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

if TYPE_CHECKING:
    from uqsynth.predictive import Predictive


class Calibrator(BaseEstimator):
    """Interface of calibrator plugins.

    Arrays may have any (matching, or broadcastable) shape; outputs have the
    broadcast shape. ``std`` must be >= 0, and a voxel with std 0 must get
    a finite interval of positive width (see the module docstring).

    A plugin implements ``fit``, ``cdf`` and ``quantile``; ``interval``,
    ``calibrate``, ``crps`` and ``moments`` follow from them, ``nll`` is
    only there for calibrators that override it, and ``fit_report`` is
    empty unless overridden.
    """

    @abstractmethod
    def fit(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> Calibrator:
        """Learn the correction from predictions and the truth; return ``self``."""

    @abstractmethod
    def cdf(self, mean: np.ndarray, std: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Calibrated probability that the truth is below ``values`` (in [0, 1])."""

    @abstractmethod
    def quantile(self, mean: np.ndarray, std: np.ndarray, q: float | np.ndarray) -> np.ndarray:
        """Calibrated ``q``-quantile, ``q`` in (0, 1)."""

    def interval(self, mean: np.ndarray, std: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Central interval holding the truth with probability ``level`` once calibrated."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        tail = (1.0 - level) / 2.0
        if 1.0 - tail == 1.0:  # e.g. the largest float below 1: its upper quantile level rounds to 1
            raise ValueError(f"level {level!r} is too close to 1: the upper tail {tail:.1e} is below float64 resolution")
        return self.quantile(mean, std, tail), self.quantile(mean, std, 1.0 - tail)

    def calibrate(self, predictive: Predictive) -> Predictive:
        """The calibrated predictive of ``predictive``: a :class:`~uqsynth.predictive.CalibratedPredictive`.

        Its ``cdf``, ``quantile`` and ``interval`` are this calibrator's at
        ``(predictive.mean, predictive.std)`` (a calibrator sees a predictive
        through its mean and std, as when it was fitted); ``nll``, ``crps``
        and the moments are this calibrator's :meth:`nll`, :meth:`crps` and
        :meth:`moments`. Works for every subclass, plugins included.

        Raises:
            sklearn.exceptions.NotFittedError: The calibrator is not fitted.
        """
        from uqsynth.predictive import CalibratedPredictive

        check_is_fitted(self)
        return CalibratedPredictive(self, predictive)

    def nll(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Per-voxel negative log density of the calibrated distribution at ``target``.

        Raises:
            NotImplementedError: By default: a calibrator whose distribution
                has a density worth scoring overrides this.
        """
        raise NotImplementedError(f"{type(self).__name__} gives no density")

    def crps(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Per-voxel CRPS of the calibrated distribution at ``target``.

        By default from :meth:`quantile` by the midpoint rule over 99 levels
        (:func:`uqsynth.predictive.crps_from_quantiles`, within 0.04 % of the
        exact value for a Gaussian).
        """
        from uqsynth.predictive import crps_from_quantiles

        return crps_from_quantiles(lambda tau: self.quantile(mean, std, tau), target)

    def moments(self, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the calibrated distribution per voxel.

        By default from :meth:`quantile` by the midpoint rule
        (:func:`uqsynth.predictive.moments_from_quantiles`: the std comes out
        about 2 % small for a Gaussian, from the tails it leaves out).
        """
        from uqsynth.predictive import moments_from_quantiles

        return moments_from_quantiles(lambda tau: self.quantile(mean, std, tau))

    def fit_report(self) -> dict[str, float]:
        """Numbers about the fit a run should log and record (``{}`` unless a calibrator says more).

        For the built-ins: the fitted floor ``c`` (``floor``) and what else
        each fits; for isotonic, the fraction of residuals it clamped.
        """
        return {}

    def guarantee(self, level: float) -> dict[str, object]:
        """What this calibrator's central interval at ``level`` promises, for the certificate beside every map set.

        Keys: ``unit`` (``"voxel"``: a statement about a voxel drawn at
        random; ``"subject"``: about a new subject's whole volume; ``None``:
        no finite-sample promise), ``statement`` (one sentence, for people),
        ``alpha`` (the tolerated miscoverage, ``1 - level``), ``delta`` (the
        probability over the calibration draw that the promise fails, or
        ``None``) and ``calibration_subjects`` (how many subjects it was
        fitted on, where it counts them, else ``None``).

        The default, for calibrators that make no promise (isotonic, sigma
        scaling, most plugins): say so rather than imply one.
        """
        return promise(None, f"no finite-sample guarantee: {type(self).__name__} is fitted so that intervals at "
                             f"level {level:g} cover about that share of calibration voxels", level)

    def required_subjects(self) -> int:
        """The fewest calibration subjects with which this calibrator can give a finite interval (1 unless it counts subjects).

        A run checks it against its calibration split before training, so a
        split too small for a subject-level guarantee stops at once with one
        line instead of ending, an hour later, in infinite intervals.
        """
        return 1

    def _validate_params(self) -> None:
        """Refuse parameters breaking the constraints declared on ``__init__`` (scikit-learn's ``_validate_params``).

        Why here too: the configuration checks them when it loads, but code
        that builds a calibrator itself would otherwise learn of ``bins=0``
        from a crash deep inside ``fit``.

        Raises:
            ValueError: One line naming the class and the parameter.
        """
        from uqsynth.config import validate_params

        validate_params(type(self), self.get_params(deep=False))

    def fitted_state(self) -> dict[str, np.ndarray]:
        """The learned attributes (names ending in ``_``) as arrays, for saving."""
        check_is_fitted(self)
        return {
            name: np.asarray(value)
            for name, value in vars(self).items()
            if name.endswith("_") and not name.startswith("_")
        }

    def load_fitted_state(self, state: dict[str, np.ndarray]) -> Calibrator:
        """Restore attributes saved by :meth:`fitted_state`; return ``self``."""
        for name, value in state.items():
            if not name.endswith("_") or name.startswith("_"):
                raise ValueError(f"{name!r} is not a fitted attribute")
            setattr(self, name, value)
        return self


def promise(
    unit: str | None, statement: str, level: float, *, delta: float | None = None, subjects: int | None = None
) -> dict[str, object]:
    """A :meth:`Calibrator.guarantee` dict: the keys every promise has, ``alpha`` as ``1 - level`` without round-off."""
    return {"unit": unit, "statement": statement, "alpha": round(1.0 - float(level), 12),
            "delta": None if delta is None else float(delta), "calibration_subjects": subjects}


def check_inputs(
    mean: np.ndarray, std: np.ndarray, other: np.ndarray, *, other_name: str = "target"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a predictive Gaussian and the values it is compared with.

    Why: a NaN voxel (say, outside a brain mask) or a negative std would
    otherwise turn a fitted calibrator's state into NaN or its outputs into
    nonsense without a word. A std of 0 (a voxel every MC sample agrees on)
    is valid: calibrators must handle it (see the module docstring).

    Args:
        mean: Predictive means.
        std: Predictive standard deviations, all >= 0.
        other: The truth (when fitting) or the values to evaluate.
        other_name: What ``other`` is called in error messages.

    Returns:
        The three arrays as float64, broadcast to one shape.

    Raises:
        ValueError: Shapes that do not broadcast, non-finite values or a negative std.
    """
    arrays = {"mean": mean, "std": std, other_name: other}
    converted = {}
    for name, value in arrays.items():
        try:
            converted[name] = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} is not a numeric array: {error}") from None
    try:
        broadcast = np.broadcast_arrays(*converted.values())
    except ValueError:
        shapes = ", ".join(f"{name} {value.shape}" for name, value in converted.items())
        raise ValueError(f"shapes do not match: {shapes}") from None
    for name, value in zip(converted, broadcast):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values; mask those voxels out first")
    std = broadcast[1]
    if (std < 0).any():
        raise ValueError(f"std must be >= 0, but {int((std < 0).sum())} value(s) are negative")
    return broadcast[0], broadcast[1], broadcast[2]


def check_probabilities(q: float | np.ndarray, *, name: str = "q") -> np.ndarray:
    """Return ``q`` as a float64 array after checking every entry lies in (0, 1).

    Raises:
        ValueError: An entry outside the open interval (0, 1), or NaN.
    """
    q = np.asarray(q, dtype=np.float64)
    outside = ~((q > 0.0) & (q < 1.0))
    if outside.any():
        raise ValueError(f"{name} must lie in (0, 1), got {q[outside].flat[0]}")
    return q


class StreamingCalibrator(Calibrator):
    """A calibrator learned from a bounded summary that adds up over voxels.

    Subclasses say how one batch of voxels is summarized (:meth:`_summarize`,
    arrays whose size does not depend on the batch) and how the fitted
    correction follows from the summary (:meth:`_finalize`). Because
    summaries add up, fitting can stream through a data set batch by batch
    (:meth:`partial_fit`), and summaries built on different processes or
    subjects combine exactly (:meth:`merge`; or sum :meth:`summary` arrays
    with an all-reduce and :meth:`load_summary` the result).

    The summary attributes, listed in ``_summary_names``, always include
    ``n_``, the number of voxels seen.
    """

    _summary_names: tuple[str, ...] = ("n_",)

    def fit(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> StreamingCalibrator:
        """Forget any previous fit and learn from these voxels; return ``self``."""
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("_")]:
            delattr(self, name)
        return self.partial_fit(mean, std, target)

    def partial_fit(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> StreamingCalibrator:
        """Add one batch of voxels to the summary and refit the correction; return ``self``.

        Calling it on the batches of a data set gives the same calibrator as
        :meth:`fit` on all of them at once, with memory bounded by one batch.
        """
        self._validate_params()
        mean, std, target = check_inputs(mean, std, target)
        if mean.size == 0:
            raise ValueError("no voxels to fit on")
        batch = self._summarize(mean, std, target)
        batch["n_"] = np.asarray(mean.size, dtype=np.int64)
        if hasattr(self, "n_"):
            batch = _add(self.summary(), batch, self)
        return self.load_summary(batch)

    def summary(self) -> dict[str, np.ndarray]:
        """Copies of the additive summary arrays (``n_`` included)."""
        check_is_fitted(self)
        return {name: np.array(getattr(self, name), copy=True) for name in self._summary_names}

    def empty_summary(self) -> dict[str, np.ndarray]:
        """The summary of no voxels (zeros of the right shapes and dtypes): the neutral element of the sum.

        A process that saw no voxels contributes this to an all-reduce.
        """
        empty = self._summarize(np.zeros(0), np.ones(0), np.zeros(0))
        empty["n_"] = np.asarray(0, dtype=np.int64)
        return empty

    def load_summary(self, summary: dict[str, np.ndarray]) -> StreamingCalibrator:
        """Replace the summary by ``summary`` and refit the correction from it; return ``self``."""
        expected = self.empty_summary()
        if set(summary) != set(expected):
            raise ValueError(f"summary needs exactly {sorted(expected)}, got {sorted(summary)}")
        for name, value in summary.items():
            value = np.asarray(value)
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"summary {name} has shape {value.shape}, but {type(self).__name__} with "
                    f"{self.get_params()} needs {expected[name].shape}; call fit to start over"
                )
            setattr(self, name, value.astype(expected[name].dtype, copy=True))
        if int(self.n_) <= 0:
            raise ValueError("the summary holds no voxels")
        self._finalize()
        return self

    def load_fitted_state(self, state: dict[str, np.ndarray]) -> StreamingCalibrator:
        """Restore a fit saved by :meth:`fitted_state`: load its summary and refit from it; return ``self``.

        Why refit rather than trust the saved correction: the summary
        determines the fit, so a file whose summary has the wrong names or
        shapes (written by another version or with other parameters) is
        refused here rather than loaded half-stale, and the saved correction
        must name exactly the attributes this version fits.

        Raises:
            ValueError: One line: a summary array is missing or has the wrong
                shape, or the state holds an attribute this version does not fit.
        """
        names = set(self._summary_names)
        missing = sorted(names - set(state))
        if missing:
            raise ValueError(f"the state lacks the summary {', '.join(missing)} (saved by another version?)")
        for name in state:
            if not name.endswith("_") or name.startswith("_"):
                raise ValueError(f"{name!r} is not a fitted attribute")
        self.load_summary({name: state[name] for name in names})
        fitted = {name for name in vars(self) if name.endswith("_") and not name.startswith("_")}
        unknown = sorted(set(state) - fitted)
        if unknown:
            raise ValueError(f"the state holds {', '.join(unknown)}, which {type(self).__name__} does not fit "
                             "(saved by another version?)")
        return self

    def merge(self, other: StreamingCalibrator) -> StreamingCalibrator:
        """Add the summary of ``other`` (same class and parameters) into this one; return ``self``.

        The result equals a fit on the union of both calibrators' voxels.
        """
        if type(other) is not type(self) or other.get_params() != self.get_params():
            raise ValueError(f"cannot merge {other!r} into {self!r}: class and parameters must match")
        if not hasattr(self, "n_"):
            return self.load_summary(other.summary())
        return self.load_summary(_add(self.summary(), other.summary(), self))

    def _summarize(self, mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
        """The additive summary of one validated batch, without ``n_``."""
        raise NotImplementedError

    def _finalize(self) -> None:
        """Set the fitted correction from the summary attributes."""
        raise NotImplementedError


def _add(a: dict[str, np.ndarray], b: dict[str, np.ndarray], calibrator: Calibrator) -> dict[str, np.ndarray]:
    for name in a:
        if np.shape(a[name]) != np.shape(b[name]):
            raise ValueError(
                f"{type(calibrator).__name__}: summary {name} changed shape from {np.shape(a[name])} to "
                f"{np.shape(b[name])} (were the parameters changed?); call fit to start over"
            )
    return {name: a[name] + b[name] for name in a}
