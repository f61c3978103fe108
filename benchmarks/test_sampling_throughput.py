"""Monte Carlo sampling throughput: the usual ways against uqsynth's engine, on the paper's generator.

Every benchmark draws T posterior samples for a batch of a few slices with
one strategy, on the same seeded weights and inputs, and records in
``extra_info`` how fast (slice-samples per second, TFLOP/s against a matmul
peak measured in the same run), how much memory, and how far its mean and
std maps are from a float32 reference that used the very same dropout masks.

``pytest --benchmark-only -m quick`` runs the 256x256, T=20 comparison only.
The backbone is a parameter: the paper's pix2pix U-Net (``unet``) and
``timm_unet`` on a timm encoder (``UQSYNTH_BENCH_TIMM``, default resnet34),
whose cases carry the marker ``timm``: ``pytest --benchmark-only -m timm -k
256px-T20`` runs the timm comparison at the quick set-up.
Set ``UQSYNTH_BENCH_SLICES`` (default 4 on the CPU, 32 on CUDA), ``UQSYNTH_BENCH_ROUNDS`` (timed
rounds after one warm-up; default 3 on the CPU, 10 on CUDA) and
``UQSYNTH_BENCH_FAST`` (engine_fast's options) to change the set-up.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from benchmarks._bench import (
    DTYPE_NAMES,
    PRECISION_DTYPES,
    SAMPLING_SEED,
    Tracked,
    batch_repeat,
    bench_device,
    count_flops,
    device_name,
    engine,
    env_int,
    executed_flops_per_sample,
    fast_options,
    make_sampler,
    masked_reference,
    median_seconds,
    naive_loop,
    paper_generator,
    peak_tflops,
    pix2pix_computation,
    relative_error,
    slices,
)

STRATEGIES = ("naive_loop", "batch_repeat", "engine", "engine_fast")
SIZES = (256, 64)  # the paper's slices, and a small size for quick looks
SAMPLES = (10, 20, 50)
QUICK = (256, 20)
TIMM_ENCODER = os.environ.get("UQSYNTH_BENCH_TIMM") or "resnet34"
BACKBONES = ("unet", TIMM_ENCODER)


def _cases():
    for backbone in BACKBONES:
        timm = backbone != "unet"
        name = f"timm_{backbone}" if timm else backbone
        for size in SIZES:
            for samples in SAMPLES:
                marks = [pytest.mark.timm] if timm else [pytest.mark.quick] if (size, samples) == QUICK else []
                for strategy in STRATEGIES:
                    yield pytest.param(
                        backbone, size, samples, strategy, marks=marks, id=f"{name}-{size}px-T{samples}-{strategy}"
                    )


DEVICE = bench_device()
# A few slices per batch on the CPU; on a GPU enough for the batched strategies to fill it
# (batch_repeat then holds 32 x T full activations at once: about 16 GB at T=20 in float32).
SLICES = env_int("UQSYNTH_BENCH_SLICES", 32 if DEVICE.type == "cuda" else 4)
ROUNDS = env_int("UQSYNTH_BENCH_ROUNDS", 10 if DEVICE.type == "cuda" else 3)


@functools.cache
def generator_for(backbone: str, size: int):
    return paper_generator(size, DEVICE, backbone)


@functools.cache
def inputs_for(size: int) -> torch.Tensor:
    return slices(SLICES, size, device=DEVICE)


@functools.cache
def full_flops(backbone: str, size: int) -> int:
    """FLOPs of one full forward pass of one slice (pix2pix's computation), the common unit."""
    generator = generator_for(backbone, size)
    with pix2pix_computation(generator):
        return count_flops(generator, inputs_for(size)[:1])


@functools.cache
def reference(backbone: str, size: int, samples: int, slice_samples_per_pass: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = generator_for(backbone, size)
    return masked_reference(generator, inputs_for(size), samples, SAMPLING_SEED, slice_samples_per_pass)


#: Results of this session, for speed-ups and for the comparison with naive_loop's maps.
SEEN: dict[tuple[str, int, int, str], dict] = {}


@pytest.mark.parametrize("backbone, size, samples, strategy", list(_cases()))
def test_sampling_throughput(benchmark, backbone, size, samples, strategy):
    generator, x = generator_for(backbone, size), inputs_for(size)
    options = {"precision": "fp32", "channels_last": False, "compile": False}
    sampler = None
    if strategy == "naive_loop":
        run = functools.partial(naive_loop, generator, x, samples, SAMPLING_SEED)
    elif strategy == "batch_repeat":
        run = functools.partial(batch_repeat, generator, x, samples, SAMPLING_SEED)
    else:
        if strategy == "engine_fast":
            options = fast_options(DEVICE)
        sampler = make_sampler(generator, DEVICE, samples, **options)
        run = functools.partial(engine, sampler, x)

    generator_name = "unet" if backbone == "unet" else f"timm_unet({backbone})"
    benchmark.group = f"sampling {generator_name} {size}x{size}, T={samples}, {SLICES} slices"
    tracked = Tracked(run, DEVICE)
    mean, std = benchmark.pedantic(tracked, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    seconds = median_seconds(benchmark)
    dtype = PRECISION_DTYPES[options["precision"]]
    rate = SLICES * samples / seconds
    flops = full_flops(backbone, size)
    executed = flops if sampler is None else executed_flops_per_sample(sampler, x, samples)
    peak = peak_tflops(DEVICE, dtype)
    info = {
        "strategy": strategy,
        "generator": generator_name,
        "image_size": size,
        "samples": samples,
        "slices": SLICES,
        "device": device_name(DEVICE),
        "dtype": DTYPE_NAMES[dtype],
        "options": options,
        "seconds": seconds,
        "slice_samples_per_s": rate,
        "gflop_per_sample": flops / 1e9,
        "executed_gflop_per_sample": executed / 1e9,
        "achieved_tflops": flops * rate / 1e12,
        "executed_tflops": executed * rate / 1e12,
        "peak_tflops": peak,
        "fraction_of_peak": flops * rate / 1e12 / peak,
        "executed_fraction_of_peak": executed * rate / 1e12 / peak,
        "peak_memory_mb": tracked.peak(skip=1),
        "memory_measure": tracked.how,
        "other_load_cores": tracked.other_load(skip=1),
    }
    if strategy != "naive_loop":
        if sampler is None:  # batch_repeat: one pass over all slices and samples, the reference itself
            per_pass = SLICES * samples
        else:
            per_pass = sampler.slice_samples_per_pass(x[:1])
            info["slice_samples_per_pass"] = per_pass
        ref_mean, ref_std = reference(backbone, size, samples, per_pass)
        info["mean_rel_err"] = relative_error(mean, ref_mean)
        info["std_rel_err"] = relative_error(std, ref_std)
        info["reference"] = "float32 full network (pix2pix computation) with the same dropout masks"
        naive = SEEN.get((backbone, size, samples, "naive_loop"))
        if naive is not None:
            # Other masks: Monte Carlo noise of T samples, not arithmetic.
            info["mean_rel_err_vs_naive_loop"] = relative_error(mean, naive["mean"])
            info["std_rel_err_vs_naive_loop"] = relative_error(std, naive["std"])
    for baseline in ("naive_loop", "batch_repeat"):
        seen = SEEN.get((backbone, size, samples, baseline))
        if seen is not None and baseline != strategy:
            info[f"speedup_vs_{baseline}"] = rate / seen["rate"]
    benchmark.extra_info.update(info)
    SEEN[(backbone, size, samples, strategy)] = {"rate": rate, "mean": mean, "std": std}
