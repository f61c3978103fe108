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

import torch
from torch import nn


class StochasticLayer(nn.Module):
    """Base class for layers that sample a random perturbation of their input.

    Subclasses implement :meth:`sample` (the random forward pass). With
    sampling off, :meth:`forward` returns :meth:`deterministic`, which for
    inverted dropout is the identity (the expectation of the sampled output;
    only approximately so for relaxed masks such as concrete dropout's).

    A layer may depend on the weights of the layer it follows (concrete
    dropout regularizes them); the host network tells it which through
    :meth:`attach_weights`. Layers learn nothing about their input's shape
    until the first forward pass, so their regularizer is only defined after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sampling = False
        # A plain list keeps the attached parameters out of this module's
        # state_dict and parameters(): they belong to the preceding layer.
        self._attached: list[nn.Parameter] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample(x) if self.sampling else self.deterministic(x)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """Return one random draw of the layer's output for input ``x``."""
        raise NotImplementedError

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """Return the output with sampling off (by default the input itself)."""
        return x

    def regularizer(self) -> torch.Tensor:
        """Return this layer's KL / regularization term (a scalar tensor).

        Added to the training loss (times the run's ``lambda_kl``). Layers
        without a learned distribution return zero.
        """
        return torch.zeros((), device=self._device())

    def dropout_probability(self) -> torch.Tensor | None:
        """Return the learned dropout probability, or ``None`` when it is fixed."""
        return None

    def attach_weights(self, weights: Iterable[nn.Parameter]) -> None:
        """Tell the layer which weights precede it (``M`` in the paper's eq. 4.4)."""
        self._attached = list(weights)

    @property
    def attached_weights(self) -> list[nn.Parameter]:
        """The weights of the layer this one follows, as set by :meth:`attach_weights`."""
        return self._attached

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self._attached:
            return tensor.device
        return torch.device("cpu")


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
    layers = list(stochastic_layers(model))
    previous = [layer.sampling for layer in layers]
    for layer in layers:
        layer.sampling = enabled
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.sampling = state


def total_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum of the regularizers of all stochastic layers in ``model``."""
    terms = [layer.regularizer() for layer in stochastic_layers(model)]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    # Summing (not stacking) lets a parameter-free layer's CPU zero join GPU terms.
    return sum(terms[1:], terms[0])
