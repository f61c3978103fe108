"""The 70x70 PatchGAN discriminator of pix2pix (Isola et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from uqsynth.models.base import Discriminator
from uqsynth.models.init import init_weights

_KERNEL, _PADDING = 4, 1


class PatchGANDiscriminator(Discriminator):
    """pix2pix's ``NLayerDiscriminator`` with BatchNorm: a map of real/fake logits per patch.

    Each output logit sees one ``receptive_field`` x ``receptive_field``
    patch (70x70 with ``n_layers=3``), so the adversarial loss penalizes
    structure at the scale of patches and leaves low frequencies to the L1
    term, as Isola et al. (2017) argue. Layers: Conv(s2) -> LeakyReLU(0.2),
    then ``n_layers - 1`` x [Conv(s2) -> BatchNorm -> LeakyReLU], one
    Conv(s1) -> BatchNorm -> LeakyReLU and a final Conv(s1) to one channel;
    channels double from ``ndf`` up to ``8 * ndf``. No sigmoid: losses take logits.

    Args:
        in_channels: Channels of source and target together (T1w + T2w = 2).
        ndf: Channels after the first convolution.
        n_layers: Number of stride-2 convolutions.

    Raises:
        ValueError: If ``ndf`` or ``n_layers`` is not a positive integer.
    """

    def __init__(self, *, in_channels: int = 2, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        for name, value in (("ndf", ndf), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_channels = in_channels
        self.ndf = ndf
        self.n_layers = n_layers

        width = [ndf * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width[0], _KERNEL, 2, _PADDING), nn.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [
                # BatchNorm follows, so a bias would be redundant (pix2pix: use_bias=False).
                nn.Conv2d(width[i - 1], width[i], _KERNEL, stride, _PADDING, bias=False),
                nn.BatchNorm2d(width[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(width[-1], 1, _KERNEL, 1, _PADDING))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input patch that one output logit sees."""
        field = 1
        for layer in reversed(self.model):
            if isinstance(layer, nn.Conv2d):
                field = (field - 1) * layer.stride[0] + layer.kernel_size[0]
        return field

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return patch logits for ``target`` being the real image for ``source``.

        The discriminator is conditional: it judges the (source, target) pair,
        concatenated on channels, not the target alone.
        """
        return self.model(torch.cat([source, target], dim=1))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, ndf={self.ndf}, n_layers={self.n_layers}, "
            f"receptive_field={self.receptive_field}"
        )
