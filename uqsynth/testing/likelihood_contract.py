"""A reusable contract for likelihoods (:mod:`uqsynth.likelihoods`), like the layers' and calibrators'.

A likelihood turns a generator's raw output into a training loss and a
per-voxel predictive mean and variance; the engine sums those over Monte
Carlo passes, calibrators and metrics trust the result. Every likelihood,
built in or from a plugin, must therefore: declare its channels, give a
finite scalar loss with finite gradients for *any* raw output (a generator
early in training outputs anything), be smallest where the mean is the
truth, give a mean image of one channel, and give either no variance or a
positive, finite one, bounded away from zero whatever the raw output (a
variance that collapses to round-off is what made calibrators fail). A
plugin author tests a new likelihood in one line::

    from uqsynth.testing import check_likelihood

    def test_my_likelihood():
        check_likelihood(lambda: StudentT(dof=4))

or gets one pytest item per check with :func:`parametrize_with_checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from uqsynth.config import declaration_problems
from uqsynth.likelihoods import Likelihood
from uqsynth.testing._contract import parametrize, run_checks

LikelihoodFactory = Callable[[], Likelihood]
LikelihoodCheck = Callable[[LikelihoodFactory], None]

#: Batch, height and width of the raw outputs the checks feed a likelihood.
SHAPE = (2, 6, 6)

#: Raw outputs as extreme as this must still give finite losses and positive variances.
EXTREME = 30.0


def _raw(likelihood: Likelihood, *, scale: float = 1.0, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n, h, w = SHAPE
    return scale * (2 * torch.rand(n, likelihood.channels, h, w, generator=generator) - 1)


def _target(seed: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n, h, w = SHAPE
    return 2 * torch.rand(n, 1, h, w, generator=generator) - 1


def _name(factory: LikelihoodFactory) -> str:
    return repr(factory())


def check_is_likelihood(factory: LikelihoodFactory) -> None:
    """The factory builds a :class:`Likelihood` declaring a positive whole number of channels.

    Why: uqsynth builds the generator with ``out_channels = channels``; any
    other value would give a network whose outputs the likelihood misreads.
    """
    likelihood = factory()
    assert isinstance(likelihood, Likelihood), f"{type(likelihood).__name__} is not a Likelihood"
    channels = likelihood.channels
    assert isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1, (
        f"channels must be a positive int, got {channels!r}"
    )


def check_mean_is_one_channel(factory: LikelihoodFactory) -> None:
    """``mean`` gives ``(N, 1, H, W)``, finite, and does not depend on randomness.

    Why: the mean is the synthesized image: the discriminator judges it, and
    the engine averages it over passes; it must be a function of the output.
    """
    likelihood = factory()
    raw = _raw(likelihood)
    mean = likelihood.mean(raw)
    n, h, w = SHAPE
    assert tuple(mean.shape) == (n, 1, h, w), f"mean must have shape {(n, 1, h, w)}, got {tuple(mean.shape)}"
    assert bool(torch.isfinite(mean).all()), "the mean must be finite"
    assert torch.equal(mean, likelihood.mean(raw.clone())), "the mean must be a function of the output"


def check_variance_is_positive_and_bounded_below(factory: LikelihoodFactory) -> None:
    """``variance`` is ``None``, or ``(N, 1, H, W)``, finite and above a floor for every raw output.

    Why: the engine adds it to the epistemic variance, so a negative or
    infinite one corrupts every map; and a variance that can reach round-off
    (a free log-scale driven to -inf on voxels fitted exactly) is the zero
    std that calibrators cannot use. Checked at raw outputs up to
    ``+-EXTREME``.
    """
    likelihood = factory()
    n, h, w = SHAPE
    for scale in (1.0, EXTREME):
        for sign in (1.0, -1.0):
            raw = sign * _raw(likelihood, scale=scale)
            variance = likelihood.variance(raw)
            if variance is None:
                return
            assert tuple(variance.shape) == (n, 1, h, w), (
                f"variance must have shape {(n, 1, h, w)}, got {tuple(variance.shape)}"
            )
            assert bool(torch.isfinite(variance).all()), f"the variance is not finite at raw outputs of size {scale}"
            smallest = float(variance.min())
            assert smallest > 1e-10, (
                f"the variance falls to {smallest:.3g} at raw outputs of size {scale}: bound the scale away from zero"
            )


def check_loss_is_finite_with_finite_gradients(factory: LikelihoodFactory) -> None:
    """The loss is a finite scalar with finite, non-zero gradients, also at extreme raw outputs.

    Why: it is backpropagated at every training step, from the first one,
    when the generator's outputs are anything.
    """
    likelihood = factory()
    target = _target()
    for scale in (1.0, EXTREME):
        raw = _raw(likelihood, scale=scale).requires_grad_(True)
        loss = likelihood.loss(raw, target)
        assert loss.dim() == 0, f"the loss must be a scalar, got shape {tuple(loss.shape)}"
        assert bool(torch.isfinite(loss)), f"the loss is {float(loss)} at raw outputs of size {scale}"
        loss.backward()
        assert raw.grad is not None and bool(torch.isfinite(raw.grad).all()), (
            f"the loss gradient is not finite at raw outputs of size {scale}"
        )
        if scale == 1.0:
            assert bool((raw.grad != 0).any()), "the loss gradient is zero everywhere"


def check_loss_is_smallest_at_the_truth(factory: LikelihoodFactory) -> None:
    """With every other channel fixed, moving the mean away from the target raises the loss.

    Why: the loss must pull the synthesized image towards the truth; one
    that did not would train a generator to be wrong.
    """
    likelihood = factory()
    target = _target() * 0.5
    raw = _raw(likelihood, scale=0.5)
    on_target = raw.clone()
    on_target[:, :1] = target
    base = float(likelihood.loss(on_target, target))
    for shift in (0.2, -0.2):
        off = on_target.clone()
        off[:, :1] = target + shift
        assert float(likelihood.loss(off, target)) > base, (
            f"the loss with the mean {shift:+} from the target is not above the loss at the target"
        )
    assert torch.allclose(likelihood.mean(on_target), target), "the first channel must be the mean"


def check_declared_constraints(factory: LikelihoodFactory) -> None:
    """The constraints declared on the likelihood's parameters are sound (see :mod:`uqsynth.config`)."""
    problems = declaration_problems(type(factory()))
    assert not problems, "; ".join(problems)


#: Every check of the contract, in the order :func:`check_likelihood` runs them.
LIKELIHOOD_CHECKS: tuple[LikelihoodCheck, ...] = (
    check_is_likelihood,
    check_mean_is_one_channel,
    check_variance_is_positive_and_bounded_below,
    check_loss_is_finite_with_finite_gradients,
    check_loss_is_smallest_at_the_truth,
    check_declared_constraints,
)


def check_likelihood(factory: LikelihoodFactory) -> None:
    """Run every check of :data:`LIKELIHOOD_CHECKS` on the likelihoods built by ``factory``.

    Raises:
        AssertionError: At the first failed check, naming the check and the likelihood.
    """
    run_checks(LIKELIHOOD_CHECKS, factory, _name(factory))


def parametrize_with_checks(factories: Sequence[LikelihoodFactory]) -> pytest.MarkDecorator:
    """A pytest parametrization over every (factory, check) pair, one test item each (ids ``<repr>-<check>``)."""
    return parametrize(LIKELIHOOD_CHECKS, factories, _name)
