"""Built-in adversarial losses: vanilla (the paper's), least squares and hinge."""

from uqsynth.hookspecs import hookimpl
from uqsynth.losses import HingeLoss, LSGANLoss, VanillaGANLoss


@hookimpl
def uqsynth_register_adversarial_losses(register):
    register("vanilla", VanillaGANLoss)
    register("lsgan", LSGANLoss)
    register("hinge", HingeLoss)
