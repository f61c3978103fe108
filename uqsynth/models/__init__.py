"""Network interfaces (generator, discriminator) and the built-in networks."""

from uqsynth.models.base import Discriminator, Generator

__all__ = ["Discriminator", "Generator"]
