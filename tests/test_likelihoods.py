"""Likelihoods: the contract for each built-in, what each one learns, and the engine's two parts of the variance."""

from __future__ import annotations

import functools

import pytest
import torch

from uqsynth.config import load_config
from uqsynth.errors import ConfigError
from uqsynth.likelihoods import L1, Gaussian, Laplace, Likelihood
from uqsynth.models.unet import UnetGenerator
from uqsynth.layers import MCDropout
from uqsynth.plugins import get_host
from uqsynth.posterior import PosteriorSampler, SamplerOptions
from uqsynth.testing import check_likelihood, parametrize_likelihood_checks

BUILT_INS = [L1, Laplace, Gaussian, functools.partial(Laplace, min_scale=1e-2, max_scale=1.0)]


@parametrize_likelihood_checks(BUILT_INS)
def test_builtin_likelihoods_pass_the_contract(factory, check):
    check(factory)


class _Unbounded(Likelihood):
    """A free log-scale: what the contract exists to refuse."""

    channels = 2

    def loss(self, output, target):
        return ((target - output[:, :1]).abs() * torch.exp(-output[:, 1:]) + output[:, 1:]).mean()

    def mean(self, output):
        return output[:, :1]

    def variance(self, output):
        return 2 * torch.exp(2 * output[:, 1:])


def test_the_contract_refuses_a_scale_that_can_collapse():
    with pytest.raises(AssertionError, match="check_variance_is_positive_and_bounded_below"):
        check_likelihood(_Unbounded)


def test_l1_is_the_papers_loss_and_laplace_at_unit_scale_is_l1_plus_nothing():
    output, target = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(L1().loss(output, target), torch.nn.functional.l1_loss(output, target))
    assert L1().variance(output) is None and L1().mean(output) is output
    laplace = Laplace(min_scale=0.5, max_scale=2.0)  # log b = log 0.5 + log 4 * sigmoid(0) = 0: b = 1 at r = 0
    raw = torch.cat([output, torch.zeros_like(output)], dim=1)
    torch.testing.assert_close(laplace.loss(raw, target), torch.nn.functional.l1_loss(output, target))
    torch.testing.assert_close(laplace.variance(raw), torch.full_like(output, 2.0))


@pytest.mark.parametrize(("likelihood", "noise", "variance"), [
    (Laplace(), lambda g, n: torch.distributions.Laplace(0.0, 0.05).sample((n,)), 2 * 0.05**2),
    (Gaussian(), lambda g, n: 0.05 * torch.randn(n, generator=g), 0.05**2),
])
def test_the_scale_learned_from_residuals_is_their_scale(likelihood, noise, variance):
    """Fitting a constant raw scale by the loss recovers the residuals' variance (the MLE)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    target = noise(generator, 20000).reshape(1, 1, 100, 200)
    raw_scale = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([raw_scale], lr=0.05)
    for _ in range(400):
        output = torch.cat([torch.zeros_like(target), raw_scale.expand_as(target)], dim=1)
        optimizer.zero_grad()
        likelihood.loss(output, target).backward()
        optimizer.step()
    output = torch.cat([torch.zeros_like(target), raw_scale.detach().expand_as(target)], dim=1)
    learned = float(likelihood.variance(output).mean())
    assert learned == pytest.approx(variance, rel=0.05)


def test_scale_bounds_are_checked_when_the_configuration_loads(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[arms.a]\nstochastic_layer = { name = "mc_dropout" }\n'
        'likelihood = { name = "laplace", min_scale = 0.5, max_scale = 0.1 }\n'
    )
    with pytest.raises(ConfigError, match="arms.a.likelihood.*min_scale must be below max_scale"):
        load_config(path, host=get_host())
    path.write_text('[arms.a]\nstochastic_layer = { name = "mc_dropout" }\nlikelihood = "lapalce"\n')
    with pytest.raises(Exception, match='arms.a.likelihood.*unknown likelihood "lapalce".*laplace'):
        load_config(path, host=get_host())


def _generator(out_channels: int) -> UnetGenerator:
    torch.manual_seed(0)
    return UnetGenerator(image_size=16, ngf=4, out_channels=out_channels,
                         stochastic_layer=lambda: MCDropout(p=0.5), positions=(1, 2))


def test_the_engine_sums_epistemic_and_aleatoric_variance():
    """Total = variance of the passes' means + mean of the passes' likelihood variances (checked against all passes)."""
    generator, likelihood = _generator(2).double(), Laplace()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    options = SamplerOptions(samples=6, seed=3, keep_samples=True)
    posterior = PosteriorSampler(generator, options, likelihood=likelihood).sample(x)
    # The same masks, drawn one full pass at a time in the engine's order (samples of a slice together).
    raw = []
    with torch.random.fork_rng(), torch.no_grad():
        from uqsynth.layers import sampling
        torch.manual_seed(3)
        generator.eval()
        with sampling(generator):
            raw = generator(x.repeat_interleave(6, dim=0)).reshape(3, 6, 2, 16, 16)
    means = raw[:, :, :1]
    torch.testing.assert_close(posterior.samples.double(), means, atol=1e-6, rtol=0)
    torch.testing.assert_close(posterior.epistemic_variance.double(), means.var(1), atol=1e-6, rtol=1e-5)
    aleatoric = torch.stack([likelihood.variance(raw[:, t]) for t in range(6)], 1).mean(1)
    torch.testing.assert_close(posterior.aleatoric_variance.double(), aleatoric, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(posterior.variance, posterior.epistemic_variance + posterior.aleatoric_variance)
    assert bool((posterior.aleatoric_variance > 0).all())


def test_an_l1_arm_has_no_aleatoric_part_and_its_variance_is_the_mc_variance():
    generator = _generator(1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    posterior = PosteriorSampler(generator, SamplerOptions(samples=4)).sample(x)
    assert posterior.aleatoric_variance is None
    assert torch.equal(posterior.variance, posterior.epistemic_variance)


@pytest.mark.parametrize("likelihood", [Laplace(), Gaussian()])
def test_beta_one_gives_the_mean_the_fixed_scale_gradient_wherever_the_scale_is(likelihood):
    """beta-NLL: a voxel the model calls uncertain still teaches the mean (the plain NLL divides its gradient by b)."""
    mean = torch.zeros(1, 1, 2, 2, requires_grad=True)
    raw_scale = torch.tensor([[[[-0.9, -0.3], [0.3, 0.9]]]])  # four very different scales
    target = torch.full((1, 1, 2, 2), 0.5)
    likelihood.loss(torch.cat([mean, raw_scale], dim=1), target).backward()
    expected = -torch.sign(target) / 4 if isinstance(likelihood, Laplace) else -target / 4
    torch.testing.assert_close(mean.grad, expected)
    plain = type(likelihood)(beta=0.0)
    mean.grad = None
    plain.loss(torch.cat([mean, raw_scale], dim=1), target).backward()
    assert float(mean.grad.abs().max() / mean.grad.abs().min()) > 5  # the plain NLL: gradients by scale


#: sha256 of the generators' weights after the training below, computed with uqsynth 0.3.0 as it was before the
#: likelihood kind existed (commit 1789113, torch 2.14.1, one CPU thread): the paper's arms must not move a bit.
#: Per CPU capability (``torch.backends.cpu.get_cpu_capability()``): torch picks its kernels by it, and AVX2
#: and AVX-512 convolutions round differently, so each has its own reference (both computed at 1789113).
BEFORE_LIKELIHOODS = {
    "torch": "2.14.1",
    "AVX512": {
        "mc": "6348efbc748a21a3f0118b195a02775530144fdde5b1921ec063d5e3a3175299",
        "concrete": "666f954528af3b336d7ffc8ec731dc53df7a32ca22a8a079dc360abf2cb224c2",
    },
    "AVX2": {
        "mc": "cb12921ed67d642d9e68e87e4fdb4f2498be13fd6118e5330b36c18aa6e54fc6",
        "concrete": "527c3df2718ca5a6d43d414af4eb78841b0c6768427ba3182044d90b966b9147",
    },
}

TINY_RUN = """
[run]
seed = 0
[data]
source = "phantom"
image_size = 32
test_fraction = 0.5
[data.phantom]
subjects = 4
shape = [40, 40, 32]
[model]
generator = { name = "unet", ngf = 8 }
discriminator = { name = "patchgan", ndf = 8 }
[train]
epochs = 2
batch_size = 4
max_steps_per_epoch = 3
lr = 1e-3
[arms.mc]
stochastic_layer = { name = "mc_dropout", p = 0.5 }
likelihood = "l1"
[arms.concrete]
stochastic_layer = { name = "concrete_dropout" }
likelihood = "l1"
"""


def test_l1_arms_train_the_same_weights_bit_for_bit_as_before_likelihoods(tmp_path):
    import hashlib

    from safetensors.torch import load_file

    from uqsynth.pipeline import RunContext, prepare, stage_train

    if not torch.__version__.startswith(BEFORE_LIKELIHOODS["torch"]):
        pytest.skip(f"the reference weights were computed with torch {BEFORE_LIKELIHOODS['torch']}, "
                    f"this is {torch.__version__} (its kernels may round differently)")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in BEFORE_LIKELIHOODS:
        pytest.skip(f"no reference weights for this CPU's kernels ({capability}); they exist for "
                    f"{', '.join(k for k in BEFORE_LIKELIHOODS if k != 'torch')}")
    reference = BEFORE_LIKELIHOODS[capability]
    (tmp_path / "run.toml").write_text(TINY_RUN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference: a convolution's rounding may depend on the thread count
    try:
        host = get_host()
        context = RunContext(load_config(tmp_path / "run.toml", host=host), host, tmp_path / "run", torch.device("cpu"))
        (tmp_path / "run").mkdir()
        prepare(context)
        stage_train(context)
    finally:
        torch.set_num_threads(threads)
    for arm in ("mc", "concrete"):
        state = load_file(tmp_path / "run" / arm / "generator.safetensors")
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].contiguous().numpy().tobytes())
        assert digest.hexdigest() == reference[arm], f"arm {arm}: the weights changed ({capability} kernels)"


def test_a_run_says_each_arms_likelihood(tmp_path):
    from pathlib import Path

    from uqsynth.pipeline import describe_run

    host = get_host()
    config = load_config(Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml", host=host,
                         overrides=["data.source=phantom"])
    lines = describe_run(config, host, tmp_path, torch.device("cpu"), smoke=False)
    assert any(line.startswith("arm mc_dropout:") and line.endswith("likelihood l1") for line in lines)
    assert any(line.startswith("arm concrete_laplace:") and line.endswith("likelihood laplace") for line in lines)
