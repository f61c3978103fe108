"""Post-hoc calibration of per-voxel predictive distributions."""

from uqsynth.calibration.base import Calibrator

__all__ = ["Calibrator"]
