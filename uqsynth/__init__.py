"""uqsynth: calibrated uncertainty for image synthesis, with pluggable parts.

Plugins implement the hooks in :mod:`uqsynth.hookspecs` and mark them with
:data:`hookimpl`; stochastic layers sample only inside :func:`sampling`.
A trained arm is :func:`load`-ed to predict (:mod:`uqsynth.inference`).
"""

__version__ = "0.4.0"

from uqsynth.hookspecs import hookimpl
from uqsynth.layers.base import StochasticLayer, sampling
from uqsynth.plugins import create, list_plugins


def load(model_dir, *, device=None):
    """A trained arm ``RUN/<arm>``, ready to predict (:class:`uqsynth.inference.Synthesizer`).

    Imported on first call: :mod:`uqsynth.inference` imports the plugin host, which imports this package.
    """
    from uqsynth.inference import load as _load

    return _load(model_dir, device=device)


__all__ = ["StochasticLayer", "__version__", "create", "hookimpl", "list_plugins", "load", "sampling"]
