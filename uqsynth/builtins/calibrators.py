"""Built-in calibrators: isotonic (the paper's), sigma scaling and split conformal."""

from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.hookspecs import hookimpl


@hookimpl
def uqsynth_register_calibrators(register):
    register("isotonic", IsotonicCalibrator)
    register("sigma_scaling", SigmaScaling)
    register("conformal", ConformalCalibrator)
