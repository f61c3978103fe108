"""Shared pieces of the benchmark suites: the device, its measured peak, memory, FLOPs, the model and the strategies.

Nothing here asserts a target: the suites record numbers in pytest-benchmark's
``extra_info`` and ``benchmarks/README.md`` compares them with the targets.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from uqsynth.layers import MCDropout, sampling
from uqsynth.likelihoods import Likelihood
from uqsynth.models.base import Generator
from uqsynth.models.timm_unet import TimmUnetGenerator
from uqsynth.models.unet import UnetGenerator
from uqsynth.posterior import PosteriorSampler, SamplerOptions

#: The paper's generator: pix2pix unet_256 (ngf 64), MC dropout p = 0.5 after the 2nd-4th transposed convolutions.
NGF, DROPOUT_P, POSITIONS = 64, 0.5, (2, 3, 4)
WEIGHT_SEED, INPUT_SEED, SAMPLING_SEED = 0, 1, 2

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


# --------------------------------------------------------------------------- the device


def bench_device() -> torch.device:
    """``$UQSYNTH_BENCH_DEVICE``, else CUDA when present, else the CPU."""
    spec = os.environ.get("UQSYNTH_BENCH_DEVICE")
    return torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))


@functools.cache
def device_name(device: torch.device) -> str:
    """The device as torch reports it (for the CPU: the model in /proc/cpuinfo, threads and ISA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput in ``dtype`` (TFLOP/s): the best of a few timed square products.

    Measured, not looked up, so the fraction of peak refers to this machine
    in this run. On CUDA the float32 probe runs without TF32 (cuDNN's
    convolutions may use TF32, so float32 networks can exceed this "peak").
    """
    n, repeats = (8192, 20) if device.type == "cuda" else (2048, 4)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    with _no_tf32():
        a @ b
        synchronize(device)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            synchronize(device)
            best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n**3 / best / 1e12


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- memory


def _proc_status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


class PeakMemory:
    """Peak memory of a block, in MiB above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's
    tensors). CPU: the process's resident-set high-water mark (``VmHWM``,
    which ``resource.getrusage().ru_maxrss`` also reports), reset at the start
    of the block by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0), minus
    the resident set at the start. It counts everything the process touches
    (torch's, numpy's and the allocator's pages), which tracemalloc does not see.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")
        self.how = (
            "cuda max_memory_allocated - memory_allocated at start"
            if device.type == "cuda"
            else "RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) - RSS at start"
        )

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # not Linux, or not allowed: the delta then counts from the process's earlier peak
                self.how += " (reset failed: lower bound)"
            self._start = _proc_status_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        else:
            self.mib = max(0.0, _proc_status_mib("VmHWM") - self._start)


class OtherLoad:
    """CPU cores that other processes kept busy during a block (Linux ``/proc/stat``), to flag shared-machine noise.

    All cores' busy time minus this process's own CPU time, divided by the
    wall time: 0 on a quiet machine, about 1 when another job holds a core.
    """

    @staticmethod
    def _busy_seconds() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def __enter__(self) -> OtherLoad:
        self.cores = float("nan")
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._start = (time.perf_counter(), self._busy_seconds(), self._own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        if not hasattr(self, "_start"):
            return
        wall, busy, own = self._start
        elapsed = time.perf_counter() - wall
        with contextlib.suppress(OSError, ValueError, IndexError):
            other = (self._busy_seconds() - busy) - (self._own_seconds() - own)
            self.cores = max(0.0, other / elapsed) if elapsed > 0 else float("nan")


class Tracked:
    """Wraps a benchmarked function so every call also records its peak memory and the machine's other load."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn, self.device, self.peaks, self.loads, self.how = fn, device, [], [], ""

    def __call__(self, *args, **kwargs):
        with PeakMemory(self.device) as memory, OtherLoad() as load:
            result = self.fn(*args, **kwargs)
        self.peaks.append(memory.mib)
        self.loads.append(load.cores)
        self.how = memory.how
        return result

    def peak(self, skip: int = 0) -> float:
        """The largest peak over the calls after the first ``skip`` (warm-up rounds)."""
        peaks = self.peaks[skip:] or self.peaks
        return round(max(peaks), 1)

    def other_load(self, skip: int = 0) -> float:
        """The largest load of other processes (in cores) over the calls after the first ``skip``."""
        loads = self.loads[skip:] or self.loads
        return round(max(loads), 2)


def median_seconds(benchmark) -> float:
    """The median round time of a finished pytest-benchmark run."""
    return float(benchmark.stats.stats.median)


# --------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable, *args) -> int:
    """FLOPs of ``fn(*args)`` as torch's FLOP counter counts them (2 per multiply-add of matmuls and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


# --------------------------------------------------------------------------- the model and the inputs


def paper_generator(image_size: int, device: torch.device, backbone: str = "unet") -> Generator:
    """The paper's generator (or ``timm_unet`` on a timm encoder) with seeded weights and trained-like BatchNorm statistics.

    ``backbone`` is ``"unet"`` (pix2pix's U-Net, ngf 64) or a timm encoder
    name such as ``"resnet34"`` (``timm_unet`` with timm's random init); both
    carry MC dropout p = 0.5 at decoder positions 2-4.

    pix2pix's initialization (N(0, 0.02) weights) with BatchNorm's default
    running statistics (mean 0, variance 1) would shrink the activations
    layer by layer to almost nothing, so the output, and the spread of its
    samples, would be unlike a trained network's; the rounding errors of
    low precision would then be measured on the wrong scale. The running
    statistics are therefore re-estimated on 8 random slices (one
    cumulative-average pass in train mode, sampling off), as after training.
    """
    torch.manual_seed(WEIGHT_SEED)
    layer = lambda: MCDropout(p=DROPOUT_P)  # noqa: E731
    if backbone == "unet":
        generator = UnetGenerator(image_size=image_size, ngf=NGF, stochastic_layer=layer, positions=POSITIONS)
    else:
        generator = TimmUnetGenerator(
            encoder=backbone, image_size=image_size, stochastic_layer=layer, positions=POSITIONS
        )
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator.train()
    with torch.no_grad():
        generator(slices(8, image_size, seed=WEIGHT_SEED + 100))
    for norm in norms:
        norm.momentum = 0.1
    return generator.eval().to(device)


def slices(n: int, image_size: int, *, seed: int = INPUT_SEED, device: str | torch.device = "cpu") -> torch.Tensor:
    """``n`` seeded source slices in [-1, 1] (the generator's input range): smooth blobs plus texture."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, max(image_size // 16, 2), max(image_size // 16, 2), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    texture = 0.1 * torch.randn(n, 1, image_size, image_size, generator=generator)
    return (2 * smooth - 1 + texture).clamp(-1, 1).to(device)


# --------------------------------------------------------------------------- the strategies


@contextlib.contextmanager
def pix2pix_computation(generator: Generator) -> Iterator[None]:
    """Make ``generator`` compute each decoder step as pix2pix does (concatenate, then one convolution).

    The baselines stand for the usual ways, so they must not profit from the
    engine's split of the skip convolutions (see ``uqsynth.models.unet``).
    Other generators have no such split and ignore the switch.
    """
    had = "caches_skip_parts" in vars(generator)
    generator.caches_skip_parts = lambda: False
    try:
        yield
    finally:
        if not had:
            del generator.caches_skip_parts


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """No gradients and a private RNG seeded with ``seed`` (the caller's random state is restored after)."""
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _mc_state(generator: torch.nn.Module, device: torch.device, seed: int) -> Iterator[None]:
    """Eval mode, sampling on, no gradients, and a private RNG seeded with ``seed``."""
    generator.eval()
    with sampling(generator), seeded(device, seed):
        yield


def naive_loop(generator: Generator, x: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T full forward passes one after another (pix2pix-style test code), then mean and std of the stack."""
    with _mc_state(generator, x.device, seed), pix2pix_computation(generator):
        draws = torch.stack([generator(x) for _ in range(samples)], dim=1)
    return draws.mean(1).float().cpu(), draws.std(1).float().cpu()


def batch_repeat(generator: Generator, x: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input repeated T times in one batch through the full network (common MC-dropout wrappers)."""
    n = x.shape[0]
    with _mc_state(generator, x.device, seed), pix2pix_computation(generator):
        draws = generator(x.repeat_interleave(samples, dim=0))
    draws = draws.reshape(n, samples, *draws.shape[1:])
    return draws.mean(1).float().cpu(), draws.std(1).float().cpu()


def engine(sampler: PosteriorSampler, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uqsynth's :class:`~uqsynth.posterior.PosteriorSampler`."""
    posterior = sampler.sample(x)
    return posterior.mean, posterior.std


def masked_reference(
    generator: Generator, x: torch.Tensor, samples: int, seed: int, slice_samples_per_pass: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the engine's draws should be: the float32 full network with the engine's dropout masks.

    The full network (pix2pix's computation, TF32 off) runs on the very
    batches the engine samples, in its order (the chunks of slices and
    samples its memory budget gives), from the same seed. The prefix draws
    no masks, so every mask is the one the engine drew, and the difference
    is arithmetic alone: the order of sums, precision, compilation.
    """
    slices_per_chunk = max(1, slice_samples_per_pass // samples)
    samples_per_pass = min(samples, slice_samples_per_pass)
    means, stds = [], []
    with _mc_state(generator, x.device, seed), pix2pix_computation(generator), _no_tf32():
        for chunk in x.split(slices_per_chunk):
            draws = []
            for first in range(0, samples, samples_per_pass):
                k = min(samples_per_pass, samples - first)
                out = generator(chunk.repeat_interleave(k, dim=0))
                draws.append(out.reshape(chunk.shape[0], k, *out.shape[1:]))
            stack = torch.cat(draws, dim=1)
            means.append(stack.mean(1))
            stds.append(stack.std(1))
    return torch.cat(means).float().cpu(), torch.cat(stds).float().cpu()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` over all voxels (float64)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def fast_options(device: torch.device) -> dict:
    """Precision, memory format and compilation of ``engine_fast`` for the device type.

    Chosen by measurement (``python -m benchmarks._probe``; see README.md):
    on this project's 2-core AVX-512 (bf16) CPU, bf16 and torch.compile pay
    (about 2.2x and 1.4x), channels_last helps without compile but adds
    nothing to it. On CUDA: fp16 (tensor cores, 3 more mantissa bits than
    bf16, activations well inside its range after BatchNorm), channels_last
    and compile. ``$UQSYNTH_BENCH_FAST`` overrides, e.g.
    ``bf16,channels_last,compile`` or ``fp32``.
    """
    spec = os.environ.get("UQSYNTH_BENCH_FAST")
    if spec:
        words = {w.strip() for w in spec.split(",") if w.strip()}
        precision = next((w for w in words if w in PRECISION_DTYPES), "fp32")
        return {"precision": precision, "channels_last": "channels_last" in words, "compile": "compile" in words}
    if device.type == "cuda":
        return {"precision": "fp16", "channels_last": True, "compile": True}
    return {"precision": "bf16", "channels_last": False, "compile": True}


def make_sampler(
    generator: Generator, device: torch.device, samples: int, *, seed: int = SAMPLING_SEED,
    likelihood: Likelihood | None = None, **options
) -> PosteriorSampler:
    """A sampler on a private copy of ``generator`` (channels_last converts a module in place)."""
    if options.get("channels_last"):
        generator = copy.deepcopy(generator)
    return PosteriorSampler(generator, SamplerOptions(samples=samples, seed=seed, **options), device, likelihood)


def executed_flops_per_sample(sampler: PosteriorSampler, x: torch.Tensor, samples: int) -> float:
    """FLOPs the engine executes per slice-sample: its prefix once per slice, its suffix per sample."""
    generator = sampler.generator
    one = x[:1].to(sampler.device)
    with _mc_state(generator, sampler.device, 0):
        prefix = count_flops(generator.forward_prefix, one)
        cache = generator.forward_prefix(one)
        suffix = count_flops(generator.forward_suffix, cache)
    if not sampler.options.cache_prefix:
        return prefix + suffix
    return prefix / samples + suffix
