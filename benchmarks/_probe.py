"""Which of bf16/fp16, channels_last and torch.compile make the engine faster on this device.

    python -m benchmarks._probe                      # 256x256, T=20, 4 slices, every variant
    python -m benchmarks._probe --variants fp32 bf16 bf16+channels_last --rounds 3
    python -m benchmarks._probe --profile bf16       # torch.profiler table of one engine run

Each variant is the engine (prefix caching, default memory budget) with
some options; the output is the best-of-rounds time after one warm-up (which
also compiles), slice-samples per second, the speed-up over fp32, and the
relative error of the mean and std maps against the float32 engine (the
same masks). :func:`benchmarks._bench.fast_options` holds the choice.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._bench import (
    PRECISION_DTYPES,
    bench_device,
    device_name,
    engine,
    make_sampler,
    paper_generator,
    relative_error,
    slices,
)

DEFAULT_VARIANTS = (
    "fp32", "bf16", "fp32+channels_last", "bf16+channels_last", "fp32+compile", "bf16+compile",
    "bf16+channels_last+compile",
)


def parse_variant(name: str) -> dict:
    words = name.split("+")
    precision = next((w for w in words if w in PRECISION_DTYPES), "fp32")
    return {"precision": precision, "channels_last": "channels_last" in words, "compile": "compile" in words}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--profile", metavar="VARIANT", help="print a torch.profiler table of one run of VARIANT")
    args = parser.parse_args(argv)

    device = bench_device()
    generator, x = paper_generator(args.size, device), slices(args.slices, args.size, device=device)
    print(f"device: {device_name(device)}; {args.size}x{args.size}, T={args.samples}, {args.slices} slices")
    if args.profile:
        profile(generator, x, args, device)
        return
    base = None
    print(f"{'variant':30} {'warm-up s':>9} {'best s':>8} {'samples/s':>10} {'speed-up':>8} {'mean err':>9} {'std err':>9}")
    for name in args.variants:
        sampler = make_sampler(generator, device, args.samples, **parse_variant(name))
        started = time.perf_counter()
        mean, std = engine(sampler, x)
        warmup = time.perf_counter() - started
        best = float("inf")
        for _ in range(args.rounds):
            started = time.perf_counter()
            engine(sampler, x)
            best = min(best, time.perf_counter() - started)
        rate = args.slices * args.samples / best
        if base is None and name == "fp32":
            base = {"rate": rate, "mean": mean, "std": std, "per_pass": sampler.slice_samples_per_pass(x[:1])}
        same_masks = base is not None and sampler.slice_samples_per_pass(x[:1]) == base["per_pass"]
        errors = (
            f"{relative_error(mean, base['mean']):9.2e} {relative_error(std, base['std']):9.2e}"
            if same_masks else f"{'(other chunks)':>19}"
        )
        speedup = f"{rate / base['rate']:8.2f}" if base else f"{'':8}"
        print(f"{name:30} {warmup:9.1f} {best:8.2f} {rate:10.1f} {speedup} {errors}", flush=True)


def profile(generator, x, args, device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sampler = make_sampler(generator, device, args.samples, **parse_variant(args.profile))
    engine(sampler, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        engine(sampler, x)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
