"""Stochastic layers: the interface, the sampling switch and the built-in layers."""

from uqsynth.layers.base import (
    StochasticLayer,
    WeightSlice,
    mask_shape,
    sample_design,
    sampling,
    set_sampling,
    stochastic_layers,
    total_regularizer,
)
from uqsynth.layers.concrete_dropout import ConcreteDropout
from uqsynth.layers.designs import DESIGNS, SampleDesign
from uqsynth.layers.mc_dropout import MCDropout

__all__ = [
    "DESIGNS",
    "ConcreteDropout",
    "MCDropout",
    "SampleDesign",
    "StochasticLayer",
    "WeightSlice",
    "mask_shape",
    "sample_design",
    "sampling",
    "set_sampling",
    "stochastic_layers",
    "total_regularizer",
]
