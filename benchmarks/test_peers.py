"""uqsynth's engine against the peers' own MC-dropout samplers, side by side, on the paper's U-Net.

Why: the sampling suite's ``naive_loop`` and ``batch_repeat`` are our
renderings of the usual ways; this suite runs the usual ways as their
packages ship them, torch-uncertainty's ``mc_dropout`` wrapper and baal's
``MCDropoutModule`` / ``MCCachingModule``, on the same seeded weights and
slices as ``test_sampling_throughput.py`` (``paper_generator``, ``slices``),
in one run::

    pip install -e ".[test,bench]"
    pytest --benchmark-only -m peers --benchmark-json peers.json && python -m benchmarks._table peers.json

The peers find dropout by type (``torch.nn.Dropout``), and the paper's U-Net
carries uqsynth's ``MCDropout`` layers, so each peer wraps a copy of the same
network, same weights, with ``torch.nn.Dropout(p=0.5)`` in the same three
slots (``benchmarks._peers.torch_dropout_copy``, which says why). The
engine's rows run uqsynth's own generator.

The peers draw other masks than the engine (another seed), so their maps are
compared statistically: per voxel, the difference of the means and of the
stds in units of its T-sample standard error (``benchmarks._peers.agreement``):
``extra_info`` has the RMS z and the fraction of voxels beyond 3 standard
errors of both maps, whether they are within the tolerance (``agrees``), and
the same figures for the engine against itself with the peers' seed
(``null_*``), which is what Monte Carlo noise alone gives.

Default 256x256, T=20, 4 slices on a CPU (32 on CUDA); ``UQSYNTH_BENCH_PEERS_SIZE``
and ``UQSYNTH_BENCH_PEERS_T`` shrink it for a check (e.g. 64 and 4), and
``UQSYNTH_BENCH_SLICES``, ``UQSYNTH_BENCH_ROUNDS`` and ``UQSYNTH_BENCH_FAST``
mean what they mean in the sampling suite. Without torch-uncertainty or baal
their benchmarks skip, saying how to install them.
"""

from __future__ import annotations

import functools
from importlib.metadata import version

import pytest
import torch

from benchmarks._bench import (
    SAMPLING_SEED, Tracked, bench_device, device_name, env_int, median_seconds, paper_generator, slices,
)
from benchmarks._peers import agreement, baal_sampler, engine_sampler, tolerance, torch_uncertainty_sampler

SIZE = env_int("UQSYNTH_BENCH_PEERS_SIZE", 256)
SAMPLES = env_int("UQSYNTH_BENCH_PEERS_T", 20)
DEVICE = bench_device()
SLICES = env_int("UQSYNTH_BENCH_SLICES", 32 if DEVICE.type == "cuda" else 4)
ROUNDS = env_int("UQSYNTH_BENCH_ROUNDS", 10 if DEVICE.type == "cuda" else 3)
#: Other masks than the engine's: the comparison is of two Monte Carlo estimates, not of arithmetic.
PEER_SEED = SAMPLING_SEED + 1

#: strategy -> (distribution, how it draws the T samples)
STRATEGIES = {
    "engine": ("uqsynth", "prefix once per slice, the rest batched over samples (fp32)"),
    "engine_fast": ("uqsynth", "the engine with the device's fast options"),
    "tu_mc_dropout_batch": ("torch-uncertainty", "mc_dropout(on_batch=True): the batch repeated T times, one pass"),
    "tu_mc_dropout_loop": ("torch-uncertainty", "mc_dropout(on_batch=False): T passes in a loop"),
    "baal_mc_dropout_replicate": ("baal", "MCDropoutModule, predict_on_batch(replicate_in_memory=True): one pass"),
    "baal_mc_dropout_loop": ("baal", "MCDropoutModule, predict_on_batch(replicate_in_memory=False): T passes"),
    "baal_mc_caching_loop": ("baal", "MCCachingModule(MCDropoutModule), replicate_in_memory=False: T passes, "
                                     "encoder convolutions cached"),
}
ADAPTATION = "a copy of the same U-Net (same weights) with torch.nn.Dropout(p=0.5) in the three MCDropout slots"


@functools.cache
def generator() -> torch.nn.Module:
    return paper_generator(SIZE, DEVICE)


@functools.cache
def inputs() -> torch.Tensor:
    return slices(SLICES, SIZE, device=DEVICE)


@functools.cache
def engine_maps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 engine's mean and std maps with ``seed``: the reference, and (other seed) its own noise."""
    run, _ = engine_sampler(generator(), DEVICE, SAMPLES, seed, fast=False)
    return run(inputs())


def strategy_run(strategy: str):
    """The callable to time for ``strategy``, and its options (built untimed, as a user builds a wrapper once)."""
    net = generator()
    if strategy.startswith("engine"):
        return engine_sampler(net, DEVICE, SAMPLES, SAMPLING_SEED, fast=strategy == "engine_fast")
    if strategy.startswith("tu_"):
        return torch_uncertainty_sampler(net, SAMPLES, PEER_SEED, on_batch=strategy.endswith("batch")), None
    caching, replicate = "caching" in strategy, strategy.endswith("replicate")
    return baal_sampler(net, SAMPLES, PEER_SEED, caching=caching, replicate=replicate), None


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}{key}": value for key, value in values.items()}


@pytest.mark.peers
@pytest.mark.parametrize("strategy", list(STRATEGIES), ids=lambda s: f"peers-{SIZE}px-T{SAMPLES}-{s}")
def test_peer_sampling(benchmark, strategy):
    run, options = strategy_run(strategy)
    x = inputs()
    benchmark.group = f"peers: unet {SIZE}x{SIZE}, T={SAMPLES}, {SLICES} slices"
    tracked = Tracked(run, DEVICE)
    mean, std = benchmark.pedantic(tracked, args=(x,), rounds=ROUNDS, warmup_rounds=1, iterations=1)

    seconds = median_seconds(benchmark)
    package, how = STRATEGIES[strategy]
    ref_mean, ref_std = engine_maps(SAMPLING_SEED)
    info = {
        "suite": "peers",
        "strategy": strategy,
        "package": package,
        "package_version": version(package),
        "how": how,
        "adaptation": None if package == "uqsynth" else ADAPTATION,
        "generator": "unet",
        "image_size": SIZE,
        "samples": SAMPLES,
        "slices": SLICES,
        "device": device_name(DEVICE),
        "options": options,
        "seconds": seconds,
        "slice_samples_per_s": SLICES * SAMPLES / seconds,
        "peak_memory_mb": tracked.peak(skip=1),
        "memory_measure": tracked.how,
        "other_load_cores": tracked.other_load(skip=1),
        "seed": SAMPLING_SEED if package == "uqsynth" else PEER_SEED,
        "reference": f"the float32 engine's maps (seed {SAMPLING_SEED})",
        **_prefixed("vs_engine_", agreement(mean, std, ref_mean, ref_std, SAMPLES)),
        **_prefixed("null_", agreement(*engine_maps(PEER_SEED), ref_mean, ref_std, SAMPLES)),
        **_prefixed("tolerance_", tolerance(SAMPLES)),
    }
    benchmark.extra_info.update(info)
