"""Concrete dropout (Gal, Hron & Kendall 2017): dropout with a learned probability.

The Bernoulli mask is relaxed into a continuous "concrete" variable so the
dropout probability ``p`` gets gradients. With ``u ~ U(0, 1)`` and
temperature ``t``::

    z = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / t)      # ~1 = drop
    x <- x * (1 - z) / (1 - p)

``z > 1/2`` exactly when the logistic noise exceeds ``logit(1 - p)``, so the
hard keep rate is exactly ``1 - p`` at any temperature. The relaxed mask's
mean is only close to ``1 - p``: at t = 0.1 the sampled output averages about
0.1-0.2 % below the input (about 9 % at t = 1), so the deterministic pass
(the identity) is an approximation of the mean, as in Gal et al. Each layer adds
the paper's eq. 4.4 to the loss::

    weight_reg * ||W||^2 / (1 - p) + dropout_reg * K * (p log p + (1 - p) log(1 - p))

where ``K`` is the number of input channels (the paper) or all C*H*W input
elements (the reference notebook), chosen with ``k``, and ``W`` are weights
the host network attaches, chosen with ``weight_term``:

- ``"consuming"`` (the default): the weights that read the dropped units,
  i.e. the next layer's (only its input channels fed by this layer, when a
  skip is concatenated). This is Gal, Hron & Kendall's derivation, whose
  KL term ``l^2 (1 - p) / 2 * ||M||^2`` is on the weights of the layer whose
  inputs are dropped; with inverted dropout their reference code
  (yaringal/ConcreteDropout) computes ``weight_regularizer * sum_of_square /
  (1 - p)`` over the kernel of the wrapped layer, the one that consumes the
  dropped input.
- ``"preceding"``: the weights of the layer the dropout follows, as the
  reproduced paper's text puts it ("the layer before the dropout layer",
  under its eq. 4.4) and as uqsynth did before the option existed (set it
  to reproduce those runs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from uqsynth.errors import PluginError
from uqsynth.layers.base import StochasticLayer, mask_shape
from uqsynth.layers.designs import EVERY_DESIGN

WEIGHT_TERMS = ("consuming", "preceding")


class ConcreteDropout(StochasticLayer):
    """Dropout whose probability is learned through a concrete relaxation.

    Args:
        init_p: Initial dropout probability, in (0, 1).
        temperature: Relaxation temperature ``t``; smaller is closer to Bernoulli.
        weight_reg: Weight of the ``||W||^2 / (1 - p)`` term.
        dropout_reg: Weight of the negative-entropy term.
        k: ``"channels"`` (K = input channels, the paper) or ``"elements"``
            (K = C*H*W per sample, as in Gal's reference notebook).
        weight_term: Which weights ``W`` are: ``"consuming"`` (those reading
            the dropped units, Gal et al.'s derivation) or ``"preceding"``
            (the layer before the dropout, the paper's wording); see the
            module docstring.
        channelwise: One mask value per sample and channel (spatial dropout).
        eps: Added inside the logarithms of the relaxation for stability.
    """

    def __init__(
        self,
        *,
        init_p: float = 0.1,
        temperature: float = 0.1,
        weight_reg: float = 1e-6,
        dropout_reg: float = 1e-5,
        k: Literal["channels", "elements"] = "channels",
        weight_term: Literal["consuming", "preceding"] = "consuming",
        channelwise: bool = False,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if not 0.0 < init_p < 1.0:
            raise ValueError(f"init_p must be in (0, 1), got {init_p}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if weight_reg < 0 or dropout_reg < 0:
            raise ValueError("weight_reg and dropout_reg must be non-negative")
        if k not in ("channels", "elements"):
            raise ValueError(f'k must be "channels" or "elements", got {k!r}')
        if weight_term not in WEIGHT_TERMS:
            raise ValueError(f'weight_term must be "consuming" or "preceding", got {weight_term!r}')
        self.p_logit = nn.Parameter(torch.tensor(math.log(init_p) - math.log1p(-init_p)))
        self.temperature = float(temperature)
        self.weight_reg = float(weight_reg)
        self.dropout_reg = float(dropout_reg)
        self.k = k
        self.weight_term = weight_term
        self.channelwise = bool(channelwise)
        self.eps = float(eps)
        self._input_shape: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._input_shape = tuple(x.shape[1:])
        return super().forward(x)

    supported_designs = EVERY_DESIGN

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.p_logit).to(x.dtype)
        u = self.uniform(mask_shape(x, self.channelwise), x.device, x.dtype)
        eps = self.eps
        logits = torch.log(p + eps) - torch.log(1 - p + eps) + torch.log(u + eps) - torch.log(1 - u + eps)
        drop = torch.sigmoid(logits / self.temperature)
        return x * (1 - drop) / (1 - p)

    def dropout_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.p_logit)

    def input_dimensionality(self) -> int:
        """``K`` in the regularizer, known after the first forward pass."""
        if self._input_shape is None:
            raise RuntimeError("ConcreteDropout.regularizer() needs one forward pass first to know K")
        return self._input_shape[0] if self.k == "channels" else math.prod(self._input_shape)

    def check_attached(self) -> None:
        """Refuse a host that attached only the other kind of weights (see :meth:`regularized_weights`)."""
        self.regularized_weights()

    def regularized_weights(self) -> list[torch.Tensor]:
        """The weights ``W`` of the weight term, as chosen by ``weight_term``.

        Raises:
            PluginError: If the host network attached only the other kind
                (a generator written for the one-argument ``attach_weights``):
                the weight term would silently be zero.
        """
        chosen, other = (
            (self.consuming_weights, self.preceding_weights)
            if self.weight_term == "consuming"
            else (self.preceding_weights, self.consuming_weights)
        )
        if not chosen and other:
            missing = "the layer reading its output" if self.weight_term == "consuming" else "the layer before it"
            raise PluginError(
                f"concrete dropout with weight_term = {self.weight_term!r} regularizes the weights of {missing}, "
                "but the generator attached only the other kind; set weight_term = "
                f"{WEIGHT_TERMS[1 - WEIGHT_TERMS.index(self.weight_term)]!r} or have the generator pass "
                f"attach_weights({self.weight_term}=...)"
            )
        return chosen

    def regularizer(self) -> torch.Tensor:
        p = torch.sigmoid(self.p_logit)
        squared_norm = sum((w.pow(2).sum() for w in self.regularized_weights()), torch.zeros((), device=p.device))
        weight_term = self.weight_reg * squared_norm / (1 - p)
        negative_entropy = p * torch.log(p) + (1 - p) * torch.log(1 - p)
        dropout_term = self.dropout_reg * self.input_dimensionality() * negative_entropy
        return weight_term + dropout_term

    def extra_repr(self) -> str:
        p = torch.sigmoid(self.p_logit.detach()).item()
        return (
            f"p={p:.4f}, temperature={self.temperature}, weight_reg={self.weight_reg}, "
            f"dropout_reg={self.dropout_reg}, k={self.k!r}, weight_term={self.weight_term!r}, "
            f"channelwise={self.channelwise}"
        )
