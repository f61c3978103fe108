"""Contract checks a plugin author runs against their own plugins (needs pytest)."""

from uqsynth.testing.layer_contract import LAYER_CHECKS, check_stochastic_layer, parametrize_with_checks

__all__ = ["LAYER_CHECKS", "check_stochastic_layer", "parametrize_with_checks"]
