"""uqsynth: calibrated uncertainty for image synthesis, with pluggable parts.

Plugins implement the hooks in :mod:`uqsynth.hookspecs` and mark them with
:data:`hookimpl`; stochastic layers sample only inside :func:`sampling`.
"""

__version__ = "0.4.0"

from uqsynth.hookspecs import hookimpl
from uqsynth.layers.base import StochasticLayer, sampling
from uqsynth.plugins import create, list_plugins

__all__ = ["StochasticLayer", "__version__", "create", "hookimpl", "list_plugins", "sampling"]
