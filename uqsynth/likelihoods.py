"""Likelihoods: the per-voxel observation model of a generator's output.

MC dropout measures how much the network's *weights* are uncertain
(epistemic). What a T1w cannot determine about the T2w (noise, bias,
tissues that look alike in T1w) is aleatoric, and only a model of the
observation itself can say it: the network predicts, per voxel, the
parameters of a distribution of the truth, trained by its negative log
likelihood (Kendall & Gal 2017, "What uncertainties do we need in Bayesian
deep learning for computer vision?"). A likelihood plugin says

- how many output channels the generator needs (:attr:`Likelihood.channels`;
  uqsynth passes ``out_channels`` to the generator),
- the training loss term (:meth:`Likelihood.loss`, weighted by ``train.lambda_l1``),
- per voxel, from the raw output of one forward pass, the predictive mean
  (:meth:`Likelihood.mean`, the image the discriminator judges) and variance
  (:meth:`Likelihood.variance`; ``None`` for a model without one).

The sampling engine combines T stochastic passes by the law of total
variance: total = epistemic (the variance of the T means) + aleatoric (the
mean of the T variances). Built-ins:

- ``l1``, the paper's: a Laplace of fixed scale, whose negative log likelihood
  is the L1 loss; one channel, no aleatoric variance. The default, so the
  paper's arms are what they were, bit for bit.
- ``laplace``: a heteroscedastic Laplace, channels (mean, scale ``b``), loss
  ``|y - mu| / b + log b`` per voxel (L1 is its ``b = 1`` case), variance ``2 b^2``.
- ``gaussian``: channels (mean, scale ``sigma``), loss
  ``(y - mu)^2 / (2 sigma^2) + log sigma`` per voxel, variance ``sigma^2``.

Trained by the plain negative log likelihood, a heteroscedastic model
neglects its mean exactly where it is uncertain: the mean's gradient is
the L1's divided by ``b``, so voxels the network calls hard (large ``b``: the
brain) stop teaching the mean, and voxels it fits exactly (small ``b``: the
background) dominate. On the phantom main job this gave a blurry brain and
RMSE 62.6 on [0, 255] against 30 for the paper's L1. The remedy is
Seitzer et al.'s beta-NLL ("On the pitfalls of heteroscedastic uncertainty
estimation with probabilistic neural networks", ICLR 2022): each voxel's
negative log likelihood is weighted by its own scale to the power ``beta``,
held constant (no gradient). With ``beta = 1`` (the default) the mean's
gradient is the L1's (Laplace) or the squared error's (Gaussian), so the
mean trains as the paper's, while the scale still goes to its maximum
likelihood value (the weight does not move the zero of the scale's
gradient); ``beta = 0`` is the plain negative log likelihood.

The scale is guarded against collapse by a **bounded log-scale**: the raw
scale channel ``r`` maps to ``log s = log min_scale + (log max_scale - log
min_scale) * sigmoid(2 r)``, so ``min_scale < s < max_scale`` for every
``r``. Why a bound rather than a free log-scale: on voxels the network fits
exactly (the background, flat tissue), the likelihood rewards ``s -> 0``
without limit, a free log-scale drifts there, and the loss and its
gradient (``1 / s``) blow up; a floor on ``s`` is also what a voxel's
round-off std must never go below downstream. Scales are in the generator's
output units ([-1, 1] for the [0, 1] normalized image): the default floor
1e-3 is 0.13 on the report's [0, 255] scale, far below any error the models
make and far above round-off. A Tanh-ended generator (the U-Nets) gives
``r`` in (-1, 1), so ``sigmoid(2 r)`` stays in (0.12, 0.88): with the default
bounds (1e-3, 10), ``s`` lies in (3.0e-3, 3.3) and starts near their
geometric middle, 0.1 (at ``r = 0``), about the error of a first guess.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Annotated

import torch
import torch.nn.functional as F

from uqsynth.config import Interval, Rule

_POSITIVE = Interval(0.0, None, closed="neither")


class Likelihood(ABC):
    """Interface of likelihood plugins: the observation model of a generator's raw output.

    A generator built for a likelihood returns ``(N, channels, H, W)``
    (one target image channel, as the paper's). Implementations are
    stateless functions of that output: they own no parameters, so the
    generator's weights are all there is to save.

    Attributes:
        channels: Raw output channels per voxel (1 for a fixed-scale model).
    """

    channels: int = 1

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of ``target`` ``(N, 1, H, W)``: a mean over voxels of its negative log likelihood.

        Up to a constant; the built-in heteroscedastic ones weight each voxel
        by beta-NLL's held-constant ``scale ** beta`` (module docstring). A scalar.
        """

    @abstractmethod
    def mean(self, output: torch.Tensor) -> torch.Tensor:
        """The predictive mean ``(N, 1, H, W)`` of one forward pass: the synthesized image."""

    @abstractmethod
    def variance(self, output: torch.Tensor) -> torch.Tensor | None:
        """The aleatoric variance ``(N, 1, H, W)`` of one forward pass, or ``None`` when the model has none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def check_output(self, output: torch.Tensor) -> None:
        """Refuse an output without :attr:`channels` channels (a generator built for another likelihood)."""
        if output.dim() != 4 or output.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} needs generator outputs of shape (N, {self.channels}, H, W), "
                f"got {tuple(output.shape)}"
            )


class L1(Likelihood):
    """The paper's L1 loss: a Laplace of fixed scale, one channel, no aleatoric variance."""

    channels = 1

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(output, target)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def variance(self, output: torch.Tensor) -> None:
        return None


class _LocationScale(Likelihood):
    """Two channels, (mean, raw scale), with the scale bounded as the module docstring says."""

    channels = 2
    param_rules = (Rule(lambda min_scale, max_scale: min_scale < max_scale, "min_scale must be below max_scale"),)

    def __init__(
        self,
        *,
        min_scale: Annotated[float, _POSITIVE] = 1e-3,
        max_scale: Annotated[float, _POSITIVE] = 10.0,
        beta: Annotated[float, Interval(0.0, 1.0)] = 1.0,
    ) -> None:
        if not 0.0 < min_scale < max_scale:
            raise ValueError(f"need 0 < min_scale < max_scale, got min_scale {min_scale} and max_scale {max_scale}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.beta = beta

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.check_output(output)
        scale = self.scale(output)
        nll = self.negative_log_likelihood(output[:, :1], scale, target)
        if self.beta:  # beta-NLL: each voxel weighted by its own scale ** beta, held constant
            nll = nll * self.weight(scale.detach())
        return nll.mean()

    def negative_log_likelihood(self, mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per voxel, up to a constant."""
        raise NotImplementedError

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        """The beta-NLL weight of each voxel, which makes the mean's gradient the fixed-scale loss's at ``beta = 1``."""
        raise NotImplementedError

    def scale(self, output: torch.Tensor) -> torch.Tensor:
        """The bounded scale ``(N, 1, H, W)``: ``b`` (Laplace) or ``sigma`` (Gaussian)."""
        low, high = math.log(self.min_scale), math.log(self.max_scale)
        return torch.exp(low + (high - low) * torch.sigmoid(2.0 * output[:, 1:2]))

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, :1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_scale={self.min_scale:g}, max_scale={self.max_scale:g}, beta={self.beta:g})"


class Laplace(_LocationScale):
    """Heteroscedastic Laplace: loss ``|y - mu| / b + log b`` (L1 at ``b = 1``), variance ``2 b^2``.

    Args:
        min_scale: Floor of ``b`` in the generator's output units (see the module docstring).
        max_scale: Ceiling of ``b``.
        beta: beta-NLL's exponent: voxels weighted by ``b ** beta`` (no gradient); 0 is the plain NLL.
    """

    def negative_log_likelihood(self, mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (target - mean).abs() / scale + scale.log()

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        return scale if self.beta == 1.0 else scale.pow(self.beta)

    def variance(self, output: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.scale(output).square()


class Gaussian(_LocationScale):
    """Heteroscedastic Gaussian: loss ``(y - mu)^2 / (2 sigma^2) + log sigma``, variance ``sigma^2``.

    Args:
        min_scale: Floor of ``sigma`` in the generator's output units (see the module docstring).
        max_scale: Ceiling of ``sigma``.
        beta: beta-NLL's exponent: voxels weighted by ``sigma ** (2 beta)`` (no gradient); 0 is the plain NLL.
    """

    def negative_log_likelihood(self, mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (target - mean).square() / (2.0 * scale.square()) + scale.log()

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.pow(2.0 * self.beta)

    def variance(self, output: torch.Tensor) -> torch.Tensor:
        return self.scale(output).square()
