"""Example uqsynth plugin: Gaussian dropout and a Gaussian shift-and-scale calibrator."""

from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale
from uqsynth_gaussian_dropout.layer import GaussianDropout

__all__ = ["GaussianDropout", "GaussianShiftScale"]
