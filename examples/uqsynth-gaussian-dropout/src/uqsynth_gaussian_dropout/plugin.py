"""The plugin module named in this distribution's ``uqsynth`` entry point."""

import uqsynth
from uqsynth_gaussian_dropout.calibrator import GaussianShiftScale
from uqsynth_gaussian_dropout.layer import GaussianDropout


@uqsynth.hookimpl
def uqsynth_register_stochastic_layers(register):
    register("gaussian_dropout", GaussianDropout)


@uqsynth.hookimpl
def uqsynth_register_calibrators(register):
    register("gaussian_shift_scale", GaussianShiftScale)
