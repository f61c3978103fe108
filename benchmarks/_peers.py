"""The peers' Monte Carlo dropout samplers on the paper's U-Net, and how their maps are compared with the engine's.

Why a module of its own: torch-uncertainty and baal are optional (the
``bench`` extra), so nothing here imports them before a benchmark asks for
one; without them that benchmark skips, saying how to install them, and the
plain ``python -m pytest`` never touches them.

Both peers find dropout by its type. torch-uncertainty's ``mc_dropout``
wrapper keeps every ``torch.nn.modules.dropout._DropoutNd`` in train mode
while the rest of the network is in eval mode; baal's ``MCDropoutModule``
swaps every ``torch.nn.Dropout`` / ``Dropout2d`` for its own always-on
dropout. uqsynth's :class:`~uqsynth.layers.MCDropout` is a
:class:`~uqsynth.layers.StochasticLayer`, switched by ``uqsynth.sampling``
and not by the module's mode, so neither peer sees it (torch-uncertainty
refuses the model, baal warns that it patched nothing). The one adaptation,
:func:`torch_dropout_copy`: a copy of the same network, same weights and
buffers, with a ``torch.nn.Dropout`` of the same p in each of the three
dropout slots (element-wise Bernoulli masks scaled by 1 / (1 - p), the
distribution of ``MCDropout(p)``), computing each decoder step as pix2pix does
(concatenate, then one convolution), as the suite's other baselines do.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import pytest
import torch

from benchmarks._bench import engine, fast_options, make_sampler, seeded
from uqsynth.models.unet import UnetGenerator

INSTALL_HINT = 'the peers are in the bench extra: pip install -e ".[test,bench]"'

#: A peer's strategy: (slices) -> (mean, std) maps on the CPU, float32.
Strategy = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- uqsynth's engine


def engine_sampler(
    generator: UnetGenerator, device: torch.device, samples: int, seed: int, *, fast: bool
) -> tuple[Strategy, dict]:
    """The engine on uqsynth's own generator, float32 or with the device's fast options, and those options."""
    options = {"precision": "fp32", "channels_last": False, "compile": False}
    if fast:
        options.update(fast_options(device))
    return functools.partial(engine, make_sampler(generator, device, samples, seed=seed, **options)), options


# --------------------------------------------------------------------------- the adaptation


def torch_dropout_copy(generator: UnetGenerator) -> UnetGenerator:
    """A deep copy of ``generator`` with ``torch.nn.Dropout(p)`` where its ``MCDropout(p)`` layers are.

    Dropout has no parameters or buffers, so the state dict is the same,
    key for key. No uqsynth stochastic layer is left to say the network is
    sampling, so the engine's split of the skip convolutions stays off: the
    peers run pix2pix's computation, as ``naive_loop`` and ``batch_repeat`` do.
    """
    twin = copy.deepcopy(generator)
    for block in twin.ups:
        if block.stochastic is not None:
            block.stochastic = torch.nn.Dropout(p=block.stochastic.p)
    twin.caches_skip_parts = lambda: False
    return twin


# --------------------------------------------------------------------------- torch-uncertainty


def torch_uncertainty_sampler(generator: UnetGenerator, samples: int, seed: int, *, on_batch: bool) -> Strategy:
    """``torch_uncertainty.methods.mc_dropout`` on the adapted copy: the batch repeated T times, or a loop of T passes.

    The wrapper returns the T passes estimator-major, ``(T * n, C, H, W)``
    (``einops.repeat(x, "b ... -> (m b) ...")`` or ``torch.cat`` of the loop).
    ``task="pixel_regression"`` with ``probabilistic=False`` is its mode for
    a network that outputs an image.
    """
    pytest.importorskip("torch_uncertainty", reason=f"torch-uncertainty is not installed; {INSTALL_HINT}")
    from torch_uncertainty.methods import mc_dropout

    model = mc_dropout(
        torch_dropout_copy(generator), num_estimators=samples, on_batch=on_batch,
        task="pixel_regression", probabilistic=False,
    )
    model.eval()  # its train(False): the network in eval mode, its dropout layers in train mode
    device = next(generator.parameters()).device

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded(device, seed):
            draws = model(x)
        draws = draws.reshape(samples, x.shape[0], *draws.shape[1:])
        return draws.mean(0).float().cpu(), draws.std(0).float().cpu()

    return run


# --------------------------------------------------------------------------- baal


def baal_sampler(generator: UnetGenerator, samples: int, seed: int, *, caching: bool, replicate: bool) -> Strategy:
    """baal's ``MCDropoutModule`` (and ``MCCachingModule`` on top) on the adapted copy, through ``ModelWrapper``.

    ``ModelWrapper.predict_on_batch(x, iterations=T)`` is baal's way to
    draw: with ``replicate_in_memory=True`` (its default) one pass over the
    batch stacked T times, else a loop of T passes; it returns ``(n, C, H,
    W, T)``. ``MCCachingModule`` wraps every ``nn.Conv2d`` and ``nn.Linear``
    in an ``LRUCacheModule`` that returns its last output when its input is
    equal to the last one (``torch.equal``), so in the loop the encoder's
    convolutions run once (the decoder's are ``ConvTranspose2d``, which it
    does not wrap); baal recommends it with ``replicate_in_memory=False``
    and warns otherwise. Its caches are emptied before every call, as a new
    batch of slices would: the benchmark calls it on the same slices each
    round, which would otherwise be served from the previous round.
    """
    pytest.importorskip("baal", reason=f"baal is not installed; {INSTALL_HINT}")
    from baal.bayesian.caching_utils import LRUCacheModule, MCCachingModule
    from baal.bayesian.dropout import MCDropoutModule
    from baal.modelwrapper import ModelWrapper, TrainingArgs

    device = next(generator.parameters()).device
    model = MCDropoutModule(torch_dropout_copy(generator))
    if caching:
        model = MCCachingModule(model)
    model.eval()
    # use_cuda only moves the batch with .cuda(): the slices are on the device already (any device, cuda:1 too).
    wrapper = ModelWrapper(model, TrainingArgs(replicate_in_memory=replicate, use_cuda=False))
    caches = [m for m in model.modules() if isinstance(m, LRUCacheModule)]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for cache in caches:
            cache._memory_input = cache._memory_output = None
        with seeded(device, seed):
            draws = wrapper.predict_on_batch(x, iterations=samples)
        return draws.mean(-1).float().cpu(), draws.std(-1).float().cpu()

    return run


# --------------------------------------------------------------------------- agreement

#: The tolerance, in multiples of what Monte Carlo noise alone gives (see :func:`tolerance`).
BEYOND_3SE_FACTOR, RMS_Z_FACTOR = 2.0, 1.25


def tolerance(samples: int) -> dict[str, float]:
    """What two T-sample estimates of the same posterior give, and the limits :func:`agreement` allows.

    Their z (below) is close to Student's t with ``2 (T - 1)`` degrees of
    freedom (Welch's, for equal sample sizes): a fraction
    ``2 * t.sf(3, 2 (T - 1))`` of voxels beyond 3 (0.47 % at T = 20, 2.4 % at
    T = 4, against 0.27 % for a normal z) and an RMS of
    ``sqrt(nu / (nu - 2))`` (1.03 at T = 20). Neighbouring voxels share their
    masks, so the fraction varies more from run to run than a binomial count
    would: the limits are twice the expected fraction and 1.25 times the
    expected RMS.
    """
    from scipy.stats import t

    nu = 2 * (samples - 1)
    beyond = float(2 * t.sf(3.0, nu))
    rms = math.sqrt(nu / (nu - 2)) if nu > 2 else None  # T = 2: t with 2 degrees of freedom has no variance
    return {
        "expected_beyond_3se": beyond,
        "expected_rms_z": rms,
        "max_beyond_3se": BEYOND_3SE_FACTOR * beyond,
        "max_rms_z": None if rms is None else RMS_Z_FACTOR * rms,
    }


def _z_summary(z: torch.Tensor) -> dict[str, float]:
    return {"rms_z": float(z.square().mean().sqrt()), "beyond_3se": float((z.abs() > 3).double().mean())}


def agreement(
    mean: torch.Tensor, std: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor, samples: int
) -> dict[str, float | int | bool]:
    """How far two T-sample mean and std maps are apart, in units of their Monte Carlo standard error.

    The two runs draw other masks, so they differ by Monte Carlo noise even
    when they sample the same posterior. Per voxel, with T samples each:

    - mean: ``z = (m1 - m2) / sqrt(s1^2 / T + s2^2 / T)``;
    - std: ``z = (s1 - s2) / sqrt(s1^2 + s2^2) * sqrt(2 (T - 1))`` (the sample
      std's standard error is about ``s / sqrt(2 (T - 1))`` for a normal draw;
      draws far from normal make it larger).

    ``agrees`` when both maps are within :func:`tolerance`. Voxels whose
    both stds are below 1e-6 (every draw the same) have no scale and are
    left out (``voxels`` counts the rest).
    """
    m1, s1, m2, s2 = (t.double().flatten() for t in (mean, std, ref_mean, ref_std))
    spread = s1.square() + s2.square()
    valid = spread > 1e-12
    spread = spread[valid]
    z_mean = (m1[valid] - m2[valid]) / (spread / samples).sqrt()
    z_std = (s1[valid] - s2[valid]) / spread.sqrt() * math.sqrt(2 * (samples - 1))
    limits = tolerance(samples)
    result: dict[str, float | int | bool] = {"voxels": int(valid.sum())}
    for name, z in (("mean", z_mean), ("std", z_std)):
        for key, value in _z_summary(z).items():
            result[f"{name}_{key}"] = value
    max_rms = math.inf if limits["max_rms_z"] is None else limits["max_rms_z"]
    result["agrees"] = all(
        result[f"{name}_beyond_3se"] <= limits["max_beyond_3se"] and result[f"{name}_rms_z"] <= max_rms
        for name in ("mean", "std")
    )
    return result
