"""The calibrator interface: scikit-learn estimators over predictive distributions.

A calibrator sees, per voxel, the model's predictive mean and standard
deviation (the Gaussian of the paper's MC sampling) and, when fitting, the
truth. It learns a correction and then answers three questions about the
corrected distribution: its CDF at given values, its quantiles, and central
intervals at a level.

As in scikit-learn: ``__init__`` only stores keyword-only parameters (so
``get_params`` round-trips a TOML table), ``fit`` validates, learns and
returns ``self``, learned state lives in attributes ending in ``_``, and using
an unfitted calibrator raises :class:`sklearn.exceptions.NotFittedError`.
Learned state is plain arrays (:meth:`Calibrator.fitted_state`), so it is
saved without pickling code.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted


class Calibrator(BaseEstimator):
    """Interface of calibrator plugins.

    Arrays may have any (matching, or broadcastable) shape; outputs have the
    broadcast shape. ``std`` must be positive.
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
        return self.quantile(mean, std, tail), self.quantile(mean, std, 1.0 - tail)

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
