"""A reusable contract for stochastic layers, in the spirit of scikit-learn's checks.

Every stochastic layer, built in or from a plugin, must behave the same way
for Monte Carlo sampling to be trustworthy: deterministic unless sampling is
switched on explicitly, random (and reproducible under a seed) when it is,
independent of ``model.train()`` / ``model.eval()``, unbiased like inverted
dropout, and usable in a training loss. A plugin author tests a new layer in
one line::

    from uqsynth.testing import check_stochastic_layer

    def test_my_layer():
        check_stochastic_layer(lambda: MyDropout(p=0.2))

or gets one pytest item per check (so a failure names the check)::

    from uqsynth.testing import parametrize_layer_checks as parametrize_with_checks

    @parametrize_with_checks([functools.partial(MyDropout, p=0.2)])
    def test_my_layer(factory, check):
        check(factory)

Each check takes a *factory* (a zero-argument callable returning a fresh
layer) rather than a layer, so no check can see state left by another.
Checks seed their own random draws inside a forked RNG, so they are
deterministic and leave the caller's random state alone.

The contract is written for inverted-dropout-like layers: the deterministic
pass is the identity and the sampled output is unbiased. Relaxed layers such
as concrete dropout are only approximately unbiased (about 0.2 % at the
default temperature 0.1, far below what :func:`check_unbiased` can resolve;
around 9 % at temperature 1, which it does flag).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

from uqsynth.testing._contract import parametrize, run_checks
from uqsynth.config import declaration_problems
from uqsynth.layers import StochasticLayer, WeightSlice, sampling, set_sampling

LayerFactory = Callable[[], StochasticLayer]
LayerCheck = Callable[[LayerFactory], None]

#: Input used by most checks: big enough that even channelwise dropout
#: (4 * 8 = 32 independent channel masks) makes two draws identical with
#: negligible probability, small enough to keep the contract fast.
INPUT_SHAPE = (4, 8, 8, 8)

#: Draws and tolerance (in standard errors) of :func:`check_unbiased`.
UNBIASED_DRAWS = 2000
UNBIASED_STANDARD_ERRORS = 5.0


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's RNG afterwards.

    Why: checks must be reproducible whatever ran before them, and must not
    change the random stream of the test that calls them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _input(shape: Sequence[int] = INPUT_SHAPE, dtype: torch.dtype = torch.float32, seed: int = 1234) -> torch.Tensor:
    """A fixed test input whose entries are bounded away from zero.

    Why: with zeros in the input, a dropped and a kept element look alike, so
    "the output differs" or "the output is the input" would prove less.
    """
    generator = torch.Generator().manual_seed(seed)
    magnitude = 0.5 + torch.rand(tuple(shape), generator=generator, dtype=dtype)
    sign = torch.where(torch.rand(tuple(shape), generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return magnitude * sign


def _name(factory: LayerFactory) -> str:
    """A readable name for a factory, from the layer it builds (``MCDropout(p=0.5, ...)``)."""
    layer = factory()
    return f"{type(layer).__name__}({layer.extra_repr()})"


def _differ(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two consecutive forward passes on ``x`` give different outputs."""
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


def _returns_input(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two consecutive forward passes both return exactly ``x``."""
    with torch.no_grad():
        first, second = model(x), model(x)
    return torch.equal(first, x) and torch.equal(second, x)


def check_is_stochastic_layer(factory: LayerFactory) -> None:
    """The factory builds a :class:`StochasticLayer` that starts with sampling off.

    Why: ``uqsynth.sampling(model)`` finds layers by this base class; a layer
    that is not one is never switched on, and one that starts sampling would
    make plain inference random.
    """
    layer = factory()
    assert isinstance(layer, StochasticLayer), f"{type(layer).__name__} is not a StochasticLayer"
    assert layer.sampling is False, "a new layer must start with sampling off"


def check_deterministic_without_sampling(factory: LayerFactory) -> None:
    """With sampling off the layer returns its input, identically on every call, in both modes.

    Why: a model used without ``sampling()`` must give one repeatable
    prediction (the expectation of inverted dropout), whether in eval mode
    (inference) or train mode (a deterministic training step).
    """
    layer = factory()
    x = _input()
    with _seeded(0):
        for mode in (False, True):
            layer.train(mode)
            assert _returns_input(layer, x), f"with sampling off (training={mode}) the output must be the input"


def check_random_while_sampling(factory: LayerFactory) -> None:
    """With sampling on, two forward passes on the same input differ.

    Why: Monte Carlo sampling averages many passes; identical passes would
    report zero uncertainty.
    """
    layer = factory()
    set_sampling(layer, True)
    with _seeded(0):
        assert _differ(layer, _input()), "with sampling on, two forward passes must differ"


def check_seeded_reproducibility(factory: LayerFactory) -> None:
    """The same ``torch.manual_seed`` gives the same sampled output.

    Why: users reproduce a run's uncertainty maps by seeding torch; a layer
    drawing from another random source (numpy, ``random``, os entropy) breaks that.
    """
    layer = factory()
    set_sampling(layer, True)
    x = _input()
    outputs = []
    for _ in range(2):
        with _seeded(7), torch.no_grad():
            outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1]), "the same torch seed must give the same sample"
    with _seeded(8), torch.no_grad():
        other = layer(x)
    assert not torch.equal(outputs[0], other), "a different torch seed must give a different sample"


class _Boom(Exception):
    """Raised inside ``sampling()`` to check that it still restores the state."""


def check_sampling_context_manager(factory: LayerFactory) -> None:
    """``sampling(model)`` switches sampling on inside the block and restores the previous state.

    Why: the switch must reach layers nested in a model, and no exit path
    (including an exception in the middle of MC inference) may leave a
    model sampling, which would silently randomise later predictions.
    Nesting and ``enabled=False`` must restore the outer state too.
    """
    layer = factory()
    model = nn.Sequential(nn.Identity(), nn.Sequential(layer))
    x = _input()
    with _seeded(0):
        assert _returns_input(model, x), "sampling must be off before the block"
        with sampling(model) as yielded:
            assert yielded is model, "sampling(model) must yield the model"
            assert _differ(model, x), "inside sampling(model) the layer must sample"
        assert _returns_input(model, x), "sampling must be off again after the block"

        try:
            with sampling(model):
                raise _Boom
        except _Boom:
            pass
        assert _returns_input(model, x), "an exception inside sampling(model) must not leave it sampling"

        set_sampling(model, True)
        with sampling(model, enabled=False):
            assert _returns_input(model, x), "sampling(model, enabled=False) must switch sampling off"
            with sampling(model):
                assert _differ(model, x), "a nested sampling(model) must switch it back on"
            assert _returns_input(model, x), "leaving the inner block must restore the outer (off) state"
        assert _differ(model, x), "the state before the block (on) must be restored"


def check_sampling_independent_of_train_mode(factory: LayerFactory) -> None:
    """Sampling follows the explicit switch only, never ``model.train()`` / ``model.eval()``.

    Why: MC inference runs in eval mode (so BatchNorm uses running
    statistics) with the stochastic layers on; torch's own dropout ties both
    to ``train()``, which is exactly what this toolkit must avoid.
    """
    layer = factory()
    x = _input()
    with _seeded(0):
        layer.eval()
        with sampling(layer):
            assert _differ(layer, x), "in eval mode with sampling on, the layer must sample"
            assert layer.training is False, "sampling() must not change the train/eval mode"
        layer.train()
        assert _returns_input(layer, x), "in train mode with sampling off, the layer must be deterministic"
        with sampling(layer):
            assert layer.training is True, "sampling() must not change the train/eval mode"


def check_shape_and_dtype(factory: LayerFactory) -> None:
    """The output has the input's shape and dtype, sampling or not.

    Why: the layer sits inside a network between a BatchNorm and a skip
    concatenation; a broadcast shape or an upcast dtype would break or slow
    the rest of the network.
    """
    layer = factory()
    for shape in ((1, 3, 5, 7), INPUT_SHAPE):
        for dtype in (torch.float32, torch.float64):
            x = _input(shape, dtype)
            for enabled in (False, True):
                with _seeded(0), sampling(layer, enabled), torch.no_grad():
                    out = layer(x)
                assert out.shape == x.shape, f"shape {tuple(out.shape)} != input {tuple(x.shape)} (sampling={enabled})"
                assert out.dtype == x.dtype, f"dtype {out.dtype} != input {x.dtype} (sampling={enabled})"


def check_unbiased(factory: LayerFactory) -> None:
    """The mean of many sampled outputs equals the input (inverted dropout is unbiased).

    Why: the MC prediction is the mean of the samples, and the deterministic
    pass returns the input; if the sampled mean drifted (a forgotten
    ``1 / (1 - p)`` rescaling, say) the MC prediction would be biased
    against the deterministic one.

    The tolerance is :data:`UNBIASED_STANDARD_ERRORS` standard errors of the
    mean, estimated per element from the :data:`UNBIASED_DRAWS` draws, so it
    shrinks as the number of draws grows instead of being a guessed constant.
    """
    layer = factory()
    x = _input((2, 4, 4, 4), torch.float64)
    total = torch.zeros_like(x)
    total_sq = torch.zeros_like(x)
    with _seeded(0), sampling(layer), torch.no_grad():
        for _ in range(UNBIASED_DRAWS):
            out = layer(x)
            total += out
            total_sq += out * out
    mean = total / UNBIASED_DRAWS
    variance = (total_sq / UNBIASED_DRAWS - mean * mean).clamp_min(0) * UNBIASED_DRAWS / (UNBIASED_DRAWS - 1)
    standard_error = variance.sqrt() / math.sqrt(UNBIASED_DRAWS)
    tolerance = UNBIASED_STANDARD_ERRORS * standard_error + 1e-9 * x.abs()
    error = (mean - x).abs()
    worst = int(torch.argmax(error / tolerance))
    assert bool((error <= tolerance).all()), (
        f"mean of {UNBIASED_DRAWS} samples differs from the input by more than "
        f"{UNBIASED_STANDARD_ERRORS:g} standard errors: input {x.flatten()[worst].item():.4f}, "
        f"mean {mean.flatten()[worst].item():.4f}, standard error {standard_error.flatten()[worst].item():.2e}"
    )


def check_regularizer_is_finite_scalar(factory: LayerFactory) -> None:
    """After one forward pass, ``regularizer()`` is a finite floating scalar tensor.

    Why: the training loop adds ``lambda_kl * total_regularizer(model)`` to
    the loss; a non-scalar would broadcast the loss and a NaN would poison
    every weight.
    """
    for enabled in (False, True):
        layer = factory()
        with _seeded(0), sampling(layer, enabled):
            layer(_input())
        value = layer.regularizer()
        assert isinstance(value, torch.Tensor), f"regularizer() returned {type(value).__name__}, not a tensor"
        assert value.dim() == 0, f"regularizer() must be a scalar, got shape {tuple(value.shape)}"
        assert value.is_floating_point(), f"regularizer() must be floating point, got {value.dtype}"
        assert bool(torch.isfinite(value)), f"regularizer() must be finite, got {value.item()}"


def check_accepts_attached_weights(factory: LayerFactory) -> None:
    """The layer takes the weights a host network attaches, and its regularizer stays a finite scalar.

    Why: every generator calls ``attach_weights(preceding=[...],
    consuming=[...])`` on the layers it builds, the consuming one a slice of
    the next layer's weight; a layer that overrode it with another signature
    would break every generator, and one whose regularizer failed on the
    attached weights would break training.
    """
    channels = INPUT_SHAPE[1]
    preceding = nn.Parameter(torch.full((2 * channels, channels, 4, 4), 0.5))
    consuming = WeightSlice(nn.Parameter(torch.full((2 * channels, 3, 4, 4), 0.5)), dim=0, start=channels)
    layer = factory()
    layer.attach_weights(preceding=[preceding], consuming=[consuming])
    with _seeded(0):
        layer(_input())
    value = layer.regularizer()
    assert isinstance(value, torch.Tensor) and value.dim() == 0, "regularizer() must be a scalar tensor"
    assert bool(torch.isfinite(value)), f"with attached weights, regularizer() must be finite, got {value.item()}"


def check_declared_constraints(factory: LayerFactory) -> None:
    """The constraints declared on the layer's parameters (``Annotated[float, Interval(...)]``) are sound.

    Why: a configuration is checked against them when it loads
    (:mod:`uqsynth.config`); a default outside its own range, or a rule
    naming a parameter the layer does not take, would make that check lie.
    A layer that declares nothing passes.
    """
    problems = declaration_problems(type(factory()))
    assert not problems, "; ".join(problems)


def check_gradient_reaches_input(factory: LayerFactory) -> None:
    """While sampling, the loss gradient flows back through the layer to its input.

    Why: the generator trains with the stochastic layers sampling; a layer
    that detached its output (or sampled under ``no_grad``) would freeze
    everything before it.
    """
    layer = factory()
    x = _input().requires_grad_(True)
    with _seeded(0), sampling(layer):
        out = layer(x)
    weights = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    assert x.grad is not None, "no gradient reached the input"
    assert bool(torch.isfinite(x.grad).all()), "the input gradient must be finite"
    assert bool((x.grad != 0).any()), "the input gradient is zero everywhere"


#: Every check of the contract, in the order :func:`check_stochastic_layer` runs them.
LAYER_CHECKS: tuple[LayerCheck, ...] = (
    check_is_stochastic_layer,
    check_deterministic_without_sampling,
    check_random_while_sampling,
    check_seeded_reproducibility,
    check_sampling_context_manager,
    check_sampling_independent_of_train_mode,
    check_shape_and_dtype,
    check_unbiased,
    check_regularizer_is_finite_scalar,
    check_accepts_attached_weights,
    check_gradient_reaches_input,
    check_declared_constraints,
)


def check_stochastic_layer(factory: LayerFactory) -> None:
    """Run every check of :data:`LAYER_CHECKS` on the layers built by ``factory``.

    Args:
        factory: Zero-argument callable returning a fresh layer, e.g.
            ``lambda: MCDropout(p=0.5)`` or ``functools.partial(MCDropout, p=0.5)``.

    Raises:
        AssertionError: At the first failed check, naming the check and the layer.
    """
    run_checks(LAYER_CHECKS, factory, _name(factory))


def parametrize_with_checks(factories: Sequence[LayerFactory]) -> pytest.MarkDecorator:
    """A pytest parametrization over every (factory, check) pair, one test item each.

    The decorated test takes the arguments ``factory`` and ``check`` and calls
    ``check(factory)``. Item ids read like ``MCDropout(p=0.5, ...)-check_unbiased``,
    so a failing item names both the layer configuration and the broken rule.

    Args:
        factories: Zero-argument callables each returning a fresh layer.

    Returns:
        A ``pytest.mark.parametrize`` decorator.
    """
    return parametrize(LAYER_CHECKS, factories, _name)
