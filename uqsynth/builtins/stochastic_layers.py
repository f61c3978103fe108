"""Built-in stochastic layers: MC dropout and concrete dropout."""

from uqsynth.hookspecs import hookimpl
from uqsynth.layers.concrete_dropout import ConcreteDropout
from uqsynth.layers.mc_dropout import MCDropout


@hookimpl
def uqsynth_register_stochastic_layers(register):
    register("mc_dropout", MCDropout)
    register("concrete_dropout", ConcreteDropout)
