"""Tests of the pix2pix U-Net generator, the PatchGAN discriminator and their init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from uqsynth.layers import ConcreteDropout
from uqsynth.layers.base import StochasticLayer, sampling
from uqsynth.models.base import Discriminator, Generator
from uqsynth.models.init import init_weights
from uqsynth.models.patchgan import PatchGANDiscriminator
from uqsynth.models.unet import UnetGenerator


class BernoulliMask(StochasticLayer):
    """Dropout with p = 0.5, a stand-in for the real layers."""

    def sample(self, x):
        return x * torch.bernoulli(torch.full_like(x, 0.5)) * 2.0


class Explodes(StochasticLayer):
    """Fails the test if the network runs it."""

    def forward(self, x):
        raise AssertionError("a stochastic layer ran")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_unet(**kwargs) -> UnetGenerator:
    torch.manual_seed(0)
    return UnetGenerator(**{"image_size": 32, "ngf": 8, **kwargs})


# --- a nested pix2pix U-Net (Isola et al. 2017, networks.UnetSkipConnectionBlock) as the reference


class Pix2pixBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False):
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=False)
        downrelu, downnorm = nn.LeakyReLU(0.2, True), nn.BatchNorm2d(inner_nc)
        uprelu, upnorm = nn.ReLU(True), nn.BatchNorm2d(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=False)
            layers = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=False)
            layers = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


def pix2pix_unet(num_downs: int, ngf: int) -> nn.Module:
    block = Pix2pixBlock(ngf * 8, ngf * 8, innermost=True)
    for _ in range(num_downs - 5):
        block = Pix2pixBlock(ngf * 8, ngf * 8, submodule=block)
    block = Pix2pixBlock(ngf * 4, ngf * 8, submodule=block)
    block = Pix2pixBlock(ngf * 2, ngf * 4, submodule=block)
    block = Pix2pixBlock(ngf, ngf * 2, submodule=block)
    return Pix2pixBlock(1, ngf, input_nc=1, submodule=block, outermost=True)


# --- UnetGenerator


def test_unet_256_has_the_papers_parameter_count():
    model = UnetGenerator(image_size=256, ngf=64)
    assert model.num_downs == 8
    assert count(model) == 54_407_809


@pytest.mark.parametrize("image_size, num_downs", [(8, 3), (16, 4), (32, 5), (256, 8), (512, 9)])
def test_unet_depth_follows_image_size(image_size, num_downs):
    assert UnetGenerator(image_size=image_size, ngf=2).num_downs == num_downs


@pytest.mark.parametrize("image_size", [0, 4, 7, 100, 255, 32.0, True])
def test_unet_rejects_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        UnetGenerator(image_size=image_size, ngf=2)


@pytest.mark.parametrize("positions", [(0,), (5,), (6,), (-1,), (2, 2), (2.0,)])
def test_unet_rejects_bad_positions(positions):
    with pytest.raises(ValueError, match="positions"):
        UnetGenerator(image_size=32, ngf=2, stochastic_layer=BernoulliMask, positions=positions)


def test_unet_without_stochastic_layer_ignores_positions():
    model = UnetGenerator(image_size=16, ngf=2)  # default positions (2, 3, 4); 4 would be the outermost here
    assert model.positions == ()
    assert model.stochastic_layers() == []


def test_unet_output_shape_and_range():
    model = small_unet()
    out = model(torch.randn(3, 1, 32, 32) * 5)
    assert out.shape == (3, 1, 32, 32)
    assert out.abs().max() < 1.0


def test_unet_computes_what_the_nested_pix2pix_unet_computes():
    """Same layers in the same parameter order, and pix2pix's activated skips (its in-place LeakyReLU)."""
    torch.manual_seed(0)
    reference = pix2pix_unet(num_downs=5, ngf=4)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):  # make BatchNorm non-trivial in both modes
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)
            module.running_mean.normal_(0.0, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    model = UnetGenerator(image_size=32, ngf=4)
    ours, theirs = list(model.state_dict().values()), list(reference.state_dict().values())
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    model.load_state_dict(dict(zip(model.state_dict(), theirs)))
    x = torch.randn(2, 1, 32, 32)
    for train in (True, False):
        model.train(train)
        reference.train(train)
        torch.testing.assert_close(model(x), reference(x.clone()), rtol=0, atol=1e-6)


def test_unet_stochastic_layers_sit_at_the_configured_positions():
    model = small_unet(stochastic_layer=BernoulliMask, positions=(3, 2))
    assert model.positions == (2, 3)
    layers = model.stochastic_layers()
    assert len(layers) == 2
    seen = []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model(torch.randn(2, 1, 32, 32))
    # 32x32 -> bottleneck 1x1; 2nd transposed conv from it gives 4x4 with 4*ngf, the 3rd 8x8 with 2*ngf.
    assert seen == [(2, 32, 4, 4), (2, 16, 8, 8)]


def test_unet_stochastic_layers_get_the_preceding_transposed_conv_weight():
    model = small_unet(stochastic_layer=BernoulliMask, positions=(2, 3))
    for position, layer in zip((2, 3), model.stochastic_layers()):
        conv = model.ups[position - 1].conv
        assert isinstance(conv, nn.ConvTranspose2d)
        assert len(layer.preceding_weights) == 1
        assert layer.preceding_weights[0] is conv.weight


def _reader_of(model: UnetGenerator, layer: StochasticLayer) -> tuple[nn.ConvTranspose2d, slice]:
    """The first ConvTranspose2d that runs after ``layer``, and which of its input channels are ``layer``'s output.

    Found from a forward pass alone: the order the modules run in, and where the
    layer's (ReLU'd) output sits among the next convolution's input channels.
    """
    order, inputs = [], {}

    def record(module, args, out):
        order.append(module)
        inputs[module] = (args[0], out)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.ConvTranspose2d) or m is layer]
    with torch.no_grad():
        model(torch.randn(2, 1, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3)))
    for hook in hooks:
        hook.remove()
    after = next(m for m in order[order.index(layer):] if isinstance(m, nn.ConvTranspose2d))
    dropped, read = torch.relu(inputs[layer][1]), inputs[after][0]
    channels = dropped.shape[1]
    [start] = [s for s in range(read.shape[1] - channels + 1) if torch.equal(read[:, s:s + channels], dropped)]
    return after, slice(start, start + channels)


def test_unet_consuming_weights_are_the_next_convs_input_channels_that_read_the_dropout():
    model = small_unet(stochastic_layer=lambda: ConcreteDropout(init_p=0.3), positions=(1, 2, 3))
    for layer in model.stochastic_layers():
        after, channels = _reader_of(model, layer)
        [consuming] = layer.consuming_weights
        assert consuming.shape[0] < after.in_channels  # the skip's channels are not part of it
        assert torch.equal(consuming, after.weight[channels])
        assert consuming.data_ptr() == after.weight[channels].data_ptr()  # a view of the live weight, not a copy


NEG_ENTROPY = lambda p: p * math.log(p) + (1 - p) * math.log(1 - p)  # noqa: E731


@pytest.mark.parametrize(
    ("options", "weight_term"),
    [({}, "consuming"), ({"weight_term": "consuming"}, "consuming"), ({"weight_term": "preceding"}, "preceding")],
    ids=["default", "consuming", "preceding"],
)
def test_unet_concrete_dropout_regularizer_is_eq_4_4_on_the_chosen_weights(options, weight_term):
    weight_reg, dropout_reg = 1e-2, 1e-3  # large, so a wrong weight term cannot hide behind the entropy term
    model = small_unet(
        stochastic_layer=lambda: ConcreteDropout(init_p=0.3, weight_reg=weight_reg, dropout_reg=dropout_reg, **options),
        positions=(2, 3),
    )
    for position, layer in zip((2, 3), model.stochastic_layers()):
        after, channels = _reader_of(model, layer)
        weight = after.weight[channels] if weight_term == "consuming" else model.ups[position - 1].conv.weight
        p, k = layer.dropout_probability().item(), channels.stop - channels.start  # K: the dropped channels
        expected = weight_reg * weight.pow(2).sum().item() / (1 - p) + dropout_reg * k * NEG_ENTROPY(p)
        assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weight_term", ["consuming", "preceding"])
def test_unet_weight_term_gradient_reaches_only_the_chosen_weights(weight_term):
    model = small_unet(stochastic_layer=lambda: ConcreteDropout(weight_term=weight_term), positions=(2,))
    [layer] = model.stochastic_layers()
    (after, channels), before = _reader_of(model, layer), model.ups[1].conv
    layer.regularizer().backward()
    if weight_term == "consuming":
        assert before.weight.grad is None
        read = torch.zeros(after.in_channels, dtype=torch.bool)
        read[channels] = True
        assert bool((after.weight.grad[read] != 0).all())
        assert bool((after.weight.grad[~read] == 0).all())
    else:
        assert after.weight.grad is None
        assert bool((before.weight.grad != 0).all())


def test_unet_weight_average_regularizes_its_own_next_conv():
    model = small_unet(stochastic_layer=ConcreteDropout, positions=(2,))
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    [layer] = average.module.stochastic_layers()
    average.module(torch.randn(1, 1, 32, 32))
    layer.regularizer().backward()
    assert average.module.ups[2].conv.weight.grad is not None
    assert model.ups[2].conv.weight.grad is None


def test_unet_stochastic_layers_add_no_parameters_and_are_identity_when_not_sampling():
    plain = small_unet()
    stochastic = small_unet(stochastic_layer=BernoulliMask, positions=(1, 2, 3, 4))
    assert count(stochastic) == count(plain)
    stochastic.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    plain.eval()
    stochastic.eval()
    torch.testing.assert_close(stochastic(x), plain(x), rtol=0, atol=0)


def test_unet_prefix_runs_no_stochastic_layer():
    model = small_unet(stochastic_layer=Explodes, positions=(2, 4))
    cache = model.forward_prefix(torch.randn(2, 1, 32, 32))
    with pytest.raises(AssertionError, match="stochastic layer ran"):
        model.forward_suffix(cache)


@pytest.mark.parametrize("positions", [(), (1,), (2, 3), (4,), (1, 2, 3, 4)])
def test_unet_forward_equals_suffix_of_prefix_while_sampling(positions):
    model = small_unet(stochastic_layer=BernoulliMask, positions=positions).eval()
    x = torch.randn(2, 1, 32, 32)
    with sampling(model):
        torch.manual_seed(1)
        whole = model(x)
        torch.manual_seed(1)
        split = model.forward_suffix(model.forward_prefix(x))
    assert torch.equal(whole, split)


def test_unet_cache_can_be_repeated_for_monte_carlo_draws():
    model = small_unet(stochastic_layer=BernoulliMask, positions=(2, 3)).eval()
    x = torch.randn(2, 1, 32, 32)
    cache = model.forward_prefix(x)
    assert all(t.shape[0] == 2 for t in cache)
    repeated = tuple(t.repeat_interleave(5, dim=0) for t in cache)
    with sampling(model):
        draws = model.forward_suffix(repeated).view(2, 5, 1, 32, 32)
    assert draws.std(dim=1).mean() > 0  # the draws differ
    with torch.no_grad():
        torch.testing.assert_close(model.forward_suffix(repeated).view(2, 5, 1, 32, 32)[:, 0], model(x))


def test_unet_without_stochastic_layers_caches_the_output():
    model = small_unet().eval()
    x = torch.randn(1, 1, 32, 32)
    cache = model.forward_prefix(x)
    assert len(cache) == 1
    assert model.forward_suffix(cache) is cache[0]


def test_unet_gradients_reach_every_parameter():
    model = small_unet(stochastic_layer=BernoulliMask, positions=(2, 3))
    with sampling(model):
        model(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unet_init_follows_pix2pix():
    model = UnetGenerator(image_size=32, ngf=16)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.mean().abs() < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in norms])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01)
    assert scales.std().item() == pytest.approx(0.02, rel=0.3)
    assert not torch.cat([m.bias for m in norms]).any()


def test_init_weights_leaves_other_parameters_alone():
    layer = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    init_weights(layer, gain=0.5)
    assert not layer[0].bias.any()
    assert layer[1].weight.item() == pytest.approx(0.25)  # PReLU's own init


def test_unet_is_a_generator():
    model = small_unet()
    assert isinstance(model, Generator)
    assert (model.in_channels, model.out_channels) == (1, 1)
    assert "image_size=32, ngf=8, positions=()" in repr(model)


# --- PatchGANDiscriminator


def test_patchgan_has_the_pix2pix_parameter_count():
    assert count(PatchGANDiscriminator(in_channels=2)) == 2_764_609


def test_patchgan_patch_map_shape_and_gradient():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=8)
    assert isinstance(disc, Discriminator)
    source = torch.randn(2, 1, 64, 64)
    target = torch.randn(2, 1, 64, 64, requires_grad=True)
    logits = disc(source, target)
    assert logits.shape == (2, 1, 6, 6)
    logits.mean().backward()
    assert target.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


def test_patchgan_sees_70x70_patches():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=4).eval()  # eval: batch statistics would mix all pixels
    assert disc.receptive_field == 70
    image = torch.randn(1, 1, 160, 160, requires_grad=True)
    logits = disc(torch.zeros_like(image), image)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows = image.grad[0, 0].abs().sum(dim=1).nonzero()
    cols = image.grad[0, 0].abs().sum(dim=0).nonzero()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


def test_patchgan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_layers"):
        PatchGANDiscriminator(n_layers=0)
    with pytest.raises(ValueError, match="ndf"):
        PatchGANDiscriminator(ndf=0)


def test_patchgan_init_follows_pix2pix():
    disc = PatchGANDiscriminator(ndf=16)
    weights = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert "receptive_field=70" in repr(disc)
