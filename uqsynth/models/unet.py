"""The pix2pix U-Net generator (Isola et al. 2017) with slots for stochastic layers.

pix2pix builds its U-Net by recursion (each block wraps the next); here the
same layers sit in two flat lists, ``downs`` (outermost first) and ``ups``
(innermost first, i.e. in the order they run), so the forward pass is a loop
and the split at the first stochastic layer (see :class:`~uqsynth.models.base.Generator`)
is a matter of where the loop stops. With the same weights it computes
exactly what pix2pix's ``UnetGenerator`` computes, and the parameters come in
the same order.

The split at the first stochastic layer goes one step further than
"encoder once, decoder T times". A decoder step after it computes
``ConvT(ReLU(cat[skip, h]))``; the ReLU acts elementwise and the
convolution is linear in its input channels, so this equals
``ConvT_skip(ReLU(skip)) + ConvT_h(ReLU(h))`` with the weight split along
its input channels. The skip part is deterministic: while sampling,
:meth:`UnetGenerator.forward_prefix` computes it once per slice, and each of
the T draws only convolves its own half, which halves the work of every
draw (the same arithmetic up to the order of a sum: float32 results agree
to about 1e-7 relative).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from uqsynth.layers.base import StochasticLayer, WeightSlice
from uqsynth.models.base import Generator
from uqsynth.models.init import init_weights

_KERNEL, _STRIDE, _PADDING = 4, 2, 1


class UpBlock(nn.Module):
    """One decoder step: ReLU -> ConvTranspose2d -> BatchNorm, then an optional stochastic layer.

    The outermost block ends in Tanh instead of BatchNorm (images live in
    [-1, 1]) and its transposed convolution has a bias; elsewhere BatchNorm
    follows, which makes a bias redundant (pix2pix: ``use_bias=False``).

    Attributes:
        body: The deterministic layers (``relu``, ``conv``, ``norm`` or ``tanh``).
        stochastic: The stochastic layer after ``body``, or ``None``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, outermost: bool = False) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["relu"] = nn.ReLU()
        layers["conv"] = nn.ConvTranspose2d(
            in_channels, out_channels, _KERNEL, _STRIDE, _PADDING, bias=outermost
        )
        if outermost:
            layers["tanh"] = nn.Tanh()
        else:
            layers["norm"] = nn.BatchNorm2d(out_channels)
        self.body = nn.Sequential(layers)
        self.stochastic: StochasticLayer | None = None

    @property
    def conv(self) -> nn.ConvTranspose2d:
        """The block's transposed convolution (the *preceding* weight of its stochastic layer)."""
        return self.body.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return x if self.stochastic is None else self.stochastic(x)

    def skip_part(self, skip: torch.Tensor) -> torch.Tensor:
        """The skip's share of ``conv(relu(cat[skip, h]))``, with the bias: deterministic, so cached.

        The transposed convolution's weight is ``(in, out, k, k)``; the skip
        comes first in the concatenation, so it owns the first input channels.
        """
        weight = self.conv.weight[: skip.shape[1]]
        return F.conv_transpose2d(self.body.relu(skip), weight, self.conv.bias, _STRIDE, _PADDING)

    def forward_split(self, h: torch.Tensor, skip_part: torch.Tensor) -> torch.Tensor:
        """This block on ``cat[skip, h]`` given :meth:`skip_part` of the skip (batched like ``h``)."""
        weight = self.conv.weight[self.conv.in_channels - h.shape[1] :]
        x = F.conv_transpose2d(self.body.relu(h), weight, None, _STRIDE, _PADDING) + skip_part
        x = self.body[2:](x)  # BatchNorm, or Tanh for the outermost block
        return x if self.stochastic is None else self.stochastic(x)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _down_block(in_channels: int, out_channels: int, *, outermost: bool, innermost: bool) -> nn.Sequential:
    """[LeakyReLU(0.2)] -> Conv2d (k4, s2, p1) -> [BatchNorm]; the outermost is the conv alone."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if not outermost:
        layers["act"] = nn.LeakyReLU(0.2)
    layers["conv"] = nn.Conv2d(in_channels, out_channels, _KERNEL, _STRIDE, _PADDING, bias=False)
    if not (outermost or innermost):
        layers["norm"] = nn.BatchNorm2d(out_channels)
    return nn.Sequential(layers)


class UnetGenerator(Generator):
    """pix2pix's ``unet_256`` with BatchNorm and no built-in dropout, generalized in size.

    The encoder halves the image ``num_downs = log2(image_size)`` times, down
    to 1x1, with ``ngf, 2ngf, 4ngf, 8ngf, 8ngf, ...`` channels; the decoder
    mirrors it and concatenates each encoder feature map before its own
    output (skip first), as pix2pix does.

    Down blocks are LeakyReLU(0.2) -> Conv -> BatchNorm (the outermost: Conv
    only; the innermost: no BatchNorm, which would see 1x1 maps). Convolutions
    followed by BatchNorm have no bias, as in pix2pix.

    Stochastic layers go after the BatchNorm of chosen up blocks, before the
    skip concatenation. Positions count transposed convolutions from the
    bottleneck: 1 is the innermost, ``num_downs`` the outermost. The paper
    (following the pix2pix dropout slots) uses ``(2, 3, 4)``: feature maps of
    512x4x4, 512x8x8 and 512x16x16 at 256x256. Each layer is given two
    candidate weights for its regularizer: its block's transposed
    convolution (preceding) and the input channels it feeds of the next
    block's (consuming).

    Args:
        image_size: Side of the (square) training images; a power of two >= 8.
        ngf: Channels after the first convolution.
        in_channels: Channels of the source image.
        out_channels: Channels of the synthesized image.
        stochastic_layer: Zero-argument factory of a stochastic layer, called
            once per position; ``None`` for a deterministic network (then
            ``positions`` is ignored).
        positions: Where to put stochastic layers, counted from the bottleneck;
            each in ``1 .. num_downs - 1`` (the outermost block ends in Tanh).

    Raises:
        ValueError: If ``image_size`` is not a power of two >= 8, ``ngf`` is
            not positive, or ``positions`` are out of range or repeated.
        TypeError: If ``stochastic_layer`` builds something else than a
            :class:`~uqsynth.layers.base.StochasticLayer`.
    """

    def __init__(
        self,
        *,
        image_size: int = 256,
        ngf: int = 64,
        in_channels: int = 1,
        out_channels: int = 1,
        stochastic_layer: Callable[[], StochasticLayer] | None = None,
        positions: Sequence[int] = (2, 3, 4),
    ) -> None:
        super().__init__()
        if not _is_int(image_size) or image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size!r}")
        if not _is_int(ngf) or ngf < 1:
            raise ValueError(f"ngf must be a positive integer, got {ngf!r}")
        self.image_size = image_size
        self.ngf = ngf
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_downs = image_size.bit_length() - 1

        n = self.num_downs
        # Level i maps outer[i] channels to inner[i] and back; pix2pix's multipliers 1, 2, 4, 8, 8, ...
        inner = [ngf * min(2**level, 8) for level in range(n)]
        outer = [in_channels, *inner[:-1]]
        self.downs = nn.ModuleList(
            _down_block(outer[level], inner[level], outermost=level == 0, innermost=level == n - 1)
            for level in range(n)
        )
        self.ups = nn.ModuleList(
            UpBlock(
                inner[level] if level == n - 1 else 2 * inner[level],  # all but the innermost get a skip too
                out_channels if level == 0 else outer[level],
                outermost=level == 0,
            )
            for level in reversed(range(n))
        )

        self.positions = () if stochastic_layer is None else self._check_positions(positions)
        for position in self.positions:
            block = self.ups[position - 1]
            layer = stochastic_layer()
            if not isinstance(layer, StochasticLayer):
                raise TypeError(f"stochastic_layer must build a StochasticLayer, not {type(layer).__name__}")
            layer.attach_weights(preceding=[block.conv.weight], consuming=[self._consuming_weight(position)])
            block.stochastic = layer
        init_weights(self)

    def _consuming_weight(self, position: int) -> WeightSlice:
        """The weights that read the output of the stochastic layer at ``position``.

        Its output is joined as ``cat[skip, h]`` (:meth:`_join`) and read by
        the next block's transposed convolution, whose weight is ``(in, out,
        k, k)``: ``h`` comes last, so it owns the last input channels. The
        skip's channels are not regularized, since they never see the mask.
        """
        dropped = self.ups[position - 1].conv.out_channels
        conv = self.ups[position].conv
        return WeightSlice(conv.weight, dim=0, start=conv.in_channels - dropped)

    def _check_positions(self, positions: Sequence[int]) -> tuple[int, ...]:
        valid = range(1, self.num_downs)
        checked = tuple(positions)
        if (
            not all(_is_int(p) and p in valid for p in checked)
            or len(set(checked)) != len(checked)
        ):
            raise ValueError(
                f"positions must be distinct integers in 1..{self.num_downs - 1} at image_size "
                f"{self.image_size} (1 = innermost transposed convolution; {self.num_downs}, the "
                f"outermost, ends in Tanh), got {list(checked)}"
            )
        return tuple(sorted(checked))

    @property
    def _first(self) -> int | None:
        """Index in ``ups`` of the first block with a stochastic layer, or ``None``."""
        return self.positions[0] - 1 if self.positions else None

    def forward_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode, then decode up to the first stochastic layer.

        Returns:
            ``(h, *rest)``: the activation entering the first stochastic layer,
            then what the later decoder steps need of the encoder: the
            features they concatenate (outermost first), or, while drawing
            Monte Carlo samples (:meth:`caches_skip_parts`), each later step's
            transposed convolution of its skip (:meth:`UpBlock.skip_part`, in
            the order the steps run). Without stochastic layers, ``(output,)``.
        """
        skips = []
        h = x
        for level, down in enumerate(self.downs):
            if level > 0:  # the image itself is not concatenated, as in pix2pix
                skips.append(h)
            h = down(h)
        if self._first is None:
            return (self._decode(h, skips, range(self.num_downs)),)
        h = self._decode(h, skips, range(self._first))
        h = self.ups[self._first].body(h)
        if not self.caches_skip_parts():
            return (h, *skips)
        # Step k concatenates the skip that the join after step k - 1 pops (innermost first).
        return (h, *(self.ups[k].skip_part(skips.pop()) for k in range(self._first + 1, self.num_downs)))

    def forward_suffix(self, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the first stochastic layer and the rest of the decoder on a prefix cache."""
        if self._first is None:
            return cache[0]
        h, *rest = cache
        h = self.ups[self._first].stochastic(h)
        if not self.caches_skip_parts():
            return self._decode(self._join(self._first, h, rest), rest, range(self._first + 1, self.num_downs))
        for k, part in zip(range(self._first + 1, self.num_downs), rest):
            h = self.ups[k].forward_split(h, part)
        return h

    def caches_skip_parts(self) -> bool:
        """Whether the prefix caches the skips' share of the later decoder steps (see the module docstring).

        Only while drawing samples without gradients, where the suffix runs T
        times per prefix. Training and deterministic passes keep pix2pix's
        single convolution of the concatenation, and its exact rounding.
        """
        return (
            self._first is not None
            and not torch.is_grad_enabled()
            and self.ups[self._first].stochastic.sampling
        )

    def _decode(self, h: torch.Tensor, skips: list[torch.Tensor], steps: range) -> torch.Tensor:
        """Run the decoder steps ``steps``; each pops the innermost remaining skip from ``skips``."""
        for k in steps:
            h = self._join(k, self.ups[k](h), skips)
        return h

    def _join(self, k: int, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the matching encoder features (first, as pix2pix) unless step ``k`` is the last.

        pix2pix's LeakyReLU works in place on the tensor it also concatenates,
        so its skips are activated; every concatenation feeds the next block's
        ReLU, which absorbs a LeakyReLU, so the function is the same.
        """
        if k == self.num_downs - 1:
            return h
        return torch.cat([skips.pop(), h], dim=1)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, ngf={self.ngf}, positions={self.positions}"
