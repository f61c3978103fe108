"""Hook specifications: the whole contract between uqsynth and its plugins.

Every plugin kind has one registration hook. The host calls it with a
``register`` callback, so uqsynth (not the plugin) owns names, duplicates,
type checks and error messages. Built-in implementations register through
these same hooks, exactly like third-party packages.

A plugin module implements any subset of them::

    import uqsynth

    @uqsynth.hookimpl
    def uqsynth_register_stochastic_layers(register):
        register("gaussian_dropout", GaussianDropout)

and is announced in its distribution's ``pyproject.toml``::

    [project.entry-points.uqsynth]
    gaussian_dropout = "my_package.plugin"

``register(name, factory)`` takes the public name (what a TOML file uses)
and a factory: a class deriving from the kind's interface, or a callable
returning an instance of it. The factory's keyword parameters are what the
TOML table may set; they are validated against its signature and type hints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "uqsynth"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def uqsynth_register_stochastic_layers(register: Register) -> None:
    """Register stochastic layers (e.g. MC dropout, concrete dropout).

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.layers.StochasticLayer`, which samples only inside
        :func:`uqsynth.sampling`.
    """


@hookspec
def uqsynth_register_generators(register: Register) -> None:
    """Register generators (backbones) that map a source image to a target image.

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.models.Generator` and accepts the keyword arguments
        ``image_size``, ``stochastic_layer`` (a zero-argument layer factory)
        and ``positions``, which the engine supplies.
    """


@hookspec
def uqsynth_register_discriminators(register: Register) -> None:
    """Register discriminators for adversarial training.

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.models.Discriminator` (``forward(source, target)``
        returns logits).
    """


@hookspec
def uqsynth_register_adversarial_losses(register: Register) -> None:
    """Register adversarial losses (e.g. vanilla, LSGAN, hinge).

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.losses.AdversarialLoss`.
    """


@hookspec
def uqsynth_register_calibrators(register: Register) -> None:
    """Register post-hoc calibrators of predictive distributions.

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.calibration.Calibrator` (a scikit-learn style
        estimator: keyword-only parameters, ``fit`` returns ``self``).
    """


@hookspec
def uqsynth_register_datasets(register: Register) -> None:
    """Register datasets of paired source/target volumes.

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.data.Dataset`.
    """


@hookspec
def uqsynth_register_likelihoods(register: Register) -> None:
    """Register likelihoods: per-voxel observation models of the generator's output.

    Called once when the plugin manager starts.

    :param register: ``register(name, factory)``; the factory builds a
        :class:`uqsynth.likelihoods.Likelihood`, which says how many output
        channels the generator needs, the training loss term, and each
        voxel's predictive mean and (aleatoric) variance.
    """
