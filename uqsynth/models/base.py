"""Interfaces of the network plugins: generators (backbones) and discriminators.

A generator is split at its first stochastic layer. Everything before it is
deterministic, so the Monte Carlo sampling engine runs that prefix once per
slice and repeats only the stochastic remainder T times; with the paper's
layers at the 2nd-4th transposed convolutions from the bottleneck this skips
the whole encoder for every draw but the first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from uqsynth.layers.base import StochasticLayer, stochastic_layers


class Generator(nn.Module, ABC):
    """Interface of generator (backbone) plugins: source image -> target image.

    Subclasses implement :meth:`forward_prefix` and :meth:`forward_suffix`;
    :meth:`forward` is their composition, so a single pass and the engine's
    split passes compute the same function.

    Attributes:
        in_channels: Channels of the source image.
        out_channels: Channels of the synthesized image.
    """

    in_channels: int
    out_channels: int

    @abstractmethod
    def forward_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the deterministic part, up to (not including) the first stochastic layer.

        Args:
            x: Source images, ``(N, in_channels, H, W)``.

        Returns:
            A cache for :meth:`forward_suffix`. Every tensor in it has the batch
            as dim 0, so the engine can ``repeat_interleave`` it T times.
        """

    @abstractmethod
    def forward_suffix(self, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the rest of the network, from the first stochastic layer on.

        Args:
            cache: What :meth:`forward_prefix` returned (possibly repeated along dim 0).

        Returns:
            Synthesized images, ``(N, out_channels, H, W)``.
        """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_suffix(self.forward_prefix(x))

    def stochastic_layers(self) -> list[StochasticLayer]:
        """The generator's stochastic layers, in module order."""
        return list(stochastic_layers(self))


class Discriminator(nn.Module, ABC):
    """Interface of discriminator plugins for conditional adversarial training.

    The discriminator sees the source with the (real or synthesized) target,
    as in a conditional GAN (Isola et al. 2017), and returns raw logits (a
    patch map for PatchGAN); the adversarial loss applies the sigmoid or
    whatever else it needs.
    """

    @abstractmethod
    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return logits for ``target`` being real given ``source``; no sigmoid."""
