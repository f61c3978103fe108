"""Tests of the adversarial losses and of the generator / discriminator objectives."""

from __future__ import annotations

import math

import pytest
import torch

from uqsynth.likelihoods import L1

from uqsynth.losses import (
    AdversarialLoss,
    HingeLoss,
    LSGANLoss,
    VanillaGANLoss,
    discriminator_objective,
    generator_objective,
)

REAL = torch.tensor([0.0, 2.0])
FAKE = torch.tensor([-1.0, 0.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Hand-computed for REAL and FAKE: (discriminator loss, generator loss on FAKE).
EXPECTED = {
    # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
    VanillaGANLoss: (
        (softplus(0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(0.0)) / 2,
        (softplus(1.0) + softplus(0.0)) / 2,
    ),
    # real: ((0-1)^2 + (2-1)^2)/2 = 1, fake: ((-1)^2 + 0^2)/2 = 0.5; G: ((-2)^2 + (-1)^2)/2
    LSGANLoss: (1.5, 2.5),
    # real: (relu(1) + relu(-1))/2 = 0.5, fake: (relu(0) + relu(1))/2 = 0.5; G: -mean(FAKE)
    HingeLoss: (1.0, 0.5),
}
LOSSES = list(EXPECTED)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_losses_match_hand_computed_values(loss_type):
    loss = loss_type()
    d_expected, g_expected = EXPECTED[loss_type]
    assert loss.discriminator_loss(REAL, FAKE).item() == pytest.approx(d_expected, rel=1e-6)
    assert loss.generator_loss(FAKE).item() == pytest.approx(g_expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_discriminator_objective_is_half_the_loss(loss_type):
    d_expected, _ = EXPECTED[loss_type]
    halved = discriminator_objective(loss_type(), REAL, FAKE)
    assert halved.item() == pytest.approx(0.5 * d_expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_losses_reward_the_right_player(loss_type):
    loss = loss_type()
    confident, fooled = torch.full((4,), 3.0), torch.full((4,), -3.0)
    assert loss.discriminator_loss(confident, fooled) < loss.discriminator_loss(fooled, confident)
    assert loss.generator_loss(confident) < loss.generator_loss(fooled)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_losses_take_patch_maps_and_backpropagate(loss_type):
    real = torch.randn(2, 1, 6, 6, requires_grad=True)
    fake = torch.randn(2, 1, 6, 6, requires_grad=True)
    loss = loss_type()
    (loss.discriminator_loss(real, fake) + loss.generator_loss(fake)).backward()
    assert real.grad.abs().sum() > 0 and fake.grad.abs().sum() > 0


def test_vanilla_loss_is_stable_for_large_logits():
    huge = torch.tensor([1e4, -1e4])
    loss = VanillaGANLoss()
    assert torch.isfinite(loss.discriminator_loss(huge, -huge))
    assert torch.isfinite(loss.generator_loss(-huge))


def test_adversarial_loss_is_abstract():
    with pytest.raises(TypeError):
        AdversarialLoss()
    assert repr(HingeLoss()) == "HingeLoss()"


def test_generator_objective_weights_the_terms():
    fake = torch.zeros(1, 1, 2, 2, requires_grad=True)
    real = torch.full((1, 1, 2, 2), 0.5)
    adversarial, regularizer = torch.tensor(0.3), torch.tensor(0.01)
    reconstruction = L1().loss(fake, real)
    terms = generator_objective(adversarial, reconstruction, regularizer)
    assert set(terms) == {"total", "adversarial", "likelihood", "kl"}
    assert terms["likelihood"].item() == pytest.approx(0.5)
    assert terms["kl"] is regularizer and terms["adversarial"] is adversarial
    assert terms["total"].item() == pytest.approx(0.3 + 100 * 0.5 + 100 * 0.01)
    custom = generator_objective(adversarial, reconstruction, regularizer, lambda_l1=10.0, lambda_kl=0.0)
    assert custom["total"].item() == pytest.approx(0.3 + 10 * 0.5)
    terms["total"].backward()
    torch.testing.assert_close(fake.grad, torch.full_like(fake, -100 / 4))
