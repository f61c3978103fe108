"""Sample designs (antithetic, stratified) and adaptive T: same moments, smaller errors, fewer samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from uqsynth.errors import PluginError
from uqsynth.layers import ConcreteDropout, MCDropout, SampleDesign, StochasticLayer, sample_design, sampling
from uqsynth.posterior import PosteriorSampler, SamplerOptions, StreamingMoments, std_relative_error

from test_posterior import LinearAfterDropout  # noqa: I001 - a sibling test module (tests/ is on sys.path)


WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)


def linear_case(p=0.5, weights=WEIGHTS):
    model = LinearAfterDropout(weights, p).double()
    channels = weights.numel()
    x = torch.rand(2, channels, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    contributions = weights.view(1, channels, 1, 1) * x
    true_mean = contributions.sum(1, keepdim=True)
    true_var = (p / (1 - p)) * contributions.square().sum(1, keepdim=True)
    return model, x, true_mean, true_var


def masks(layer: StochasticLayer, design: SampleDesign | None, rows: int, seed: int = 0) -> torch.Tensor:
    """What the layer multiplies a tensor of ones by: its (relaxed) keep mask times the inverse keep rate."""
    model = nn.Sequential(layer)
    torch.manual_seed(seed)
    with torch.no_grad(), sampling(model), sample_design(model, design):
        return model(torch.ones(rows, 3, 5, 5))


def test_stratified_bernoulli_keeps_every_unit_in_exactly_its_share_of_a_slices_samples():
    drawn = masks(MCDropout(p=0.5), SampleDesign("stratified", 8), rows=2 * 8) > 0
    kept = drawn.reshape(2, 8, -1).sum(1)
    assert torch.all(kept == 4)  # independent masks keep a binomial(8, 1/2) number
    plain = masks(MCDropout(p=0.5), None, rows=2 * 8).reshape(2, 8, -1) > 0
    assert not torch.all(plain.sum(1) == 4)


def test_antithetic_bernoulli_pairs_are_complements_and_concrete_pairs_mirror():
    drawn = masks(MCDropout(p=0.5), SampleDesign("antithetic", 4), rows=3 * 4) > 0
    pairs = drawn.reshape(3, 2, 2, -1)
    assert torch.all(pairs[:, :, 0] != pairs[:, :, 1])
    # Concrete dropout: logistic noise of u and 1 - u is opposite, so at p = 0.5 the relaxed drops sum to 1.
    relaxed = masks(ConcreteDropout(init_p=0.5, temperature=0.5), SampleDesign("antithetic", 2), rows=2 * 2)
    drop = 1 - relaxed * 0.5  # output = (1 - z) / (1 - p) with p = 0.5
    assert torch.allclose(drop[0::2] + drop[1::2], torch.ones_like(drop[0::2]), atol=1e-5)


@pytest.mark.parametrize("kind", ["antithetic", "stratified"])
def test_designed_uniforms_are_uniform(kind):
    u = SampleDesign(kind, 10).uniform((10 * 400, 50), "cpu", torch.float32)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # Every one of the 10 rows of a group is marginally U(0, 1): mean 1/2, variance 1/12.
    per_row = u.reshape(400, 10, 50).transpose(0, 1).reshape(10, -1)
    assert torch.allclose(per_row.mean(1), torch.full((10,), 0.5), atol=0.01)
    assert torch.allclose(per_row.var(1), torch.full((10,), 1 / 12), atol=0.005)


def test_a_design_needs_whole_groups_and_a_known_kind():
    with pytest.raises(ValueError, match="whole groups"):
        SampleDesign("stratified", 4).uniform((6, 3), "cpu", torch.float32)
    with pytest.raises(ValueError, match="design must be one of"):
        SampleDesign("sobol", 4)


class OwnNoise(StochasticLayer):
    """A third-party layer that draws Gaussian noise itself: it supports no design."""

    def sample(self, x):
        return x * (1 + 0.1 * torch.randn_like(x))


def test_a_layer_that_draws_its_own_noise_refuses_a_design_by_name():
    model = LinearAfterDropout(WEIGHTS, layer=OwnNoise()).double()
    sampler = PosteriorSampler(model, SamplerOptions(samples=4, variance_reduction="stratified"))
    with pytest.raises(PluginError, match="OwnNoise does not support the 'stratified' sample design"):
        sampler.sample(torch.ones(1, 4, 2, 2, dtype=torch.float64))
    # Plain sampling still works, and the layer is left without a design.
    PosteriorSampler(model, SamplerOptions(samples=4)).sample(torch.ones(1, 4, 2, 2, dtype=torch.float64))
    assert model.dropout.design is None


def errors_over_seeds(variance_reduction: str, samples: int, weights: torch.Tensor = WEIGHTS, seeds: int = 40):
    """RMS relative error of the mean and of the variance of a linear case over many seeds."""
    model, x, true_mean, true_var = linear_case(weights=weights)
    mean_errors, var_errors = [], []
    for seed in range(seeds):
        options = SamplerOptions(samples=samples, seed=seed, accumulator="float64",
                                 variance_reduction=variance_reduction)
        posterior = PosteriorSampler(model, options).sample(x)
        mean_errors.append(((posterior.mean - true_mean).norm() / true_mean.norm()).item())
        var_errors.append(((posterior.variance - true_var).norm() / true_var.norm()).item())
    rms = lambda values: math.sqrt(sum(v * v for v in values) / len(values))  # noqa: E731
    return rms(mean_errors), rms(var_errors)


def test_designs_make_the_mean_of_a_linear_output_exact():
    plain_mean, _ = errors_over_seeds("none", 16)
    for kind in ("antithetic", "stratified"):
        mean_error, _ = errors_over_seeds(kind, 16)
        assert mean_error < 1e-6 < 0.05 < plain_mean  # complementary pairs, exact keep counts


def test_stratified_variance_is_exact_for_one_unit_and_antithetic_is_no_better_than_plain():
    one_unit = WEIGHTS[:1]
    _, plain_var = errors_over_seeds("none", 16, one_unit)
    _, strat_var = errors_over_seeds("stratified", 16, one_unit)
    # One unit kept in exactly half of the samples: its sample variance (divided by T) is the true one.
    assert strat_var < 1e-6 < 0.05 < plain_var
    # Several units: the error of the variance is mostly their sample cross-covariances, which no
    # per-unit design controls; complementary pairs share their squared deviations and lose.
    _, plain_var = errors_over_seeds("none", 16)
    _, anti_var = errors_over_seeds("antithetic", 16)
    assert anti_var > plain_var


def test_fourth_moments_merge_exactly_and_give_the_variances_standard_error():
    data = torch.randn(60, 7, dtype=torch.float64).exp()  # skewed, heavy-tailed
    moments = StreamingMoments(dtype=torch.float64, fourth=True)
    for start, stop in [(0, 2), (2, 31), (31, 32), (32, 60)]:
        moments.update(data[start:stop], dim=0)
    deviation = data - data.mean(0)
    assert torch.allclose(moments.m3, deviation.pow(3).sum(0))
    assert torch.allclose(moments.m4, deviation.pow(4).sum(0))
    n, variance = 60, data.var(0)
    expected = ((deviation.pow(4).mean(0) - variance.square() * (n - 3) / (n - 1)) / n).sqrt()
    assert torch.allclose(moments.variance_standard_error(), expected)
    with pytest.raises(ValueError, match="fourth=True"):
        StreamingMoments().variance_standard_error()


def test_the_stopping_rules_error_estimate_matches_the_error_it_makes():
    """Over many seeds the estimated relative error of the std map is close to the realized one."""
    model, x, _, true_var = linear_case()
    true_std = true_var.sqrt()
    estimated, realized = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        with torch.no_grad(), sampling(model):
            draws = model(x[:1].repeat_interleave(30, dim=0))
        moments = StreamingMoments(dtype=torch.float64, fourth=True)
        moments.update(draws, dim=0)
        estimated.append(std_relative_error(moments))
        realized.append(((moments.variance().sqrt() - true_std[0]).norm() / true_std[0].norm()).item())
    rms_realized = math.sqrt(sum(r * r for r in realized) / len(realized))
    mean_estimated = sum(estimated) / len(estimated)
    assert 0.7 < mean_estimated / rms_realized < 1.4


def test_adaptive_t_stops_each_slice_at_the_tolerance_within_the_cap_reproducibly():
    model, x, _, true_var = linear_case()
    x = torch.cat([x, 50 * x[:1]])  # a third slice: same relative spread, so about the same T
    options = SamplerOptions(samples=400, seed=3, tolerance=0.1, min_samples=10, accumulator="float64")
    posterior = PosteriorSampler(model, options).sample(x)
    counts = posterior.sample_counts
    assert torch.all((counts >= 10) & (counts <= 400))
    assert torch.all(posterior.relative_error <= 0.1)
    # Var(s^2) / sigma^4 = 2 / (T - 1) + excess kurtosis / T, and a weighted sum of four fair coins
    # is light-tailed (excess kurtosis about -1.4 here): about 20 samples reach 10 %, not the cap.
    assert 12 <= int(counts.min()) and int(counts.max()) <= 60
    again = PosteriorSampler(model, options).sample(x)
    assert torch.equal(again.mean, posterior.mean) and torch.equal(again.sample_counts, counts)
    # A tolerance the cap cannot reach: every slice gets the cap, and its error says so.
    capped = PosteriorSampler(model, SamplerOptions(samples=12, seed=3, tolerance=0.01, min_samples=10)).sample(x)
    assert torch.all(capped.sample_counts == 12) and torch.all(capped.relative_error > 0.01)


def test_adaptive_t_gives_fewer_samples_to_slices_whose_std_converges_faster():
    # MC dropout at a low p: each unit is dropped rarely, so the output is heavy-tailed.
    heavy = LinearAfterDropout(WEIGHTS, 0.05).double()
    light = LinearAfterDropout(WEIGHTS, 0.5).double()
    x = torch.rand(1, 4, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    options = SamplerOptions(samples=2000, seed=0, tolerance=0.1, accumulator="float64")
    # Bernoulli(p) has kurtosis 1/(p(1-p)) - 3: at p = 0.05 the variance converges much more slowly.
    assert PosteriorSampler(heavy, options).sample(x).sample_counts[0] > 3 * PosteriorSampler(light, options).sample(
        x
    ).sample_counts[0]


def test_adaptive_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="tolerance must be in"):
        SamplerOptions(tolerance=0.0)
    with pytest.raises(ValueError, match="min_samples"):
        SamplerOptions(samples=20, tolerance=0.05, min_samples=30)
    with pytest.raises(ValueError, match="fixed T"):
        SamplerOptions(tolerance=0.05, keep_samples=True)
    with pytest.raises(ValueError, match="antithetic"):
        SamplerOptions(tolerance=0.05, variance_reduction="antithetic")
    with pytest.raises(ValueError, match="variance_reduction must be one of"):
        SamplerOptions(variance_reduction="sobol")


def test_the_configuration_chooses_adaptive_t_and_the_design_and_the_certificate_says_so():
    from pathlib import Path

    from uqsynth.config import load_config
    from uqsynth.errors import ConfigError
    from uqsynth.inference import sampler_options

    toml = Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml"
    auto = sampler_options(load_config(toml, overrides=[
        "sampling.samples=auto", "sampling.tolerance=0.1", "sampling.max_samples=64",
        "sampling.variance_reduction=stratified",
    ]))
    assert (auto.samples, auto.tolerance, auto.variance_reduction) == (64, 0.1, "stratified")
    assert auto.record() == {"samples": "auto", "tolerance": 0.1, "max_samples": 64,
                             "variance_reduction": "stratified"}
    assert auto.describe().startswith("T=auto")
    fixed = sampler_options(load_config(toml))
    assert fixed.tolerance is None and fixed.record() == {"samples": 20}
    # `predict --samples T` fixes T even where the run samples adaptively.
    assert sampler_options(load_config(toml, overrides=["sampling.samples=auto"]), samples=8).tolerance is None
    with pytest.raises(ConfigError, match="sampling.samples"):
        load_config(toml, overrides=["sampling.samples=automatic"])
    with pytest.raises(ConfigError, match="sampling.variance_reduction"):
        load_config(toml, overrides=["sampling.variance_reduction=sobol"])
