"""The MC sampling engine: exact prefix caching, streaming moments, convergence to theory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from uqsynth.layers import ConcreteDropout, MCDropout, StochasticLayer, sampling
from uqsynth.models.base import Generator
from uqsynth.models.unet import UnetGenerator
from uqsynth.posterior import PosteriorSampler, SamplerOptions, StreamingMoments, gaussian_interval


def small_unet(dtype=torch.float32, layer=lambda: MCDropout(p=0.5)) -> UnetGenerator:
    torch.manual_seed(0)
    return UnetGenerator(image_size=16, ngf=4, stochastic_layer=layer, positions=(2, 3)).to(dtype)


def slices(n=3, size=16, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("layer", [lambda: MCDropout(p=0.5), lambda: ConcreteDropout(init_p=0.3)])
def test_cached_prefix_equals_the_full_network_with_the_same_masks(layer):
    generator, x, T = small_unet(torch.float64, layer), slices(dtype=torch.float64), 7
    options = SamplerOptions(samples=T, seed=5, keep_samples=True, memory_budget_mb=1e4, accumulator="float64")
    cached = PosteriorSampler(generator, options).sample(x)
    # Reference: T full forward passes, drawn as one batch of x repeated T times.
    generator.eval()
    with torch.random.fork_rng(), torch.no_grad(), sampling(generator):
        torch.manual_seed(5)
        full = generator(x.repeat_interleave(T, dim=0)).reshape(3, T, 1, 16, 16)
    assert torch.allclose(cached.samples.double(), full, rtol=0, atol=1e-12)
    assert torch.allclose(cached.mean.double(), full.mean(1), atol=1e-6)
    assert torch.allclose(cached.variance.double(), full.var(1), atol=1e-6)
    uncached = PosteriorSampler(generator, SamplerOptions(**{**options.__dict__, "cache_prefix": False})).sample(x)
    assert torch.allclose(uncached.samples, cached.samples, rtol=0, atol=1e-12)


class LinearAfterDropout(Generator):
    """y = sum_c w_c * dropout(x)_c: mean sum_c w_c x_c, variance p/(1-p) sum_c (w_c x_c)^2.

    ``p`` is MC dropout's; any other stochastic layer can be given as ``layer``.
    """

    def __init__(self, weights: torch.Tensor, p: float = 0.5, layer: StochasticLayer | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = weights.numel(), 1
        self.dropout = MCDropout(p=p) if layer is None else layer
        self.mix = nn.Conv2d(weights.numel(), 1, 1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(weights.view(1, -1, 1, 1))

    def forward_prefix(self, x):
        return (x,)

    def forward_suffix(self, cache):
        return self.mix(self.dropout(cache[0]))


@pytest.mark.parametrize("samples", [64, 1024])
def test_mean_and_variance_converge_to_the_closed_form(samples):
    p, weights = 0.4, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    model = LinearAfterDropout(weights, p).double()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    contributions = weights.view(1, 3, 1, 1) * x
    true_mean = contributions.sum(1, keepdim=True)
    true_var = (p / (1 - p)) * contributions.square().sum(1, keepdim=True)
    posterior = PosteriorSampler(model, SamplerOptions(samples=samples, seed=3, accumulator="float64")).sample(x)
    # Each voxel's mean is within 6 standard errors sqrt(var / T).
    assert torch.all((posterior.mean - true_mean).abs() <= 6 * (true_var / samples).sqrt())
    # The sample variance's relative error has sd <= sqrt((kurtosis - 1) / T) (kurtosis <= 3 here);
    # averaged over independent voxels it shrinks by sqrt(voxels).
    ratio = posterior.variance / true_var
    tolerance = 6 * math.sqrt(2 / samples) / math.sqrt(ratio.numel())
    assert abs(ratio.mean().item() - 1) <= tolerance


def test_streaming_moments_match_the_two_pass_formulas_over_uneven_batches():
    data = torch.randn(103, 4, 5, dtype=torch.float64) * 3 + 1e3  # large offset: naive sums would lose digits
    moments = StreamingMoments(dtype=torch.float32)
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        moments.update(data[start:stop].float(), dim=0)
    assert moments.count == 103
    assert torch.allclose(moments.mean.double(), data.mean(0), rtol=1e-6)
    assert torch.allclose(moments.variance().double(), data.var(0), rtol=1e-3)
    with pytest.raises(ValueError, match="float32 or float64"):
        StreamingMoments(dtype=torch.float16)


def test_memory_budget_splits_the_work_into_several_passes_with_consistent_results():
    generator, x = small_unet(), slices(n=4)
    big = PosteriorSampler(generator, SamplerOptions(samples=200, seed=1, memory_budget_mb=1e4))
    small = PosteriorSampler(generator, SamplerOptions(samples=200, seed=1, memory_budget_mb=0.05))
    assert small.slice_samples_per_pass(x) < 200 <= big.slice_samples_per_pass(x)
    a, b = big.sample(x), small.sample(x)
    assert a.mean.shape == b.mean.shape == (4, 1, 16, 16)
    # Different mask order, same distribution: the means agree within their standard errors.
    standard_error = ((a.variance + b.variance) / 200).sqrt()
    assert ((a.mean - b.mean).abs() <= 6 * standard_error + 1e-6).float().mean() > 0.99


def test_a_seed_fixes_the_samples_and_different_seeds_differ():
    generator, x = small_unet(), slices()
    run = lambda seed: PosteriorSampler(generator, SamplerOptions(samples=5, seed=seed)).sample(x)  # noqa: E731
    assert torch.equal(run(4).mean, run(4).mean)
    assert not torch.equal(run(4).mean, run(5).mean)


def test_sampling_leaves_batchnorm_statistics_and_modes_alone():
    generator, x = small_unet(), slices()
    generator.train()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    posterior = PosteriorSampler(generator, SamplerOptions(samples=6)).sample(x)
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
    assert generator.training and not any(layer.sampling for layer in generator.stochastic_layers())
    assert torch.all(posterior.variance[x.new_ones(posterior.variance.shape, dtype=torch.bool)] >= 0)
    assert posterior.std.mean() > 0


def test_samples_and_quantiles_on_request():
    generator, x = small_unet(), slices(n=2)
    options = SamplerOptions(samples=9, keep_samples=True, quantiles=(0.1, 0.5, 0.9))
    posterior = PosteriorSampler(generator, options).sample(x)
    assert posterior.samples.shape == (2, 9, 1, 16, 16)
    assert posterior.quantiles.shape == (2, 3, 1, 16, 16)
    assert torch.all(posterior.quantiles[:, 0] <= posterior.quantiles[:, 1])
    assert torch.all(posterior.quantiles[:, 1] <= posterior.quantiles[:, 2])
    assert torch.allclose(posterior.samples.mean(1), posterior.mean, atol=1e-5)
    plain = PosteriorSampler(generator, SamplerOptions(samples=9)).sample(x)
    assert plain.samples is None and plain.quantiles is None


def test_bf16_stays_close_to_fp32():
    generator, x = small_unet(), slices()
    fp32 = PosteriorSampler(generator, SamplerOptions(samples=8, seed=2)).sample(x)
    bf16 = PosteriorSampler(generator, SamplerOptions(samples=8, seed=2, precision="bf16")).sample(x)
    relative = (bf16.mean - fp32.mean).norm() / fp32.mean.norm()
    assert relative < 0.05


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        SamplerOptions(samples=1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        SamplerOptions(memory_budget_mb=0)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        PosteriorSampler(small_unet(), SamplerOptions(precision="fp16"), device="cpu")
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        PosteriorSampler(small_unet(), SamplerOptions(samples=2)).sample(torch.zeros(16, 16))


def test_gaussian_interval_covers_the_level():
    lower, upper = gaussian_interval(torch.zeros(1), torch.ones(1), 0.95)
    assert upper.item() == pytest.approx(1.959964, abs=1e-5) and lower.item() == pytest.approx(-1.959964, abs=1e-5)
