"""Built-in calibrators: isotonic (the paper's), sigma scaling, split conformal, and subject-level risk control (CRC, RCPS)."""

from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.isotonic import IsotonicCalibrator
from uqsynth.calibration.risk import ConformalRiskControl, RiskControl
from uqsynth.calibration.sigma_scaling import SigmaScaling
from uqsynth.hookspecs import hookimpl


@hookimpl
def uqsynth_register_calibrators(register):
    register("isotonic", IsotonicCalibrator)
    register("sigma_scaling", SigmaScaling)
    register("conformal", ConformalCalibrator)
    register("conformal_risk", ConformalRiskControl)
    register("risk_control", RiskControl)
