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

from uqsynth.layers.base import sample_design, sampling
from uqsynth.layers.designs import SampleDesign
from uqsynth.likelihoods import L1, Likelihood
from uqsynth.models.base import Generator

#: Default memory budget for one forward pass of slice-samples, per device type (MiB).
DEFAULT_BUDGET_MB = {"cpu": 1024, "cuda": 8192}

#: Activation memory of the stochastic remainder, as a multiple of its input (the prefix cache).
ACTIVATION_FACTOR = 4.0

#: ``SamplerOptions.variance_reduction`` values: ``"none"`` is the independent design.
VARIANCE_REDUCTIONS: tuple[str, ...] = ("none", "antithetic", "stratified")


class StreamingMoments:
    """Per-element mean and variance of a stream of sample batches (Chan et al. 1979).

    Merging a batch of ``k`` samples with mean ``m_b`` and sum of squared
    deviations ``M2_b`` into ``n`` seen so far::

        delta = m_b - mean;  mean += delta * k / (n + k)
        M2 += M2_b + delta^2 * n * k / (n + k)

    which is as stable as Welford's one-at-a-time update but vectorized.
    With ``fourth=True`` the third and fourth central sums are merged too
    (Pebay 2008, "Formulas for robust, one-pass parallel computation of
    covariances and arbitrary-order statistical moments"), which is what
    the standard error of the variance needs (:meth:`variance_standard_error`).

    Args:
        dtype: Accumulator dtype (float32 or float64; lower precisions are refused).
        fourth: Also keep the third and fourth central moments.
    """

    def __init__(self, *, dtype: torch.dtype = torch.float32, fourth: bool = False) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulators must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.fourth = fourth
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.m3: torch.Tensor | None = None
        self.m4: torch.Tensor | None = None

    def update(self, batch: torch.Tensor, dim: int = 0) -> None:
        """Add the samples laid out along ``dim`` of ``batch``."""
        batch = batch.to(self.dtype)
        k = batch.shape[dim]
        batch_mean = batch.mean(dim)
        deviation = batch - batch_mean.unsqueeze(dim)
        squared = deviation.square()
        batch_m2 = squared.sum(dim)
        if self.fourth:  # products, not pow(): torch's integer pow is many times slower on a CPU
            batch_m3 = (squared * deviation).sum(dim)
            batch_m4 = squared.square().sum(dim)
        if self.mean is None:
            self.mean, self.m2, self.count = batch_mean, batch_m2, k
            if self.fourth:
                self.m3, self.m4 = batch_m3, batch_m4
            return
        n, total = self.count, self.count + k
        delta = batch_mean - self.mean
        if self.fourth:  # before m2 changes: both use the old sums
            delta2 = delta.square()
            self.m4 = (
                self.m4 + batch_m4
                + delta2.square() * (n * k * (n * n - n * k + k * k) / total**3)
                + 6.0 * delta2 * (n * n * batch_m2 + k * k * self.m2) / total**2
                + 4.0 * delta * (n * batch_m3 - k * self.m3) / total
            )
            self.m3 = (
                self.m3 + batch_m3
                + delta2 * delta * (n * k * (n - k) / total**2)
                + 3.0 * delta * (n * batch_m2 - k * self.m2) / total
            )
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (n * k / total)
        self.count = total

    def variance(self, *, ddof: int = 1) -> torch.Tensor:
        """The sample variance (unbiased with ``ddof=1``)."""
        if self.m2 is None or self.count <= ddof:
            raise ValueError(f"need more than {ddof} samples for a variance, have {self.count}")
        return self.m2 / (self.count - ddof)

    def variance_standard_error(self) -> torch.Tensor:
        """Per element, the standard error of :meth:`variance` (needs ``fourth=True`` and 4 samples).

        ``Var(s^2) = (mu_4 - sigma^4 (n - 3) / (n - 1)) / n`` with the
        sample's own central moments plugged in: unlike the Gaussian
        ``sigma^2 sqrt(2 / (n - 1))`` it holds for the skewed, heavy-tailed or
        two-valued outputs that dropout masks give.
        """
        if not self.fourth:
            raise ValueError("the variance's standard error needs StreamingMoments(fourth=True)")
        n = self.count
        if n < 4:
            raise ValueError(f"need at least 4 samples for the variance's standard error, have {n}")
        variance = self.m2 / (n - 1)
        return ((self.m4 / n - variance.square() * ((n - 3) / (n - 1))) / n).clamp_min(0).sqrt()


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
        variance_reduction: How a slice's samples share their random numbers:
            ``"none"`` (independent masks), ``"antithetic"`` or ``"stratified"``
            (:mod:`uqsynth.layers.designs`; every stochastic layer must support it).
        tolerance: Adaptive T. ``None``: every slice gets ``samples`` passes.
            A number: each slice is sampled in rounds until the estimated
            relative standard error of its std map is at most ``tolerance``,
            and ``samples`` is the cap (see :meth:`PosteriorSampler.iter_chunks`).
        min_samples: The first round of adaptive sampling (at least 4: the
            error estimate needs the fourth moment).
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
    variance_reduction: Literal["none", "antithetic", "stratified"] = "none"
    tolerance: float | None = None
    min_samples: int = 10

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2 for a variance, got {self.samples}")
        if self.variance_reduction not in VARIANCE_REDUCTIONS:
            raise ValueError(f"variance_reduction must be one of {', '.join(VARIANCE_REDUCTIONS)}, "
                             f"got {self.variance_reduction!r}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f'precision must be "fp32", "bf16" or "fp16", got {self.precision!r}')
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be in [0, 1], got {list(self.quantiles)}")
        if self.tolerance is not None:
            if not 0.0 < self.tolerance < 1.0:
                raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
            if not 4 <= self.min_samples <= self.samples:
                raise ValueError(f"min_samples must be at least 4 and at most samples ({self.samples}), "
                                 f"got {self.min_samples}")
            if self.keep_samples or self.quantiles:
                raise ValueError("keep_samples and quantiles need a fixed T: set tolerance to None")
            if self.variance_reduction == "antithetic":
                # The stopping rule's error estimate treats samples as independent; antithetic pairs
                # share their squared deviations, so it would understate the std's error and stop early.
                raise ValueError("adaptive T (tolerance) cannot use antithetic pairs; use stratified or none")

    @property
    def accumulator_dtype(self) -> torch.dtype:
        """The torch dtype of the running moments (``accumulator`` names it)."""
        return getattr(torch, self.accumulator)

    def describe(self) -> str:
        """``T=20``, or the adaptive rule, and the design if any: for log lines."""
        text = f"T={self.samples}" if self.tolerance is None else (
            f"T=auto (until the std's relative error <= {self.tolerance:g}, at most {self.samples})"
        )
        return text if self.variance_reduction == "none" else f"{text}, {self.variance_reduction} masks"

    def record(self) -> dict[str, object]:
        """What a certificate says about how the samples were drawn: T (or the adaptive rule) and the design."""
        if self.tolerance is None:
            rule: dict[str, object] = {"samples": self.samples}
        else:
            rule = {"samples": "auto", "tolerance": self.tolerance, "max_samples": self.samples}
        if self.variance_reduction != "none":
            rule["variance_reduction"] = self.variance_reduction
        return rule


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
        sample_counts: ``(n,)`` passes each slice got: T for all, or with adaptive T each its own.
        relative_error: ``(n,)`` estimated relative standard error of each slice's std map
            (with adaptive T only, else ``None``).
    """

    mean: torch.Tensor
    epistemic_variance: torch.Tensor
    aleatoric_variance: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    quantiles: torch.Tensor | None = None
    sample_counts: torch.Tensor | None = None
    relative_error: torch.Tensor | None = None

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
        self.slice_samples_drawn = 0  # forward passes of the stochastic part so far, over all slices
        # With a sample design the part of the output additive in the masks has an exact mean (its
        # draws are balanced), and then sum((x - mean)^2) / (T - 1) over-estimates the variance by
        # T / (T - 1); dividing by T is exact for that part and low by at most 1 / T of the rest.
        self._ddof = 1 if self.options.variance_reduction == "none" else 0

    # ------------------------------------------------------------------ public

    def sample(self, source: torch.Tensor, key: str | None = None) -> Posterior:
        """Posterior summaries for ``source`` slices ``(n, C, H, W)``; ``key`` as in :meth:`iter_chunks`."""
        results = list(self.iter_chunks(source, key))
        cat = lambda name: (  # noqa: E731
            None if getattr(results[0], name) is None else torch.cat([getattr(r, name) for r in results])
        )
        return Posterior(**{name: cat(name) for name in (
            "mean", "epistemic_variance", "aleatoric_variance", "samples", "quantiles", "sample_counts",
            "relative_error",
        )})

    def iter_chunks(self, source: torch.Tensor, key: str | None = None) -> Iterator[Posterior]:
        """Like :meth:`sample`, chunk by chunk of slices (for progress bars and streaming writes).

        Args:
            source: Slices ``(n, C, H, W)``, one volume's or any batch.
            key: What the slices are (a subject id): the masks are seeded by
                :func:`volume_seed` of the options' seed and ``key``, so
                every volume gets its own. ``None`` seeds with the options'
                seed alone (every call then draws the same masks).

        With adaptive T (``options.tolerance``) each chunk is sampled in
        rounds: ``min_samples`` passes first, then, while some slice's
        estimated relative standard error of its std map (:func:`std_relative_error`)
        is above the tolerance, another round for those slices only, sized
        by the error's ``1 / sqrt(T)`` decay for the one closest to done (at
        least 2 passes and a sixteenth of what it has), up to ``samples`` passes in all.
        Slices leave a chunk, none join, so the slices still sampling always
        share one count.
        """
        if source.dim() != 4:
            raise ValueError(f"expected slices of shape (n, C, H, W), got {tuple(source.shape)}")
        options = self.options
        with self._sampling_state(self.options.seed if key is None else volume_seed(self.options.seed, key)):
            per_pass = self.slice_samples_per_pass(source[:1])
            first_round = options.samples if options.tolerance is None else options.min_samples
            slices_per_chunk = max(1, per_pass // first_round)
            samples_per_pass = min(options.samples, per_pass)
            for start in range(0, source.shape[0], slices_per_chunk):
                chunk = source[start : start + slices_per_chunk]
                if options.tolerance is None:
                    result = self._sample_chunk(chunk, samples_per_pass)
                else:
                    result = self._sample_chunk_adaptive(chunk, per_pass)
                self.slice_samples_drawn += int(result.sample_counts.sum())
                yield result

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
        accumulator = options.accumulator_dtype
        moments = StreamingMoments(dtype=accumulator)
        aleatoric: torch.Tensor | None = None  # the sum of the passes' likelihood variances
        kept: list[torch.Tensor] = []
        keep = options.keep_samples or bool(options.quantiles)
        with torch.no_grad(), self._autocast():
            x = self._prepare(chunk)
            cache = self._prefix(x) if options.cache_prefix else None
            for first in range(0, options.samples, samples_per_pass):
                k = min(samples_per_pass, options.samples - first)
                draws, variance = self._read(self._draws(x, cache, k), n)
                if variance is not None:
                    variance = variance.sum(1)
                    aleatoric = variance if aleatoric is None else aleatoric + variance
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
            epistemic_variance=moments.variance(ddof=self._ddof).float().cpu(),
            aleatoric_variance=None if aleatoric is None else (aleatoric / options.samples).float().cpu(),
            samples=samples if options.keep_samples else None,
            quantiles=quantiles,
            sample_counts=torch.full((n,), options.samples),
        )

    def _sample_chunk_adaptive(self, chunk: torch.Tensor, per_pass: int) -> Posterior:
        """Rounds of passes until each slice's std map is within the tolerance (see :meth:`iter_chunks`)."""
        options = self.options
        n = chunk.shape[0]
        accumulator = options.accumulator_dtype
        means = [StreamingMoments(dtype=accumulator, fourth=True) for _ in range(n)]
        variances = [StreamingMoments(dtype=accumulator) for _ in range(n)]  # of the passes' aleatoric variances
        errors = torch.full((n,), math.inf)
        active, count, k = list(range(n)), 0, options.min_samples
        with torch.no_grad(), self._autocast():
            x = self._prepare(chunk)
            cache = self._prefix(x) if options.cache_prefix else None
            while active:
                # The active slices in groups that fit a pass with all k samples (or one slice, k split).
                group = max(1, per_pass // k)
                for start in range(0, len(active), group):
                    members = active[start : start + group]
                    sub_x, sub_cache = x, cache
                    if len(members) < n:  # some slices are done: gather the others' inputs
                        index = torch.tensor(members, device=x.device)
                        sub_x = x[index]
                        sub_cache = None if cache is None else tuple(t[index] for t in cache)
                    for first in range(0, k, per_pass):
                        draws = self._draws(sub_x, sub_cache, min(per_pass, k - first))
                        self._accumulate(draws, members, means, variances)
                count += k
                for i in active:
                    errors[i] = std_relative_error(means[i], None if variances[i].mean is None else variances[i])
                active = [i for i in active if errors[i] > options.tolerance and count < options.samples]
                if active:
                    # Relative error ~ 1 / sqrt(T): the closest slice needs count * (error / tolerance)^2.
                    closest = min(float(errors[i]) for i in active)
                    wanted = math.ceil(count * (closest / options.tolerance) ** 2) - count
                    k = min(max(wanted, 2, count // 16), options.samples - count)
        has_aleatoric = variances[0].mean is not None
        stack = lambda values: torch.stack([v.float().cpu() for v in values])  # noqa: E731
        return Posterior(
            mean=stack([m.mean for m in means]),
            epistemic_variance=stack([m.variance(ddof=self._ddof) for m in means]),
            aleatoric_variance=stack([v.mean for v in variances]) if has_aleatoric else None,
            sample_counts=torch.tensor([m.count for m in means]),
            relative_error=errors.clone(),
        )

    def _draws(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...] | None, k: int) -> torch.Tensor:
        """One pass: ``k`` samples of each slice of ``x`` (adjacent along the batch), widened to float32."""
        design = None if self.options.variance_reduction == "none" else SampleDesign(
            self.options.variance_reduction, k
        )
        with sample_design(self.generator, design):
            if cache is not None:
                draws = self._suffix(tuple(t.repeat_interleave(k, dim=0) for t in cache))
            else:
                draws = self._full(x.repeat_interleave(k, dim=0))
        # bf16/fp16 outputs are widened; float64 stays float64 (exactness tests rely on it)
        return draws.to(torch.promote_types(draws.dtype, torch.float32))

    def _read(self, draws: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass of ``n`` slices read through the likelihood: means and aleatoric variances, ``(n, k, ...)``.

        The variances (``None`` for a likelihood without them) are in the accumulator's dtype.
        """
        variance = self.likelihood.variance(draws)
        if variance is not None:
            variance = variance.to(self.options.accumulator_dtype).reshape(n, -1, *variance.shape[1:])
        images = self.likelihood.mean(draws)
        return images.reshape(n, -1, *images.shape[1:]), variance

    def _accumulate(self, draws, members, means, variances) -> None:
        """Add one pass's samples of the slices ``members`` to their running moments."""
        images, variance = self._read(draws, len(members))
        for row, i in enumerate(members):
            means[i].update(images[row], dim=0)
            if variance is not None:
                variances[i].update(variance[row], dim=0)

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


def std_relative_error(means: StreamingMoments, variances: StreamingMoments | None = None) -> float:
    """Estimated relative standard error of one slice's std map from its running moments.

    ``means`` are the passes' mean images (with fourth moments), ``variances``
    their aleatoric variances, if any. Per voxel the total variance
    ``v = s^2 + a`` (epistemic sample variance plus mean aleatoric variance)
    has ``SE(v)^2 = SE(s^2)^2 + Var(a) / T``, the two taken as independent;
    by the delta method ``SE(sqrt v) = SE(v) / (2 sqrt v)``. The map's error is
    the root of the summed squared errors over the root of the summed
    variances, ``sqrt(sum SE(v)^2 / 4v) / sqrt(sum v)``, i.e. the expected
    ``||std_T - std|| / ||std||``; voxels with zero variance take no part.
    The estimate assumes independent samples; stratified samples have a
    smaller error (Latin hypercube sampling's variance is at most
    ``T / (T - 1)`` times plain Monte Carlo's, Owen 1997), so it errs on the
    safe side for them.
    """
    total = means.variance().double()
    squared_error = means.variance_standard_error().double().square()
    if variances is not None:
        total = total + variances.mean.double()
        squared_error = squared_error + variances.variance().double() / variances.count
    positive = total > 0
    if not positive.any():
        return 0.0
    per_voxel = torch.where(positive, squared_error / (4.0 * total.clamp_min(torch.finfo(total.dtype).tiny)), 0.0)
    return math.sqrt(float(per_voxel.sum() / total.clamp_min(0).sum()))


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
