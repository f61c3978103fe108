"""The U-Net generator on timm encoders: every tested family, stochastic slots, exact prefix caching, weights."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from uqsynth.cli import main
from uqsynth.config import config_from_dict
from uqsynth.layers import ConcreteDropout, MCDropout, sampling
from uqsynth.layers.base import stochastic_layers
from uqsynth.models.base import Generator
from uqsynth.models.timm_unet import TimmUnetGenerator
from uqsynth.plugins import get_host
from uqsynth.posterior import PosteriorSampler, SamplerOptions
from uqsynth.training import build_arm

#: Small encoders of four families; each has largest reduction 32, so 5 decoder steps.
ENCODERS = ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]
PLUGIN_FILE = Path(__file__).resolve().parent.parent / "plugins" / "bcgan_t1t2_timm.toml"


def build(encoder: str = "resnet18", *, image_size: int = 32, layer=lambda: MCDropout(p=0.5), **kwargs):
    torch.manual_seed(0)
    return TimmUnetGenerator(encoder=encoder, image_size=image_size, stochastic_layer=layer, **kwargs)


def slices(n: int = 2, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype) * 3


# --- every family


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_forward_backward_shapes_and_range(encoder, size):
    model = build(encoder, image_size=size)
    assert isinstance(model, Generator) and model.num_steps == 5
    with sampling(model):
        out = model(slices(size=size))
    assert out.shape == (2, 1, size, size)
    assert out.abs().max() < 1.0  # Tanh: images live in (-1, 1)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.steps.parameters())
    assert model.encoder.get_parameter(next(n for n, _ in model.encoder.named_parameters())).grad.abs().sum() > 0


@pytest.mark.parametrize("encoder", ENCODERS)
def test_stochastic_layers_sit_in_the_decoder_at_the_configured_positions(encoder):
    model = build(encoder, positions=(4, 1))
    assert model.positions == (1, 4)
    assert not list(stochastic_layers(model.encoder))
    layers = model.stochastic_layers()
    assert layers == [model.steps[0].stochastic, model.steps[3].stochastic]
    for position, layer in zip((1, 4), layers):
        assert layer.preceding_weights == [model.steps[position - 1].conv.weight]
        assert isinstance(model.steps[position - 1].conv, nn.ConvTranspose2d)
    seen = []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model(slices())
    # 32x32 -> bottleneck 1x1; decoder step k outputs decoder_channels[k-1] maps of 2^k x 2^k.
    assert seen == [(2, model.decoder_channels[0], 2, 2), (2, model.decoder_channels[3], 16, 16)]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_draws_differ_while_sampling_and_eval_is_deterministic_otherwise(encoder):
    model = build(encoder).eval()
    x = slices()
    with torch.no_grad():
        with sampling(model):
            first, second = model(x), model(x)
        assert not torch.equal(first, second)
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_has_no_randomness_of_its_own(encoder):
    """timm's dropout and DropPath would fire in train mode; the encoder must have none."""
    model = build(encoder).train()
    x = slices()
    with torch.no_grad():
        a, b = model.encoder(x), model.encoder(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.encoder.modules())


@pytest.mark.parametrize("layer", [lambda: MCDropout(p=0.5), lambda: ConcreteDropout(init_p=0.3)], ids=["mc", "concrete"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_cached_prefix_equals_the_full_network_with_the_same_masks(encoder, layer):
    generator, x, T = build(encoder, layer=layer).double(), slices(dtype=torch.float64), 3
    options = SamplerOptions(samples=T, seed=5, keep_samples=True, memory_budget_mb=1e4, accumulator="float64")
    cached = PosteriorSampler(generator, options).sample(x)
    # Reference: T full forward passes, drawn as one batch of x repeated T times.
    generator.eval()
    with torch.random.fork_rng(), torch.no_grad(), sampling(generator):
        torch.manual_seed(5)
        full = generator(x.repeat_interleave(T, dim=0)).reshape(2, T, 1, 32, 32)
    assert torch.allclose(cached.samples.double(), full, rtol=0, atol=1e-10)
    assert cached.samples.std(dim=1).mean() > 0


# --- what concrete dropout regularizes


def _reader_of(model: TimmUnetGenerator, layer) -> tuple[nn.Conv2d, slice]:
    """The first Conv2d that runs after ``layer``, and which of its input channels are ``layer``'s output."""
    order, seen = [], {}

    def record(module, args, out):
        order.append(module)
        seen[module] = (args[0], out)

    hooks = [m.register_forward_hook(record) for m in model.steps.modules() if type(m) is nn.Conv2d or m is layer]
    with torch.no_grad():
        model(slices())
    for hook in hooks:
        hook.remove()
    after = next(m for m in order[order.index(layer):] if type(m) is nn.Conv2d)
    dropped, read = seen[layer][1], seen[after][0]
    channels = dropped.shape[1]
    [start] = [s for s in range(read.shape[1] - channels + 1) if torch.equal(read[:, s:s + channels], dropped)]
    return after, slice(start, start + channels)


@pytest.mark.parametrize("weight_term", [None, "consuming", "preceding"], ids=["default", "consuming", "preceding"])
def test_concrete_dropout_regularizer_is_eq_4_4_on_the_chosen_weights(weight_term):
    weight_reg, dropout_reg = 1e-2, 1e-3
    options = {} if weight_term is None else {"weight_term": weight_term}
    # Position 5 is the full-resolution step, which has no skip: its reader is all of fuse.conv.
    model = build(layer=lambda: ConcreteDropout(init_p=0.3, weight_reg=weight_reg, dropout_reg=dropout_reg, **options),
                  positions=(2, 5))
    for position, layer in zip((2, 5), model.stochastic_layers()):
        after, channels = _reader_of(model, layer)
        preceding, consuming = model.steps[position - 1].conv.weight, after.weight
        weight = preceding if weight_term == "preceding" else consuming[:, channels]  # Conv2d: inputs on dim 1
        p, k = layer.dropout_probability().item(), channels.stop - channels.start
        negative_entropy = p * math.log(p) + (1 - p) * math.log(1 - p)
        expected = weight_reg * weight.pow(2).sum().item() / (1 - p) + dropout_reg * k * negative_entropy
        assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)
        model.zero_grad(set_to_none=True)
        layer.regularizer().backward()
        if weight_term == "preceding":
            assert bool(preceding.grad.ne(0).all()) and consuming.grad is None
        else:
            assert bool(consuming.grad[:, channels].ne(0).all()) and preceding.grad is None
            assert bool(consuming.grad[:, : channels.start].eq(0).all())  # the skip's weights


# --- the prefix/suffix split


@pytest.mark.parametrize("positions", [(), (1,), (2, 3, 4), (5,), (1, 2, 3, 4, 5)])
def test_forward_equals_suffix_of_prefix_while_sampling(positions):
    model = build(positions=positions).eval()
    x = slices()
    with sampling(model):
        torch.manual_seed(1)
        whole = model(x)
        torch.manual_seed(1)
        cache = model.forward_prefix(x)
        split = model.forward_suffix(cache)
    assert torch.equal(whole, split)
    assert all(t.shape[0] == 2 for t in cache)
    if not positions:
        assert len(cache) == 1 and model.forward_suffix(cache) is cache[0]


def test_prefix_stops_before_the_first_stochastic_layer():
    model = build(positions=(3, 5)).eval()
    calls = []
    for layer in model.stochastic_layers():
        layer.register_forward_hook(lambda module, args, out: calls.append(module))
    h, *skips = model.forward_prefix(slices())
    assert not calls
    # Step 3 of a resnet18 decoder at 32x32 lands on reduction 4; the reduction-4 and -2 skips remain.
    assert h.shape == (2, model.decoder_channels[2], 8, 8)
    assert [s.shape[-1] for s in skips] == [16, 8]


def test_the_encoder_reductions_set_the_decoder():
    model = build("convnext_atto")  # features at reductions 4..32: two steps without a skip
    assert model.reductions == (4, 8, 16, 32) and model.channels == (40, 80, 160, 320)
    assert [step.skip_channels for step in model.steps] == [160, 80, 40, 0, 0]
    assert model.decoder_channels == (160, 80, 40, 20, 16)
    narrow = build("resnet18", decoder_channels=(32, 16, 16, 8, 8), out_indices=(1, 2, 3, 4))
    assert narrow.reductions == (4, 8, 16, 32)
    assert narrow(slices()).shape == (2, 1, 32, 32)
    text = repr(narrow)
    assert "encoder='resnet18', channels=[64, 128, 256, 512], reductions=[4, 8, 16, 32]" in text
    assert "decoder_channels=[32, 16, 16, 8, 8], positions=(2, 3, 4)" in text


def test_only_the_decoder_gets_the_pix2pix_init():
    model = build(image_size=64)
    convs = [m for m in model.steps.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert torch.cat([m.weight.flatten() for m in convs]).std().item() == pytest.approx(0.02, rel=0.05)
    norms = torch.cat([m.weight for m in model.steps.modules() if isinstance(m, nn.BatchNorm2d)])
    assert norms.std().item() == pytest.approx(0.02, rel=0.3)
    # timm's init in the encoder: BatchNorm scales of exactly 1, Kaiming-normal (fan-out) convolutions.
    assert torch.all(model.encoder.bn1.weight == 1)
    assert model.encoder.layer1[0].conv1.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("encoder, parameters", [
    ("resnet18", 15_654_753), ("resnet34", 25_762_913), ("efficientnet_b0", 4_538_381),
    ("convnext_atto", 5_077_833), ("mobilenetv3_small_100", 1_465_841),
])
def test_parameter_counts_at_256_with_the_default_decoder(encoder, parameters):
    model = build(encoder, image_size=256)
    assert sum(p.numel() for p in model.parameters()) == parameters


# --- arguments


@pytest.mark.parametrize("image_size", [0, 16, 48, 100, 32.0, True])
def test_image_size_must_be_a_multiple_of_the_largest_reduction(image_size):
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        build(image_size=image_size)


def test_slices_of_another_size_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="multiples of 32"):
        build()(torch.zeros(1, 1, 40, 40))


@pytest.mark.parametrize("positions", [(0,), (6,), (-1,), (2, 2), (2.0,)])
def test_bad_positions_are_refused(positions):
    with pytest.raises(ValueError, match=r"positions must be distinct integers in 1\.\.5"):
        build(positions=positions)


def test_without_a_stochastic_layer_positions_are_ignored():
    model = build(layer=None, positions=(9,))
    assert model.positions == () and model.stochastic_layers() == []


@pytest.mark.parametrize("channels", [(8, 8), (8, 8, 8, 8, 0), (8, 8, 8, 8, 8.0)])
def test_bad_decoder_channels_are_refused(channels):
    with pytest.raises(ValueError, match="decoder_channels must be 5 positive integers"):
        build(decoder_channels=channels)


def test_unknown_encoder_is_refused_with_close_matches():
    with pytest.raises(ValueError, match=r"unknown timm encoder 'resnet43'; close matches: .*resnet34"):
        build("resnet43")


def test_hub_names_are_refused_rather_than_downloaded():
    with pytest.raises(ValueError, match="unknown timm encoder 'hf-hub:timm/resnet18.a1_in1k'"):
        build("hf-hub:timm/resnet18.a1_in1k")


def test_encoders_without_successive_downsampling_are_refused():
    with pytest.raises(ValueError, match=r"reductions \[16, 16, 16\]"):
        build("vit_tiny_patch16_224", image_size=224)


def test_a_stochastic_layer_factory_must_build_a_stochastic_layer():
    with pytest.raises(TypeError, match="StochasticLayer"):
        build(layer=nn.Identity)


# --- weights: never downloaded, local checkpoints adapted to one channel


def test_pretrained_without_a_path_says_nothing_is_downloaded():
    with pytest.raises(ValueError, match="never downloads weights at run time.*pretrained_path"):
        build(pretrained=True)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_local_rgb_checkpoint_loads_as_timm_would_load_it(encoder, tmp_path):
    torch.manual_seed(3)
    rgb = timm.create_model(encoder, pretrained=False)  # the full classifier, 3 input channels
    path = tmp_path / f"{encoder}.safetensors"
    state = {k: v.contiguous() for k, v in rgb.state_dict().items()}
    save_file(state, str(path))
    model = build(encoder, pretrained=True, pretrained_path=str(path))
    ours = model.encoder.state_dict()
    first = model.encoder.pretrained_cfg["first_conv"] + ".weight"
    key = next(k for k in ours if k.replace(".", "_") == first.replace(".", "_"))  # "stem.0" is "stem_0" here
    assert torch.equal(ours[key], state[first].sum(dim=1, keepdim=True))
    # timm's own loader on the same file is the reference: the same tensors everywhere.
    reference = timm.create_model(
        encoder, features_only=True, in_chans=1, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).state_dict()
    assert list(ours) == list(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert model.decoder_channels == build(encoder).decoder_channels  # the decoder is unchanged


def test_one_channel_checkpoint_of_the_encoder_itself_loads_unchanged(tmp_path):
    source = build("convnext_atto", image_size=64)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    model = TimmUnetGenerator(encoder="convnext_atto", image_size=64, pretrained_path=str(path))
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit encoder 'efficientnet_b0'.*not in the checkpoint"):
        build("efficientnet_b0", pretrained_path=str(path))
    with pytest.raises(ValueError, match="does not fit encoder 'resnet34'"):
        build("resnet34", pretrained_path=str(path))
    with pytest.raises(ValueError, match="is not a file"):
        build(pretrained_path=str(tmp_path / "absent.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read it as a safetensors checkpoint"):
        build(pretrained_path=str(tmp_path / "junk.safetensors"))


def test_a_pickled_checkpoint_is_refused_with_the_way_to_convert_it(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save({"state_dict": timm.create_model("resnet34").state_dict()}, path)
    with pytest.raises(ValueError, match="holds pickled Python objects.*convert it once"):
        build(pretrained_path=str(path))


# --- as a plugin


def test_plugins_json_lists_timm_unet_under_generator(capsys):
    assert main(["plugins", "--json"]) == 0
    assert "timm_unet" in {item["name"] for item in json.loads(capsys.readouterr().out)["generator"]}


@pytest.mark.parametrize("smoke", [False, True], ids=["phantom", "smoke"])
def test_the_shipped_configuration_builds_both_arms(smoke, tmp_path):
    raw = tomllib.loads(PLUGIN_FILE.read_text())
    raw["data"]["root"] = str(tmp_path / "absent")  # the phantom fallback, wherever the tests run
    config = config_from_dict(raw, source=str(PLUGIN_FILE), smoke=smoke, host=get_host())
    assert config.model.generator.name == "timm_unet"
    assert set(config.arms) == {"mc_dropout", "concrete_dropout"}
    for arm in config.arms:
        generator = build_arm(config, arm, get_host()).generator  # includes a dry run at data.image_size
        assert isinstance(generator, TimmUnetGenerator) and generator.encoder_name == "resnet18"
        assert generator.positions == (2, 3, 4) and len(generator.stochastic_layers()) == 3
    assert tomllib.loads(PLUGIN_FILE.read_text())["model"]["generator"] == {"name": "timm_unet", "encoder": "resnet34"}
