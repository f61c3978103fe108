"""The stochastic-layer interface and the explicit switch that makes it sample.

A stochastic layer is random only while *sampling* is switched on, and that
switch is separate from ``model.train()`` / ``model.eval()``. This matters for
Monte Carlo dropout at test time: the posterior samples must come from the
dropout masks alone while BatchNorm keeps using its running statistics. timm's
and torch's own dropout fire in train mode, which would also put BatchNorm in
batch-statistics mode, so they cannot be used for MC sampling.

Typical use::

    model.eval()                      # BatchNorm uses running statistics
    with uqsynth.sampling(model):     # only the stochastic layers sample
        draws = [model(x) for _ in range(20)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from uqsynth.errors import PluginError
from uqsynth.layers.designs import SampleDesign


class StochasticLayer(nn.Module):
    """Base class for layers that sample a random perturbation of their input.

    Subclasses implement :meth:`sample` (the random forward pass). With
    sampling off, :meth:`forward` returns :meth:`deterministic`, which for
    inverted dropout is the identity (the expectation of the sampled output;
    only approximately so for relaxed masks such as concrete dropout's).

    A layer may depend on the weights around it (concrete dropout
    regularizes some); the host network tells it, through
    :meth:`attach_weights`, both candidates: the *preceding* weights (the
    layer whose output it perturbs) and the *consuming* weights (the part of
    the next layer that reads its output). Layers that need neither ignore
    them. Layers learn nothing about their input's shape until the first
    forward pass, so their regularizer is only defined after it.

    A layer whose noise is a function of uniforms draws them with
    :meth:`uniform` and lists the designs it supports in
    :attr:`supported_designs`; the sampling engine can then arrange a
    slice's samples (antithetic pairs, stratified: :mod:`uqsynth.layers.designs`).
    """

    #: Sample designs (:data:`uqsynth.layers.designs.DESIGNS`) the layer honours; none by default.
    supported_designs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.sampling = False
        self.design: SampleDesign | None = None  # set by :func:`sample_design`, for one pass at a time
        # Plain lists keep the attached parameters out of this module's
        # state_dict and parameters(): they belong to the neighbouring layers.
        self._preceding: list[WeightSlice] = []
        self._consuming: list[WeightSlice] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample(x) if self.sampling else self.deterministic(x)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """Return one random draw of the layer's output for input ``x``."""
        raise NotImplementedError

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """Return the output with sampling off (by default the input itself)."""
        return x

    def uniform(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``U(0, 1)`` noise of ``shape`` for :meth:`sample`, arranged by the current design if one is set.

        Without a design this is exactly ``torch.rand(shape, device=device, dtype=dtype)``.
        """
        if self.design is None:
            return torch.rand(shape, device=device, dtype=dtype)
        return self.design.uniform(shape, device, dtype)

    def regularizer(self) -> torch.Tensor:
        """Return this layer's KL / regularization term (a scalar tensor).

        Added to the training loss (times the run's ``lambda_kl``). Layers
        without a learned distribution return zero.
        """
        return torch.zeros((), device=self._device())

    def dropout_probability(self) -> torch.Tensor | None:
        """Return the learned dropout probability, or ``None`` when it is fixed."""
        return None

    def check_attached(self) -> None:
        """Raise if the weights the host attached are not what this layer needs; the default needs none.

        Called once the host network is built, so a mismatch is refused
        before training rather than at the first regularizer.
        """

    def attach_weights(
        self,
        preceding: Iterable[nn.Parameter | WeightSlice] = (),
        consuming: Iterable[nn.Parameter | WeightSlice] = (),
    ) -> None:
        """Tell the layer the weights on either side of it; called by the host network.

        Both are given, so a layer (or its configuration) chooses which its
        regularizer uses. ``preceding`` comes first so that hosts written for
        the one-argument form, ``attach_weights([conv.weight])``, keep meaning
        what they meant.

        Args:
            preceding: Weights of the layer whose output this layer perturbs.
            consuming: Weights that read this layer's output: a whole
                parameter, or a :class:`WeightSlice` of the next layer's
                weight when that layer also reads other inputs (a skip).
        """
        self._preceding = [WeightSlice.of(w) for w in preceding]
        self._consuming = [WeightSlice.of(w) for w in consuming]

    @property
    def preceding_weights(self) -> list[torch.Tensor]:
        """The weights of the layer this one follows, as set by :meth:`attach_weights`."""
        return [w.tensor() for w in self._preceding]

    @property
    def consuming_weights(self) -> list[torch.Tensor]:
        """The weights that read this layer's output, sliced now (views of the live parameters)."""
        return [w.tensor() for w in self._consuming]

    @property
    def attached_weights(self) -> list[torch.Tensor]:
        """Alias of :attr:`preceding_weights`, the only kind before both were attached."""
        return self.preceding_weights

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for attached in (*self._preceding, *self._consuming):
            return attached.weight.device
        return torch.device("cpu")


@dataclass(frozen=True, eq=False)
class WeightSlice:
    """A parameter, or the part of it between ``start`` and ``stop`` along ``dim``, read when needed.

    The slice is taken each time :meth:`tensor` is called, never stored: a
    view taken at build time would keep reading the old storage once
    ``.to()``, ``.double()`` or ``.cuda()`` swap the parameter's data, and a
    copy would not pass gradients back. The parameter object itself is
    held, as the optimizer holds it (``load_state_dict`` copies into it), and
    ``copy.deepcopy`` (the weight average) points the copy at its own.

    Attributes:
        weight: The parameter.
        dim: The dimension sliced (the input channels: 0 for a
            ``ConvTranspose2d`` weight, 1 for a ``Conv2d`` one).
        start: First index of the slice.
        stop: One past the last index; ``None`` for the end.
    """

    weight: nn.Parameter
    dim: int = 0
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.dim < self.weight.dim():
            raise ValueError(f"dim {self.dim} is not a dimension of a weight of shape {tuple(self.weight.shape)}")
        size = self.weight.shape[self.dim]
        stop = size if self.stop is None else self.stop
        if not 0 <= self.start < stop <= size:
            raise ValueError(
                f"slice {self.start}:{self.stop} is empty or outside dimension {self.dim} "
                f"(size {size}) of a weight of shape {tuple(self.weight.shape)}"
            )

    @classmethod
    def of(cls, weight: nn.Parameter | WeightSlice) -> WeightSlice:
        """``weight`` itself if it is a slice already, else all of it."""
        return weight if isinstance(weight, WeightSlice) else cls(weight)

    def tensor(self) -> torch.Tensor:
        """The slice of the parameter as it is now: a view (or, whole, the parameter), so gradients reach it."""
        size = self.weight.shape[self.dim]
        stop = size if self.stop is None else self.stop
        if self.start == 0 and stop == size:
            return self.weight
        return self.weight.narrow(self.dim, self.start, stop - self.start)


def mask_shape(x: torch.Tensor, channelwise: bool) -> tuple[int, ...]:
    """Shape of a dropout mask for ``x``: per element, or one value per sample and channel."""
    if channelwise:
        return (*x.shape[:2], *([1] * (x.dim() - 2)))
    return tuple(x.shape)


def stochastic_layers(model: nn.Module) -> Iterator[StochasticLayer]:
    """Yield every :class:`StochasticLayer` inside ``model`` in module order."""
    for module in model.modules():
        if isinstance(module, StochasticLayer):
            yield module


def set_sampling(model: nn.Module, enabled: bool) -> None:
    """Switch sampling on or off for every stochastic layer in ``model``."""
    for layer in stochastic_layers(model):
        layer.sampling = enabled


@contextlib.contextmanager
def sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager: stochastic layers of ``model`` sample inside the block.

    The previous state of each layer is restored on exit, so nesting works and
    an exception cannot leave a model sampling by accident. BatchNorm and
    every other module keep whatever train/eval mode they are in.
    """
    with _layers_set(list(stochastic_layers(model)), "sampling", enabled):
        yield model


@contextlib.contextmanager
def sample_design(model: nn.Module, design: SampleDesign | None) -> Iterator[nn.Module]:
    """Context manager: every stochastic layer of ``model`` draws its noise by ``design`` inside the block.

    ``None`` (or the ``"independent"`` design) leaves the layers as they are.

    Raises:
        PluginError: A layer does not support the design (it draws its noise
            some other way than :meth:`StochasticLayer.uniform`).
    """
    if design is None or design.kind == "independent":
        yield model
        return
    layers = list(stochastic_layers(model))
    for layer in layers:
        if design.kind not in layer.supported_designs:
            raise PluginError(
                f"stochastic layer {type(layer).__name__} does not support the {design.kind!r} sample design "
                f"(it supports: {', '.join(sorted(layer.supported_designs)) or 'none'}); "
                'use sampling.variance_reduction = "none"'
            )
    with _layers_set(layers, "design", design):
        yield model


@contextlib.contextmanager
def _layers_set(layers: list[StochasticLayer], name: str, value: object) -> Iterator[None]:
    """Set attribute ``name`` of every layer to ``value`` inside the block; each layer's own value comes back after."""
    previous = [getattr(layer, name) for layer in layers]
    for layer in layers:
        setattr(layer, name, value)
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            setattr(layer, name, state)


def total_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum of the regularizers of all stochastic layers in ``model``."""
    terms = [layer.regularizer() for layer in stochastic_layers(model)]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    # Summing (not stacking) lets a parameter-free layer's CPU zero join GPU terms.
    return sum(terms[1:], terms[0])
