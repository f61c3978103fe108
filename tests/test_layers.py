"""Stochastic layers: the shared contract, then what MC and concrete dropout each promise."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from test_bad_inputs import assert_named, refused, write_config
from uqsynth.testing.layer_contract import LAYER_CHECKS, check_stochastic_layer, check_unbiased, parametrize_with_checks
from torch import nn

from uqsynth.errors import PluginError
from uqsynth.layers import (
    ConcreteDropout,
    MCDropout,
    StochasticLayer,
    WeightSlice,
    sampling,
    set_sampling,
    stochastic_layers,
    total_regularizer,
)
from uqsynth.plugins import create, list_plugins

BUILTIN_FACTORIES = [
    functools.partial(MCDropout, p=0.5),
    functools.partial(MCDropout, p=0.3, channelwise=True),
    functools.partial(ConcreteDropout),
    functools.partial(ConcreteDropout, channelwise=True, init_p=0.3),
]


# --------------------------------------------------------------------------- contract


@parametrize_with_checks(BUILTIN_FACTORIES)
def test_builtin_layers_meet_the_contract(factory, check):
    check(factory)


@pytest.mark.parametrize("name", list_plugins("stochastic_layer"))
def test_every_registered_layer_meets_the_contract(name):
    check_stochastic_layer(lambda: create("stochastic_layer", name))


class _Biased(MCDropout):
    """Dropout that forgets the 1/(1-p) rescaling: what the contract must catch."""

    def sample(self, x):
        return x * torch.empty_like(x).bernoulli_(1 - self.p)


class _AlwaysRandom(MCDropout):
    """Dropout that samples in train mode like torch's nn.Dropout."""

    def forward(self, x):
        return self.sample(x) if (self.sampling or self.training) else x


@pytest.mark.parametrize(
    ("factory", "failing_check"),
    [
        (functools.partial(_Biased, p=0.5), "check_unbiased"),
        (functools.partial(_AlwaysRandom, p=0.5), "check_deterministic_without_sampling"),
    ],
)
def test_contract_names_the_broken_rule(factory, failing_check):
    with pytest.raises(AssertionError, match=failing_check):
        check_stochastic_layer(factory)


def test_contract_flags_the_relaxation_bias_at_high_temperature():
    # At t = 1 the concrete relaxation shrinks E[output] by ~9 % (see the
    # contract's module docstring); at the default t = 0.1 the bias (~0.2 %) is
    # below what the check resolves, which is why the built-ins pass.
    with pytest.raises(AssertionError, match="standard errors"):
        check_unbiased(functools.partial(ConcreteDropout, temperature=1.0, init_p=0.3))


def test_contract_lists_each_check_once():
    names = [check.__name__ for check in LAYER_CHECKS]
    assert len(names) == len(set(names)) and all(name.startswith("check_") for name in names)


# --------------------------------------------------------------------------- gradients to p


def test_loss_through_sampling_concrete_dropout_reaches_p_logit():
    torch.manual_seed(0)
    layer = ConcreteDropout(init_p=0.2)
    x = torch.randn(2, 3, 4, 4)
    with sampling(layer):
        loss = (layer(x) - x).pow(2).mean()
    loss.backward()
    assert layer.p_logit.grad is not None
    assert torch.isfinite(layer.p_logit.grad) and layer.p_logit.grad.abs() > 0


@pytest.mark.parametrize("weight_term", ["consuming", "preceding"])
def test_regularizer_alone_gives_a_gradient_on_p_logit_and_the_chosen_weights_only(weight_term):
    layer = ConcreteDropout(init_p=0.1, weight_term=weight_term)
    before, after = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)
    layer.attach_weights(preceding=[before.weight], consuming=[after.weight])
    layer(torch.randn(1, 3, 4, 4))  # sampling off: only K is recorded
    layer.regularizer().backward()
    chosen, other = (after, before) if weight_term == "consuming" else (before, after)
    assert layer.p_logit.grad is not None and layer.p_logit.grad.abs() > 0
    assert chosen.weight.grad is not None and chosen.weight.grad.abs().sum() > 0
    assert other.weight.grad is None


def test_entropy_term_pushes_p_towards_one_half():
    # Without weights the regularizer is dropout_reg*K*(p log p + (1-p) log(1-p)),
    # minimal at p = 0.5: gradient descent must raise a small p and lower a large one.
    slopes = {}
    for init_p in (0.1, 0.9):
        layer = ConcreteDropout(init_p=init_p)
        layer(torch.ones(1, 3, 2, 2))
        layer.regularizer().backward()
        slopes[init_p] = layer.p_logit.grad.item()
    assert slopes[0.1] < 0 < slopes[0.9]


# --------------------------------------------------------------------------- regularizer values


# Hand computation for weights M = 0.5 everywhere, shape (3, 2, 4, 4): ||M||^2 = 96 * 0.25 = 24.
SQUARED_NORM = 24.0
NEG_ENTROPY_02 = 0.2 * math.log(0.2) + 0.8 * math.log(0.8)  # -0.500402...


def _attach_with_decoy(layer: ConcreteDropout, weights: list[nn.Parameter], weight_term: str) -> None:
    """Attach ``weights`` as ``weight_term`` and a large decoy as the other kind, which must not count."""
    decoy = [nn.Parameter(torch.full((7,), 100.0))]
    chosen = {"preceding": decoy, "consuming": decoy, weight_term: weights}
    layer.attach_weights(**chosen)


@pytest.mark.parametrize("weight_term", ["consuming", "preceding"])
@pytest.mark.parametrize(
    ("k", "dimensionality"),
    [("channels", 3), ("elements", 3 * 5 * 6)],
)
@pytest.mark.parametrize(("weight_reg", "dropout_reg"), [(1e-6, 1e-5), (1e-2, 1e-3)])
def test_regularizer_equals_eq_4_4_by_hand(k, dimensionality, weight_reg, dropout_reg, weight_term):
    layer = ConcreteDropout(init_p=0.2, k=k, weight_reg=weight_reg, dropout_reg=dropout_reg, weight_term=weight_term)
    _attach_with_decoy(layer, [nn.Parameter(torch.full((3, 2, 4, 4), 0.5))], weight_term)
    layer(torch.ones(2, 3, 5, 6))  # C = 3, H = 5, W = 6 (distinct, so C*H*W cannot be confused)
    expected = weight_reg * SQUARED_NORM / (1 - 0.2) + dropout_reg * dimensionality * NEG_ENTROPY_02
    assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)


def test_regularizer_paper_defaults_number_uses_the_consuming_weights():
    # Written out once in full for the paper's defaults (weight_reg 1e-6, dropout_reg 1e-5, K = 3):
    # 1e-6 * 24 / 0.8 + 1e-5 * 3 * (-0.5004024235) = 3.0e-5 - 1.50120727e-5. The default
    # weight_term is Gal et al.'s "consuming"; the preceding decoy would add 1e-6 * 70000 / 0.8.
    layer = ConcreteDropout(init_p=0.2)
    _attach_with_decoy(layer, [nn.Parameter(torch.full((3, 2, 4, 4), 0.5))], "consuming")
    layer(torch.ones(1, 3, 4, 4))
    assert layer.regularizer().item() == pytest.approx(1.49879273e-5, rel=1e-5)


def test_regularizer_of_a_slice_counts_only_its_channels():
    # A next layer reading cat[skip, h]: weight (4, 2, 4, 4), h owns input channels 1..3 (dim 0).
    weight = nn.Parameter(torch.cat([torch.full((1, 2, 4, 4), 9.0), torch.full((3, 2, 4, 4), 0.5)]))
    layer = ConcreteDropout(init_p=0.2)
    layer.attach_weights(consuming=[WeightSlice(weight, dim=0, start=1)])
    layer(torch.ones(1, 3, 4, 4))
    expected = 1e-6 * 24.0 / 0.8 + 1e-5 * 3 * NEG_ENTROPY_02  # the 9.0 channel is the skip's: not counted
    assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)
    layer.regularizer().backward()
    assert bool((weight.grad[0] == 0).all()) and bool((weight.grad[1:] != 0).all())


def test_a_host_attaching_only_preceding_weights_is_refused_not_silently_unregularized():
    # A generator written for the one-argument attach_weights([w]) gives no consuming weights.
    layer = ConcreteDropout()
    layer.attach_weights([nn.Parameter(torch.ones(3, 2, 4, 4))])
    layer(torch.ones(1, 3, 4, 4))
    with pytest.raises(PluginError, match="weight_term = 'consuming'.*set weight_term = 'preceding'"):
        layer.regularizer()
    old_style = ConcreteDropout(weight_term="preceding")
    old_style.attach_weights([nn.Parameter(torch.ones(3, 2, 4, 4))])
    old_style(torch.ones(1, 3, 4, 4))
    assert old_style.regularizer().item() > 0


def test_weight_slices_refuse_an_empty_or_outside_range():
    weight = nn.Parameter(torch.ones(4, 2, 4, 4))
    for bad in ({"dim": 4}, {"start": 4}, {"start": 2, "stop": 2}, {"stop": 5}):
        with pytest.raises(ValueError, match="weight of shape"):
            WeightSlice(weight, **bad)


def test_regularizer_sums_several_attached_tensors():
    layer = ConcreteDropout(init_p=0.2)
    layer.attach_weights(consuming=[nn.Parameter(torch.full((3, 2, 4, 4), 0.5)), nn.Parameter(torch.full((2,), 2.0))])
    layer(torch.ones(1, 3, 4, 4))
    expected = 1e-6 * (24.0 + 8.0) / 0.8 + 1e-5 * 3 * NEG_ENTROPY_02
    assert layer.regularizer().item() == pytest.approx(expected, rel=1e-5)


def test_regularizer_without_attached_weights_is_the_entropy_term_only():
    layer = ConcreteDropout(init_p=0.2)
    layer(torch.ones(1, 3, 4, 4))
    assert layer.attached_weights == []
    assert layer.regularizer().item() == pytest.approx(1e-5 * 3 * NEG_ENTROPY_02, rel=1e-5)


def test_regularizer_before_any_forward_pass_raises():
    with pytest.raises(RuntimeError, match="forward pass"):
        ConcreteDropout().regularizer()


# --------------------------------------------------------------------------- keep rates and masks


def binomial_tolerance(p: float, n: int) -> float:
    """Five standard errors of a fraction estimated from ``n`` Bernoulli(p) draws."""
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mc_dropout_keeps_a_fraction_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.ones(1, 10, 100, 100)
    with sampling(layer := MCDropout(p=p)):
        out = layer(x)
    kept = (out != 0).float().mean().item()
    assert kept == pytest.approx(1 - p, abs=binomial_tolerance(p, x.numel()))
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))  # survivors are rescaled


@pytest.mark.parametrize("temperature", [0.1, 1.0])
@pytest.mark.parametrize("init_p", [0.1, 0.5])
def test_concrete_dropout_hard_keep_rate_is_one_minus_p_at_any_temperature(init_p, temperature):
    # z > 1/2 exactly when the logistic noise exceeds logit(1 - p), so the fraction of
    # elements with relaxed keep value 1 - z > 1/2 is 1 - p whatever the temperature.
    torch.manual_seed(0)
    layer = ConcreteDropout(init_p=init_p, temperature=temperature)
    x = torch.ones(1, 10, 100, 100)
    with sampling(layer), torch.no_grad():
        out = layer(x)
    p = layer.dropout_probability().item()
    keep_value = out * (1 - p) / x
    kept = (keep_value > 0.5).float().mean().item()
    assert kept == pytest.approx(1 - p, abs=binomial_tolerance(p, x.numel()))
    assert bool(((keep_value >= 0) & (keep_value <= 1)).all())


def test_channelwise_mc_dropout_keeps_or_drops_whole_channels():
    torch.manual_seed(0)
    layer = MCDropout(p=0.3, channelwise=True)
    with sampling(layer):
        out = layer(torch.ones(8, 16, 6, 6))
    per_channel = out.flatten(2)
    zero = (per_channel == 0).all(dim=2)
    full = (per_channel == 1 / 0.7).all(dim=2)
    assert bool((zero | full).all()), "a channel map was partly dropped"
    assert bool(zero.any()) and bool(full.any())


def test_channelwise_concrete_dropout_is_constant_within_each_channel():
    torch.manual_seed(0)
    layer = ConcreteDropout(channelwise=True, init_p=0.3)
    with sampling(layer), torch.no_grad():
        out = layer(torch.ones(8, 16, 6, 6))
    per_channel = out.flatten(2)
    assert torch.equal(per_channel, per_channel[..., :1].expand_as(per_channel))
    assert per_channel[..., 0].unique().numel() > 1, "channels should get different mask values"


# --------------------------------------------------------------------------- BatchNorm at test time


@pytest.mark.parametrize("dropout", [functools.partial(MCDropout, p=0.5), functools.partial(ConcreteDropout, init_p=0.3)])
def test_sampling_in_eval_mode_leaves_batchnorm_statistics_alone(dropout):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), dropout(), nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2)
    )
    x = torch.randn(2, 1, 8, 8)
    model.train()
    model(x)  # non-trivial running statistics, as after training
    model.eval()
    batchnorms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in batchnorms]
    with sampling(model), torch.no_grad():
        outputs = [model(x) for _ in range(10)]
    for bn, saved in zip(batchnorms, before):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(bn.state_dict()[key], saved[key]), f"{key} changed while sampling"
    assert not model.training
    assert not torch.equal(outputs[0], outputs[1])
    assert len({out.sum().item() for out in outputs}) > 1


# --------------------------------------------------------------------------- parameters and helpers


@pytest.mark.parametrize(
    "build",
    [
        lambda: MCDropout(p=1),
        lambda: MCDropout(p=-0.1),
        lambda: ConcreteDropout(init_p=0),
        lambda: ConcreteDropout(init_p=1),
        lambda: ConcreteDropout(temperature=0),
        lambda: ConcreteDropout(temperature=-0.1),
        lambda: ConcreteDropout(weight_reg=-1e-6),
        lambda: ConcreteDropout(k="pixels"),
        lambda: ConcreteDropout(weight_term="next"),
    ],
    ids=["mc-p=1", "mc-p=-0.1", "concrete-init_p=0", "concrete-init_p=1", "temperature=0",
         "temperature<0", "weight_reg<0", "k=pixels", "weight_term=next"],
)
def test_invalid_parameters_raise_value_error(build):
    with pytest.raises(ValueError):
        build()


def test_total_regularizer_sums_the_layer_terms():
    torch.manual_seed(0)
    first, mc = ConcreteDropout(init_p=0.2), MCDropout(p=0.5)
    second = ConcreteDropout(init_p=0.4, k="elements", weight_term="preceding")
    conv = nn.Conv2d(3, 3, 1)
    second.attach_weights(preceding=[conv.weight])
    model = nn.Sequential(first, conv, second, nn.Sequential(mc))
    model(torch.randn(1, 3, 4, 4))
    assert list(stochastic_layers(model)) == [first, second, mc]
    assert mc.regularizer().item() == 0.0
    expected = first.regularizer() + second.regularizer()
    assert torch.allclose(total_regularizer(model), expected)
    assert total_regularizer(model).dim() == 0


def test_total_regularizer_of_a_model_without_stochastic_layers_is_zero():
    total = total_regularizer(nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert total.dim() == 0 and total.item() == 0.0


def test_mc_dropout_regularizer_is_zero_and_p_is_fixed():
    layer = MCDropout(p=0.5)
    layer(torch.ones(1, 1, 2, 2))
    assert layer.regularizer().item() == 0.0
    assert layer.dropout_probability() is None
    assert list(layer.parameters()) == []


def test_concrete_dropout_probability_is_sigmoid_of_p_logit_starting_at_init_p():
    layer = ConcreteDropout(init_p=0.3)
    assert layer.dropout_probability().item() == pytest.approx(0.3, rel=1e-6)
    with torch.no_grad():
        layer.p_logit.fill_(1.5)
    assert layer.dropout_probability().item() == pytest.approx(1 / (1 + math.exp(-1.5)), rel=1e-6)
    assert torch.equal(layer.dropout_probability(), torch.sigmoid(layer.p_logit))


def test_set_sampling_reaches_nested_layers():
    inner = MCDropout(p=0.5)
    model = nn.Sequential(nn.Sequential(inner), ConcreteDropout())
    set_sampling(model, True)
    assert all(layer.sampling for layer in stochastic_layers(model))
    set_sampling(model, False)
    assert not any(layer.sampling for layer in stochastic_layers(model))


# --------------------------------------------------------------------------- attached weights


def _conv_dropout_conv() -> nn.Sequential:
    """conv -> dropout -> next conv; the dropout regularizes next's input channels 1.. (a stand-in skip owns 0)."""
    conv, after = nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), nn.Conv2d(2, 2, 1)
    dropout = ConcreteDropout()
    dropout.attach_weights(preceding=[conv.weight], consuming=[WeightSlice(after.weight, dim=1, start=1)])
    return nn.Sequential(conv, dropout, after)


def _reads(view: torch.Tensor, parameter: nn.Parameter) -> bool:
    """Whether ``view`` is input channels 1.. of ``parameter`` as it is now (same storage, same values)."""
    return view.data_ptr() == parameter[:, 1:].data_ptr() and torch.equal(view, parameter[:, 1:])


def test_attached_weights_belong_to_the_neighbouring_layers_not_to_the_dropout():
    model = _conv_dropout_conv()
    conv, dropout, after = model
    assert dropout.preceding_weights[0] is conv.weight
    assert _reads(dropout.consuming_weights[0], after.weight)
    assert set(dropout.state_dict()) == {"p_logit"}
    assert [id(p) for p in dropout.parameters()] == [id(dropout.p_logit)]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.p_logit", "2.weight", "2.bias"}


def test_deepcopy_keeps_the_copy_pointing_at_its_own_weights():
    model = _conv_dropout_conv()
    clone = copy.deepcopy(model)  # what the weight average (AveragedModel) does
    assert clone[1].preceding_weights[0] is clone[0].weight
    assert _reads(clone[1].consuming_weights[0], clone[2].weight)
    # Behaviourally: changing the copy's next conv changes the copy's regularizer only.
    x = torch.ones(1, 3, 2, 2)
    model(x), clone(x)
    before = model[1].regularizer().item()
    with torch.no_grad():
        clone[2].weight.mul_(10)
    assert model[1].regularizer().item() == before
    assert clone[1].regularizer().item() > before


def test_dtype_conversion_and_load_state_dict_keep_the_slice_live():
    model = _conv_dropout_conv().double()  # swaps each parameter's storage: a stored view would go stale
    assert model[1].preceding_weights[0] is model[0].weight
    assert _reads(model[1].consuming_weights[0], model[2].weight)
    assert model[1].consuming_weights[0].dtype == torch.float64
    torch.manual_seed(1)
    other = _conv_dropout_conv().double()
    model.load_state_dict(other.state_dict())
    x = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    model(x), other(x)
    assert model[1].regularizer().item() == pytest.approx(other[1].regularizer().item(), rel=1e-12)


def test_base_class_sample_must_be_implemented():
    layer = StochasticLayer()
    assert torch.equal(layer(torch.ones(2)), torch.ones(2))
    with sampling(layer), pytest.raises(NotImplementedError):
        layer(torch.ones(2))


# --------------------------------------------------------------------------- weight_term in a configuration


def test_a_bad_weight_term_in_the_config_is_one_line_naming_the_key(tmp_path, capsys):
    arms = {"cd": {"stochastic_layer": {"name": "concrete_dropout", "weight_term": "after"}, "positions": [2, 3]}}
    config = write_config(tmp_path / "c.toml", arms=arms)
    out = tmp_path / "out"
    line = refused(capsys, "run", str(config), "--out", str(out), "--device", "cpu")
    assert_named(line, f"{config}: arms.cd.stochastic_layer.weight_term: expected one of 'consuming', 'preceding', "
                       "found a string 'after'")
    assert not out.exists()
