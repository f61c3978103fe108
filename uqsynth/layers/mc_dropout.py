"""Monte Carlo dropout (Gal & Ghahramani 2016): Bernoulli dropout kept on at test time."""

from __future__ import annotations

import torch

from uqsynth.layers.base import StochasticLayer, mask_shape
from uqsynth.layers.designs import EVERY_DESIGN


class MCDropout(StochasticLayer):
    """Bernoulli dropout with a fixed probability ``p`` and inverted scaling.

    While sampling, each element (or each channel with ``channelwise=True``,
    i.e. spatial dropout) is zeroed with probability ``p`` and the survivors
    are scaled by ``1 / (1 - p)``, so the expected output equals the input and
    the deterministic pass is the identity. There is no regularizer: the
    paper's MC-dropout arm trains without a KL term.

    Args:
        p: Dropout probability, in [0, 1).
        channelwise: Drop whole feature maps instead of single elements.
    """

    def __init__(self, *, p: float = 0.5, channelwise: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = float(p)
        self.channelwise = bool(channelwise)

    supported_designs = EVERY_DESIGN

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - self.p
        shape = mask_shape(x, self.channelwise)
        if self.design is None:  # torch's Bernoulli kernel: the masks of every run so far
            mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
        else:  # kept where a designed uniform falls below 1 - p: the same Bernoulli(1 - p) per sample
            mask = (self.uniform(shape, x.device, torch.float32) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, channelwise={self.channelwise}"
