"""Contract checks a plugin author runs against their own plugins (needs pytest)."""

from uqsynth.testing.calibrator_contract import CALIBRATOR_CHECKS, check_calibrator
from uqsynth.testing.calibrator_contract import QUALITY_CHECKS as CALIBRATOR_QUALITY_CHECKS
from uqsynth.testing.calibrator_contract import parametrize_with_checks as parametrize_calibrator_checks
from uqsynth.testing.layer_contract import LAYER_CHECKS, check_stochastic_layer
from uqsynth.testing.layer_contract import parametrize_with_checks as parametrize_layer_checks
from uqsynth.testing.likelihood_contract import LIKELIHOOD_CHECKS, check_likelihood
from uqsynth.testing.likelihood_contract import parametrize_with_checks as parametrize_likelihood_checks

__all__ = [
    "CALIBRATOR_CHECKS",
    "CALIBRATOR_QUALITY_CHECKS",
    "LAYER_CHECKS",
    "LIKELIHOOD_CHECKS",
    "check_calibrator",
    "check_likelihood",
    "check_stochastic_layer",
    "parametrize_calibrator_checks",
    "parametrize_layer_checks",
    "parametrize_likelihood_checks",
]
