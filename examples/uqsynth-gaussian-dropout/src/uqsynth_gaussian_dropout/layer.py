"""Gaussian dropout: multiplicative N(1, p/(1-p)) noise (Srivastava et al. 2014)."""

from __future__ import annotations

import math
from typing import Annotated

import torch

import uqsynth
from uqsynth.config import Interval
from uqsynth.layers import mask_shape


class GaussianDropout(uqsynth.StochasticLayer):
    """Multiply activations by Gaussian noise of mean 1 and variance ``p / (1 - p)``.

    This variance matches Bernoulli dropout with inverted scaling at the same
    ``p``, so the two are interchangeable in a configuration; the noise is
    continuous, which gives smoother posterior samples.

    Args:
        p: Equivalent dropout probability, in [0, 1).
        channelwise: One noise value per sample and channel instead of per element.
    """

    def __init__(
        self, *, p: Annotated[float, Interval(0.0, 1.0, closed="left")] = 0.5, channelwise: bool = False
    ) -> None:
        super().__init__()
        # The hint's range is checked when a configuration loads, naming the key; this, for code building one.
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = float(p)
        self.channelwise = bool(channelwise)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(mask_shape(x, self.channelwise), device=x.device, dtype=x.dtype)
        return x * (1.0 + math.sqrt(self.p / (1.0 - self.p)) * noise)

    def extra_repr(self) -> str:
        return f"p={self.p}, channelwise={self.channelwise}"
