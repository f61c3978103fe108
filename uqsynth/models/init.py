"""Weight initialization of the pix2pix networks."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Initialize weights as pix2pix does with ``init_type='normal'`` (Isola et al. 2017).

    Convolution, transposed-convolution and linear weights are drawn from
    N(0, gain) and their biases zeroed; batch-norm scales are drawn from
    N(1, gain) and their shifts zeroed. The small spread keeps the initial
    generator close to a linear map, which pix2pix found stable for GAN
    training. Other parameters (for example a concrete-dropout probability)
    are left as their modules set them. The tensors are changed in place, so
    references to them (see ``StochasticLayer.attach_weights``) stay valid.

    Args:
        module: The network; every submodule is visited.
        gain: Standard deviation of the normal distributions.

    Returns:
        ``module``, for chaining.
    """
    for layer in module.modules():
        if isinstance(layer, (_ConvNd, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, _BatchNorm) and layer.affine:
            nn.init.normal_(layer.weight, 1.0, gain)
            nn.init.zeros_(layer.bias)
    return module
