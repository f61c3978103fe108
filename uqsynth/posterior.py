"""The Monte Carlo sampling engine: T posterior samples per slice, streamed.

Every consumer of posterior samples (evaluation, ``uqsynth predict``, the
benchmarks) goes through :class:`PosteriorSampler`, which

- switches the generator to eval mode (BatchNorm uses its running
  statistics) and turns on only its stochastic layers (:func:`uqsynth.sampling`);
- runs the deterministic prefix (for the U-Net: the encoder and the decoder
  up to the first stochastic layer) once per slice, then only the stochastic
  remainder T times, on the prefix output repeated along the batch axis;
- batches slices and samples together, as many slice-samples per forward
  pass as the memory budget allows;
- accumulates the per-voxel mean and variance sample by sample (Chan et
  al.'s parallel form of Welford's update, in float32 or float64), so memory
  does not grow with T; samples or empirical quantiles are kept only on request;
- reads each pass through the arm's likelihood (:mod:`uqsynth.likelihoods`):
  a pass gives a mean image and, for a heteroscedastic likelihood, a
  per-voxel aleatoric variance. By the law of total variance the predictive
  variance is the *epistemic* part, the variance of the T means, plus the
  *aleatoric* part, the mean of the T variances (Kendall & Gal 2017);
- is reproducible: a seed fixes every dropout mask, whatever the device's
  free memory, because the batch sizes depend only on the configured budget;
  given a volume's key (its subject id), the masks derive from the seed and
  that key (:func:`volume_seed`), so two subjects never share their masks
  and a subject's masks do not depend on which process samples it.

Running the prefix once is exact: the repeated prefix output is the same
tensor each full pass would compute, and the masks are drawn in the same
order as a full pass over the repeated batch (the prefix draws none).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from uqsynth.layers.base import sampling
from uqsynth.likelihoods import L1, Likelihood
from uqsynth.models.base import Generator

#: Default memory budget for one forward pass of slice-samples, per device type (MiB).
DEFAULT_BUDGET_MB = {"cpu": 1024, "cuda": 8192}

#: Activation memory of the stochastic remainder, as a multiple of its input (the prefix cache).
ACTIVATION_FACTOR = 4.0


class StreamingMoments:
    """Per-element mean and variance of a stream of sample batches (Chan et al. 1979).

    Merging a batch of ``k`` samples with mean ``m_b`` and sum of squared
    deviations ``M2_b`` into ``n`` seen so far::

        delta = m_b - mean;  mean += delta * k / (n + k)
        M2 += M2_b + delta^2 * n * k / (n + k)

    which is as stable as Welford's one-at-a-time update but vectorized.

    Args:
        dtype: Accumulator dtype (float32 or float64; lower precisions are refused).
    """

    def __init__(self, *, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulators must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, batch: torch.Tensor, dim: int = 0) -> None:
        """Add the samples laid out along ``dim`` of ``batch``."""
        batch = batch.to(self.dtype)
        k = batch.shape[dim]
        batch_mean = batch.mean(dim)
        batch_m2 = (batch - batch_mean.unsqueeze(dim)).square().sum(dim)
        if self.mean is None:
            self.mean, self.m2, self.count = batch_mean, batch_m2, k
            return
        total = self.count + k
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * k / total)
        self.count = total

    def variance(self, *, ddof: int = 1) -> torch.Tensor:
        """The sample variance (unbiased with ``ddof=1``)."""
        if self.m2 is None or self.count <= ddof:
            raise ValueError(f"need more than {ddof} samples for a variance, have {self.count}")
        return self.m2 / (self.count - ddof)


@dataclass
class SamplerOptions:
    """How to draw posterior samples.

    Attributes:
        samples: T, forward passes per slice (at least 2).
        seed: Fixes every dropout mask.
        cache_prefix: Run the deterministic prefix once per slice (exact).
        memory_budget_mb: Memory for one forward pass of slice-samples; ``None``
            uses :data:`DEFAULT_BUDGET_MB` for the device type.
        precision: ``"fp32"``, or autocast to ``"bf16"`` (CPU and GPU) or ``"fp16"`` (GPU).
        channels_last: Use the channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the stochastic remainder.
        keep_samples: Return all T samples (memory grows with T).
        quantiles: Empirical quantile levels to return, e.g. ``(0.025, 0.5, 0.975)``.
        accumulator: ``"float32"`` or ``"float64"`` running moments.
    """

    samples: int = 20
    seed: int = 0
    cache_prefix: bool = True
    memory_budget_mb: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    keep_samples: bool = False
    quantiles: Sequence[float] = field(default_factory=tuple)
    accumulator: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2 for a variance, got {self.samples}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f'precision must be "fp32", "bf16" or "fp16", got {self.precision!r}')
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be in [0, 1], got {list(self.quantiles)}")


@dataclass
class Posterior:
    """Per-voxel posterior summaries of a batch of slices, in the generator's output units.

    Attributes:
        mean: ``(n, C, H, W)`` predictive mean (the mean of the T passes' means).
        epistemic_variance: ``(n, C, H, W)`` unbiased variance of the T passes' means.
        aleatoric_variance: ``(n, C, H, W)`` mean of the T passes' likelihood variances,
            or ``None`` for a likelihood without one (the paper's ``l1``).
        samples: ``(n, T, C, H, W)`` of the passes' means when requested, else ``None``.
        quantiles: ``(n, Q, C, H, W)`` empirical quantiles of the passes' means at
            :attr:`SamplerOptions.quantiles` (the epistemic spread only), else ``None``.
    """

    mean: torch.Tensor
    epistemic_variance: torch.Tensor
    aleatoric_variance: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    quantiles: torch.Tensor | None = None

    @property
    def variance(self) -> torch.Tensor:
        """The total predictive variance: epistemic + aleatoric."""
        if self.aleatoric_variance is None:
            return self.epistemic_variance
        return self.epistemic_variance + self.aleatoric_variance

    @property
    def std(self) -> torch.Tensor:
        return self.variance.clamp_min(0).sqrt()


class PosteriorSampler:
    """Draws T posterior samples per slice from a generator with stochastic layers.

    Args:
        generator: Any :class:`~uqsynth.models.base.Generator`.
        options: How to sample.
        device: Where to run; the generator is moved there.
        likelihood: What the generator's outputs are (default: the paper's
            ``l1``, whose output is the image and has no aleatoric variance).
    """

    def __init__(
        self,
        generator: Generator,
        options: SamplerOptions | None = None,
        device: str | torch.device = "cpu",
        likelihood: Likelihood | None = None,
    ):
        self.options = options or SamplerOptions()
        self.likelihood = likelihood or L1()
        self.device = torch.device(device)
        if self.options.precision == "fp16" and self.device.type != "cuda":
            raise ValueError('precision "fp16" needs a CUDA device; use "bf16" on the CPU')
        self.generator = generator.to(self.device)
        if self.options.channels_last:
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self._prefix = self.generator.forward_prefix
        self._suffix = self.generator.forward_suffix
        self._full = self.generator.forward
        if self.options.compile:
            self._suffix = torch.compile(self._suffix, dynamic=False)
            self._full = torch.compile(self._full, dynamic=False)
        self._slice_samples_per_pass: int | None = None

    # ------------------------------------------------------------------ public

    def sample(self, source: torch.Tensor, key: str | None = None) -> Posterior:
        """Posterior summaries for ``source`` slices ``(n, C, H, W)``; ``key`` as in :meth:`iter_chunks`."""
        results = list(self.iter_chunks(source, key))
        cat = lambda name: (  # noqa: E731
            None if getattr(results[0], name) is None else torch.cat([getattr(r, name) for r in results])
        )
        return Posterior(cat("mean"), cat("epistemic_variance"), cat("aleatoric_variance"), cat("samples"),
                         cat("quantiles"))

    def iter_chunks(self, source: torch.Tensor, key: str | None = None) -> Iterator[Posterior]:
        """Like :meth:`sample`, chunk by chunk of slices (for progress bars and streaming writes).

        Args:
            source: Slices ``(n, C, H, W)``, one volume's or any batch.
            key: What the slices are (a subject id): the masks are seeded by
                :func:`volume_seed` of the options' seed and ``key``, so
                every volume gets its own. ``None`` seeds with the options'
                seed alone (every call then draws the same masks).
        """
        if source.dim() != 4:
            raise ValueError(f"expected slices of shape (n, C, H, W), got {tuple(source.shape)}")
        options = self.options
        with self._sampling_state(self.options.seed if key is None else volume_seed(self.options.seed, key)):
            per_pass = self.slice_samples_per_pass(source[:1])
            slices_per_chunk = max(1, per_pass // options.samples)
            samples_per_pass = min(options.samples, per_pass)
            for start in range(0, source.shape[0], slices_per_chunk):
                chunk = source[start : start + slices_per_chunk]
                yield self._sample_chunk(chunk, samples_per_pass)

    def slice_samples_per_pass(self, probe: torch.Tensor) -> int:
        """How many slice-samples fit in one forward pass under the memory budget."""
        if self._slice_samples_per_pass is None:
            budget = self.options.memory_budget_mb
            if budget is None:
                budget = DEFAULT_BUDGET_MB.get(self.device.type, DEFAULT_BUDGET_MB["cpu"])
            with torch.no_grad(), self._autocast():
                cache = self._prefix(self._prepare(probe[:1]))
            per_slice = sum(t.numel() * t.element_size() for t in cache) * ACTIVATION_FACTOR
            self._slice_samples_per_pass = max(1, int(budget * 2**20 // per_slice))
        return self._slice_samples_per_pass

    # ------------------------------------------------------------------ internals

    def _sample_chunk(self, chunk: torch.Tensor, samples_per_pass: int) -> Posterior:
        options = self.options
        n = chunk.shape[0]
        accumulator = getattr(torch, options.accumulator)
        moments = StreamingMoments(dtype=accumulator)
        aleatoric: torch.Tensor | None = None  # the sum of the passes' likelihood variances
        kept: list[torch.Tensor] = []
        keep = options.keep_samples or bool(options.quantiles)
        with torch.no_grad(), self._autocast():
            x = self._prepare(chunk)
            cache = self._prefix(x) if options.cache_prefix else None
            for first in range(0, options.samples, samples_per_pass):
                k = min(samples_per_pass, options.samples - first)
                if cache is not None:
                    draws = self._suffix(tuple(t.repeat_interleave(k, dim=0) for t in cache))
                else:
                    draws = self._full(x.repeat_interleave(k, dim=0))
                # bf16/fp16 outputs are widened; float64 stays float64 (exactness tests rely on it)
                draws = draws.to(torch.promote_types(draws.dtype, torch.float32))
                variance = self.likelihood.variance(draws)
                if variance is not None:
                    variance = variance.to(accumulator).reshape(n, k, *variance.shape[1:]).sum(1)
                    aleatoric = variance if aleatoric is None else aleatoric + variance
                draws = self.likelihood.mean(draws)
                draws = draws.reshape(n, k, *draws.shape[1:])
                moments.update(draws, dim=1)
                if keep:
                    kept.append(draws.to("cpu"))
        samples = torch.cat(kept, dim=1) if keep else None
        quantiles = None
        if options.quantiles:
            levels = torch.tensor(list(options.quantiles), dtype=samples.dtype)
            quantiles = torch.quantile(samples, levels, dim=1).movedim(0, 1).contiguous()
        return Posterior(
            mean=moments.mean.float().cpu(),
            epistemic_variance=moments.variance().float().cpu(),
            aleatoric_variance=None if aleatoric is None else (aleatoric / options.samples).float().cpu(),
            samples=samples if options.keep_samples else None,
            quantiles=quantiles,
        )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _sampling_state(self, seed: int) -> Iterator[None]:
        """Eval mode, stochastic layers on, and a private RNG seeded with ``seed`` for reproducibility."""
        was_training = self.generator.training
        devices = [self.device] if self.device.type == "cuda" else []
        self.generator.eval()
        try:
            with torch.random.fork_rng(devices=devices), sampling(self.generator):
                torch.manual_seed(seed)
                yield
        finally:
            self.generator.train(was_training)


def volume_seed(seed: int, key: str) -> int:
    """The dropout-mask seed of the volume ``key`` in a run seeded ``seed``.

    A hash, not ``seed + index``: it depends on nothing but the two values
    (not on the order or the process that samples the volume), and nearby
    seeds or ids give unrelated streams. 63 bits, within what
    :func:`torch.manual_seed` accepts.
    """
    digest = hashlib.sha256(f"uqsynth-masks:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian_interval(mean: torch.Tensor, std: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``level`` interval of N(mean, std^2)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    return mean - z * std, mean + z * std
