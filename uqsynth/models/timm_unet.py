"""A U-Net generator on any timm encoder, with slots for stochastic layers in the decoder.

The encoder is ``timm.create_model(encoder, features_only=True, in_chans=...)``:
a multi-scale feature extractor whose ``feature_info`` says how many channels
each feature map has and by how much it is downsampled. The decoder is sized
from those two lists alone, so every family (ResNet, EfficientNet, ConvNeXt,
MobileNet, ...) gets the same decoder without per-family numbers.

The encoder is deterministic (stochastic layers live in the decoder only), so
:meth:`TimmUnetGenerator.forward_prefix` runs the whole encoder and the
decoder up to the first stochastic layer once per slice, and the sampling
engine repeats only the rest (see :class:`~uqsynth.models.base.Generator`).

Weights are never downloaded: the encoder starts from timm's random init, or
from a local checkpoint given as ``pretrained_path``.

timm is imported on first use, so listing plugins does not pay for it.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from uqsynth.errors import first_line
from uqsynth.layers.base import StochasticLayer, WeightSlice
from uqsynth.models.base import Generator
from uqsynth.models.init import init_weights

_KERNEL, _STRIDE, _PADDING = 4, 2, 1  # pix2pix's transposed convolution: exactly doubles the size
_MIN_HEAD_CHANNELS = 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


class DecoderStep(nn.Module):
    """One decoder step: upsample x2, then an optional stochastic layer, then fuse the skip.

    ``up`` is ConvTranspose2d (k4, s2, p1, as pix2pix) -> BatchNorm -> ReLU;
    the stochastic layer (if any) follows it; ``fuse`` concatenates the
    encoder feature of the new resolution (skip first, as pix2pix) and mixes
    it with Conv3x3 -> BatchNorm -> ReLU. The layer's regularizer may use the
    transposed convolution's weight (preceding) or the input channels of
    ``fuse.conv`` that read its output (consuming). Steps below the
    encoder's shallowest feature have no skip and fuse their own output
    only. Convolutions followed by BatchNorm have no bias.

    The upsampling is a transposed convolution rather than bilinear
    interpolation followed by a convolution: it is pix2pix's, and with
    ``weight_term = "preceding"`` the stochastic layer after it regularizes
    a weight that does the upsampling, as in the paper's U-Net.

    Attributes:
        up: The upsampling layers (``conv``, ``norm``, ``relu``).
        stochastic: The stochastic layer after ``up``, or ``None``.
        fuse: The layers after the skip concatenation (``conv``, ``norm``, ``relu``).
        skip_channels: Channels of the concatenated encoder feature (0: none).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.up = nn.Sequential(OrderedDict(
            conv=nn.ConvTranspose2d(in_channels, out_channels, _KERNEL, _STRIDE, _PADDING, bias=False),
            norm=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        ))
        self.stochastic: StochasticLayer | None = None
        self.fuse = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(out_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            norm=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        ))

    @property
    def conv(self) -> nn.ConvTranspose2d:
        """The step's transposed convolution (the *preceding* weight of its stochastic layer)."""
        return self.up.conv

    def consuming_weight(self) -> WeightSlice:
        """The weights that read the stochastic layer's output: ``fuse.conv``'s last input channels.

        :meth:`join` concatenates ``cat[skip, h]``, so ``h`` owns the input
        channels after the skip's (dim 1 of a ``Conv2d`` weight); without a
        skip, all of them.
        """
        return WeightSlice(self.fuse.conv.weight, dim=1, start=self.skip_channels)

    def join(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The rest of the step after ``up``: stochastic layer, skip (popped from ``skips``), fuse."""
        if self.stochastic is not None:
            h = self.stochastic(h)
        if self.skip_channels:
            h = torch.cat([skips.pop(), h], dim=1)
        return self.fuse(h)

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.join(self.up(h), skips)

    def extra_repr(self) -> str:
        return f"skip_channels={self.skip_channels}"


class TimmUnetGenerator(Generator):
    """A U-Net whose encoder is a timm model and whose decoder carries stochastic layers.

    Encoder: ``timm.create_model(encoder, features_only=True, in_chans=in_channels,
    out_indices=out_indices)`` with timm's own initialization; its feature
    maps have ``channels`` channels at ``reductions`` (e.g. 2, 4, 8, 16, 32).

    Decoder: from the deepest feature, one :class:`DecoderStep` per factor of
    two until the input size, ``log2(max(reductions))`` steps in all. A step
    that lands on a feature's reduction concatenates that feature; the steps
    below the shallowest feature (reduction 2 for ResNets, 4 for ConvNeXt)
    have none. A 3x3 convolution to ``out_channels`` and Tanh end the network.
    Step ``k``'s width is ``decoder_channels[k - 1]``; by default the channels
    of the feature it concatenates, or, without one, half the previous step's
    width (at least 16). Only the decoder gets the pix2pix initialization.

    Stochastic layers go after a step's upsampling (its BatchNorm and ReLU),
    before the skip; dropout masks are non-negative, so for dropout this is
    the same as right after the BatchNorm, where ``unet`` puts it. Positions count decoder steps from the bottleneck, the
    convention of the ``unet`` generator: 1 is the deepest step and
    ``log2(max(reductions))`` the last, full-resolution one (5 for encoders
    with reduction 32); every step may take one, since a separate convolution
    produces the output. The default ``(2, 3, 4)`` is the paper's choice of
    steps; with a reduction-32 encoder at 256x256 they run at 32x32, 64x64 and
    128x128 (the pix2pix U-Net's at 4x4 to 16x16, since it goes down to 1x1).

    Args:
        encoder: A timm model name that supports ``features_only``, e.g.
            ``"resnet34"``, ``"efficientnet_b0"``, ``"convnext_atto"``.
        image_size: Side of the (square) training images; a multiple of the
            encoder's largest reduction.
        in_channels: Channels of the source image (timm's ``in_chans``).
        out_channels: Channels of the synthesized image.
        decoder_channels: Width of each decoder step from the bottleneck, one
            per step; ``None`` for the default above.
        out_indices: Which encoder features to use (timm's ``out_indices``);
            ``None`` for timm's default (all).
        pretrained: Start the encoder from pretrained weights; these come only
            from ``pretrained_path``, as uqsynth never downloads weights.
        pretrained_path: A local timm checkpoint of ``encoder`` (the
            ``state_dict`` of ``timm.create_model(encoder)``, classifier and all,
            or of its features-only model), as ``.safetensors`` (torch/pickle
            files are refused: they can run code). A first convolution trained on
            RGB is adapted to ``in_channels`` as timm does (summed over the
            colour channels for one channel). Giving it implies ``pretrained``.
        stochastic_layer: Zero-argument factory of a stochastic layer, called
            once per position; ``None`` for a deterministic network (then
            ``positions`` is ignored).
        positions: Decoder steps that get a stochastic layer, counted from the bottleneck.

    Raises:
        ValueError: If ``encoder`` is not a timm model (close matches are
            listed) or cannot be a multi-scale encoder, ``image_size`` is not a
            positive multiple of its largest reduction, ``decoder_channels`` or
            ``positions`` are invalid, ``pretrained`` is asked without
            ``pretrained_path``, or the checkpoint does not fit the encoder.
        TypeError: If ``stochastic_layer`` builds something else than a
            :class:`~uqsynth.layers.base.StochasticLayer`.
    """

    def __init__(
        self,
        *,
        encoder: str = "resnet34",
        image_size: int = 256,
        in_channels: int = 1,
        out_channels: int = 1,
        decoder_channels: tuple[int, ...] | None = None,  # tuple, not Sequence: the TOML checker converts arrays
        out_indices: tuple[int, ...] | None = None,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        stochastic_layer: Callable[[], StochasticLayer] | None = None,
        positions: Sequence[int] = (2, 3, 4),
    ) -> None:
        super().__init__()
        if pretrained and pretrained_path is None:
            raise ValueError(
                f"pretrained = true for encoder {encoder!r} needs pretrained_path: uqsynth never downloads "
                "weights at run time; download a timm checkpoint of the encoder yourself and set "
                "pretrained_path to the local .safetensors file"
            )
        self.encoder_name = encoder
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pretrained_path = pretrained_path
        self.encoder = create_encoder(encoder, in_channels=in_channels, out_indices=out_indices)
        self.channels = tuple(self.encoder.feature_info.channels())
        self.reductions = tuple(self.encoder.feature_info.reduction())
        self._check_reductions()
        if not _is_int(image_size) or image_size < 1 or image_size % self.reductions[-1]:
            raise ValueError(
                f"image_size must be a positive multiple of {self.reductions[-1]} (the largest reduction of "
                f"encoder {encoder!r}), got {image_size!r}"
            )
        # Some families (Swin) return NHWC features; the decoder works in NCHW.
        output_fmt = getattr(self.encoder, "output_fmt", "NCHW")
        self._channels_last_features = getattr(output_fmt, "value", output_fmt) == "NHWC"

        self.num_steps = self.reductions[-1].bit_length() - 1
        # Reduction each step lands on, and the channels of the feature it concatenates (0: none).
        landing = [self.reductions[-1] >> k for k in range(1, self.num_steps + 1)]
        skip_of = dict(zip(self.reductions[:-1], self.channels[:-1]))
        skip_channels = [skip_of.get(r, 0) for r in landing]
        self.decoder_channels = self._check_decoder_channels(decoder_channels, skip_channels)
        widths = [self.channels[-1], *self.decoder_channels]
        self.steps = nn.ModuleList(
            DecoderStep(widths[k], widths[k + 1], skip_channels[k]) for k in range(self.num_steps)
        )
        self.head = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(widths[-1], out_channels, 3, padding=1),
            tanh=nn.Tanh(),
        ))

        self.positions = () if stochastic_layer is None else self._check_positions(positions)
        for position in self.positions:
            step = self.steps[position - 1]
            layer = stochastic_layer()
            if not isinstance(layer, StochasticLayer):
                raise TypeError(f"stochastic_layer must build a StochasticLayer, not {type(layer).__name__}")
            layer.attach_weights(preceding=[step.conv.weight], consuming=[step.consuming_weight()])
            step.stochastic = layer
        init_weights(self.steps)
        init_weights(self.head)
        if pretrained_path is not None:
            load_encoder_checkpoint(self.encoder, pretrained_path, encoder_name=encoder, in_channels=in_channels)

    # ------------------------------------------------------------------ checks

    def _check_reductions(self) -> None:
        r = self.reductions
        if not all(_is_power_of_two(x) for x in r) or any(a >= b for a, b in zip(r, r[1:])) or r[-1] < 2:
            raise ValueError(
                f"encoder {self.encoder_name!r} gives features at reductions {list(r)}; timm_unet needs "
                "strictly increasing powers of two (choose others with out_indices, or another encoder)"
            )

    def _check_decoder_channels(self, decoder_channels: Sequence[int] | None, skips: list[int]) -> tuple[int, ...]:
        if decoder_channels is None:
            widths = []
            for skip in skips:
                widths.append(skip or max(widths[-1] // 2 if widths else self.channels[-1] // 2, _MIN_HEAD_CHANNELS))
            return tuple(widths)
        checked = tuple(decoder_channels)
        if len(checked) != self.num_steps or not all(_is_int(c) and c >= 1 for c in checked):
            raise ValueError(
                f"decoder_channels must be {self.num_steps} positive integers for encoder "
                f"{self.encoder_name!r} (one per decoder step, from the bottleneck), got {list(checked)}"
            )
        return checked

    def _check_positions(self, positions: Sequence[int]) -> tuple[int, ...]:
        valid = range(1, self.num_steps + 1)
        checked = tuple(positions)
        if not all(_is_int(p) and p in valid for p in checked) or len(set(checked)) != len(checked):
            raise ValueError(
                f"positions must be distinct integers in 1..{self.num_steps} for encoder {self.encoder_name!r} "
                f"(decoder steps from the bottleneck: 1 = the deepest, {self.num_steps} = full resolution), "
                f"got {list(checked)}"
            )
        return tuple(sorted(checked))

    # ------------------------------------------------------------------ forward

    @property
    def _first(self) -> int | None:
        """Index in ``steps`` of the first step with a stochastic layer, or ``None``."""
        return self.positions[0] - 1 if self.positions else None

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The deepest feature and the skips, deepest last (the order :meth:`DecoderStep.join` pops them)."""
        multiple = self.reductions[-1]
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"timm_unet with encoder {self.encoder_name!r} needs slices whose sides are multiples of "
                f"{multiple}, got {tuple(x.shape[-2:])}"
            )
        features = self.encoder(x)
        if self._channels_last_features:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features[-1], list(features[:-1])

    def forward_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode, then decode up to the first stochastic layer.

        Returns:
            ``(h, *skips)``: the activation entering the first stochastic layer
            and the encoder features the remaining steps concatenate
            (shallowest first). Without stochastic layers, ``(output,)``.
        """
        h, skips = self._encode(x)
        if self._first is None:
            return (self.head(self._decode(h, skips, range(self.num_steps))),)
        h = self._decode(h, skips, range(self._first))
        return (self.steps[self._first].up(h), *skips)

    def forward_suffix(self, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the first stochastic layer and the rest of the decoder on a prefix cache."""
        if self._first is None:
            return cache[0]
        h, *skips = cache
        h = self.steps[self._first].join(h, skips)
        return self.head(self._decode(h, skips, range(self._first + 1, self.num_steps)))

    def _decode(self, h: torch.Tensor, skips: list[torch.Tensor], steps: range) -> torch.Tensor:
        """Run decoder steps ``steps``; each that has a skip pops the deepest remaining one from ``skips``."""
        for k in steps:
            h = self.steps[k](h, skips)
        return h

    def extra_repr(self) -> str:
        return (
            f"encoder={self.encoder_name!r}, channels={list(self.channels)}, reductions={list(self.reductions)}, "
            f"decoder_channels={list(self.decoder_channels)}, positions={self.positions}"
        )


# ---------------------------------------------------------------------- encoder


def create_encoder(name: str, *, in_channels: int = 1, out_indices: Sequence[int] | None = None) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` with randomly initialized weights.

    Args:
        name: A timm model name (an optional ``.tag`` is accepted and changes nothing here).
        in_channels: timm's ``in_chans``.
        out_indices: timm's ``out_indices``; ``None`` for the model's default.

    Raises:
        ValueError: If timm has no such model (listing close matches) or cannot
            build it as a features-only model with these arguments.
    """
    import timm

    architecture = name.split(".", 1)[0] if isinstance(name, str) else ""
    if not isinstance(name, str) or ":" in name or not timm.is_model(architecture):
        matches = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        raise ValueError(
            f"unknown timm encoder {name!r}{hint} (python -c \"import timm; print(timm.list_models())\" lists all)"
        )
    kwargs = {} if out_indices is None else {"out_indices": tuple(out_indices)}
    try:
        return timm.create_model(name, features_only=True, in_chans=in_channels, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError, KeyError) as exc:
        raise ValueError(
            f"timm cannot build encoder {name!r} with features_only=True, in_chans={in_channels}"
            f"{', out_indices=' + str(list(out_indices)) if out_indices is not None else ''}: {first_line(exc)}"
        ) from None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors checkpoint (``module.`` prefixes of DataParallel undone).

    Torch/pickle files (``.pth``, ``.pt``, ``.bin``) are refused, since
    unpickling can run code; the message says how to convert one you trust.

    Raises:
        ValueError: If the file does not exist, holds pickles, or is not safetensors.
    """
    from safetensors.torch import load_file

    from uqsynth.model_files import holds_pickle, nonfinite_tensor

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained_path {str(path)!r} is not a file")
    if holds_pickle(path):
        raise ValueError(
            f"pretrained_path {str(path)!r} holds pickled Python objects (a torch.save file), which can run code "
            "when loaded; uqsynth reads only safetensors. If you trust the file, convert it once: load it with "
            "torch.load(path, weights_only=True), take the state_dict (under 'state_dict' or 'model' in training "
            "checkpoints) and save it with safetensors.torch.save_file (timm's hub weights come as .safetensors too)"
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own kinds for a bad header
        raise ValueError(
            f"pretrained_path {str(path)!r}: cannot read it as a safetensors checkpoint: {first_line(exc)}"
        ) from None
    problem = nonfinite_tensor(state)
    if problem is not None:
        raise ValueError(f"pretrained_path {str(path)!r} is unusable: its {problem}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _normalized(key: str) -> str:
    # timm's feature wrappers flatten "stem.0" into a module named "stem_0"; others keep names.
    return key.replace(".", "_")


def load_encoder_checkpoint(
    encoder: nn.Module, path: str | Path, *, encoder_name: str, in_channels: int
) -> None:
    """Load a timm checkpoint of the full model (or of the features-only model) into ``encoder``.

    Every tensor of the encoder must come from the checkpoint (batch-norm
    step counters excepted); extra tensors, such as the classifier, are
    ignored. The first convolution is adapted from the checkpoint's input
    channels to ``in_channels`` with ``timm.models.adapt_input_conv``
    (summing over RGB for one channel), as ``timm.create_model(...,
    pretrained=True, in_chans=1)`` would.

    Raises:
        ValueError: If the checkpoint cannot be read or does not fit the encoder.
    """
    from timm.models import adapt_input_conv

    source = read_checkpoint(path)
    by_name = {_normalized(k): k for k in source}
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    first_convs = cfg.get("first_conv") or ()
    first_convs = {_normalized(f"{c}.weight") for c in ((first_convs,) if isinstance(first_convs, str) else first_convs)}
    base_channels = (cfg.get("input_size") or (3,))[0]

    target = encoder.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for key, tensor in target.items():
        name = _normalized(key)
        found = by_name.get(name)
        if found is None and name.startswith("model_"):  # FeatureGetterNet wraps the model as .model
            found = by_name.get(name[len("model_"):])
        if found is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = source[found]
        if value.shape != tensor.shape and name in first_convs and value.dim() == 4:
            # base_chans is the image's channels (3 for RGB), which space-to-depth stems multiply.
            base = base_channels if value.shape[1] % base_channels == 0 else value.shape[1]
            try:
                value = adapt_input_conv(in_channels, value, base_chans=base)
            except (NotImplementedError, ValueError, AssertionError):
                pass  # reported as a shape mismatch below
        if value.shape != tensor.shape:
            mismatched.append(f"{found} has shape {tuple(value.shape)}, the encoder's {key} {tuple(tensor.shape)}")
            continue
        loaded[key] = value.to(tensor.dtype)
    if missing:  # reported first: it says "another model" more plainly than a shape does
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(
            f"pretrained_path {str(path)!r} does not fit encoder {encoder_name!r}: {len(missing)} of its "
            f"{len(target)} tensors are not in the checkpoint ({shown}); is it a checkpoint of another model?"
        )
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(f"pretrained_path {str(path)!r} does not fit encoder {encoder_name!r}: {mismatched[0]}{more}")
    encoder.load_state_dict(loaded, strict=False)
