"""Adversarial losses and the generator / discriminator objectives of the paper.

The generator objective is pix2pix's (Isola et al. 2017) cGAN + lambda * L1,
plus the paper's KL term: the sum of the stochastic layers' regularizers
(zero for MC dropout, the concrete-dropout regularizer otherwise), weighted
by ``lambda_kl``. Adversarial losses are plugins; they take raw logits, so
each applies its own link (sigmoid for the vanilla GAN, none for LSGAN and
hinge) in a numerically stable way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


class AdversarialLoss(ABC):
    """Interface of adversarial-loss plugins. Stateless; works on raw logits."""

    @abstractmethod
    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Loss the generator minimizes, given the discriminator's logits on synthesized images."""

    @abstractmethod
    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Loss the discriminator minimizes: real term + fake term, not halved.

        :func:`discriminator_objective` applies pix2pix's factor 0.5.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _LabelDistanceLoss(AdversarialLoss):
    """Logits pulled towards label 1 (real) or 0 (fake) by :meth:`distance`."""

    @staticmethod
    @abstractmethod
    def distance(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean distance of ``logits`` to the labels ``target``."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.distance(fake_logits, torch.ones_like(fake_logits))

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        real = self.distance(real_logits, torch.ones_like(real_logits))
        fake = self.distance(fake_logits, torch.zeros_like(fake_logits))
        return real + fake


class VanillaGANLoss(_LabelDistanceLoss):
    """The original GAN loss as binary cross-entropy on logits (the paper's choice).

    The generator uses the non-saturating form, -log D(G(x)), as pix2pix
    does: it labels its fakes "real" instead of minimizing log(1 - D(G(x))),
    whose gradient vanishes while the discriminator wins easily.
    """

    distance = staticmethod(F.binary_cross_entropy_with_logits)


class LSGANLoss(_LabelDistanceLoss):
    """Least-squares GAN loss (Mao et al. 2017): squared distance of the logits to 1 (real) and 0 (fake)."""

    distance = staticmethod(F.mse_loss)


class HingeLoss(AdversarialLoss):
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018): D pushes real logits above 1 and fake below -1."""

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return -fake_logits.mean()

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_objective(
    adversarial: torch.Tensor,
    reconstruction: torch.Tensor,
    regularizer: torch.Tensor,
    *,
    lambda_l1: float = 100.0,
    lambda_kl: float = 100.0,
) -> dict[str, torch.Tensor]:
    """The generator's training loss: adversarial + lambda_l1 * likelihood + lambda_kl * KL.

    The likelihood term (the arm's :meth:`~uqsynth.likelihoods.Likelihood.loss`;
    pix2pix's L1 for the paper's ``l1``) keeps the synthesized image close to
    the truth at low frequencies (pix2pix, lambda 100); the KL term is the
    paper's variational regularizer of the stochastic layers, also weighted 100.

    Args:
        adversarial: The adversarial loss's ``generator_loss`` (a scalar).
        reconstruction: The likelihood's loss of the true target (a scalar).
        regularizer: Sum of the stochastic layers' regularizers (a scalar).
        lambda_l1: Weight of the likelihood term.
        lambda_kl: Weight of the regularizer.

    Returns:
        ``{"total", "adversarial", "likelihood", "kl"}``; ``total`` is the weighted sum
        to backpropagate, the others are the unweighted terms, for logging.
    """
    total = adversarial + lambda_l1 * reconstruction + lambda_kl * regularizer
    return {"total": total, "adversarial": adversarial, "likelihood": reconstruction, "kl": regularizer}


def discriminator_objective(
    loss: AdversarialLoss, real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> torch.Tensor:
    """The discriminator's training loss: half the adversarial loss's ``discriminator_loss``.

    pix2pix halves it to slow the discriminator down relative to the
    generator (Isola et al. 2017, section 3.3).
    """
    return 0.5 * loss.discriminator_loss(real_logits, fake_logits)
