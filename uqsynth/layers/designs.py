"""Sample designs: how the T samples of one slice share their random numbers.

Plain Monte Carlo draws every dropout mask independently. The T masks of
one slice need not be independent to give an unbiased mean and variance,
only identically distributed; arranging them well lowers the error of the
estimates at a given T (variance reduction). A stochastic layer that draws
its noise from uniforms through :meth:`StochasticLayer.uniform
<uqsynth.layers.base.StochasticLayer.uniform>` supports every design here:

- ``"independent"``: plain Monte Carlo (what a layer does with no design set).
- ``"antithetic"``: samples in pairs ``(u, 1 - u)``. For Bernoulli dropout at
  ``p = 0.5`` the pair's masks are complements (every unit is kept in exactly
  one of the two), for concrete dropout the pair's logistic noises are
  opposite. This cancels the part of the output that is *linear* in the mask,
  which lowers the error of the mean; it does nothing for, or even raises, the
  error of the variance, whose squared deviations the pair shares.
- ``"stratified"``: Latin hypercube sampling over the group's samples. Each
  mask element's ``k`` uniforms are one in each of the ``k`` strata
  ``[i/k, (i+1)/k)``, in a random order, independently for every element. A
  Bernoulli unit is then kept in ``round((1 - p) k)`` of the ``k`` samples,
  give or take one, instead of a binomial number, so the mask frequencies are
  exact and both the mean's and the variance's errors fall.

Every sample's uniforms are still marginally ``U(0, 1)``, so every design
estimates the same moments; the estimates' errors differ. The sampling engine
lays a pass out as ``n`` slices times ``group`` samples along the batch axis
(the samples of a slice adjacent) and designs each pass on its own, so a
design never couples samples of different slices or of different passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

DesignKind = Literal["independent", "antithetic", "stratified"]

#: The designs :class:`SampleDesign` can draw.
DESIGNS: tuple[str, ...] = ("independent", "antithetic", "stratified")

#: What a layer whose noise is all drawn by :meth:`StochasticLayer.uniform
#: <uqsynth.layers.base.StochasticLayer.uniform>` declares as its ``supported_designs``.
EVERY_DESIGN: frozenset[str] = frozenset(DESIGNS)


@dataclass(frozen=True)
class SampleDesign:
    """A design for batches of ``n x group`` rows: ``group`` adjacent rows are samples of one slice.

    Attributes:
        kind: One of :data:`DESIGNS`.
        group: Samples per slice in the batch (at least 1).
    """

    kind: DesignKind
    group: int

    def __post_init__(self) -> None:
        if self.kind not in DESIGNS:
            raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {self.kind!r}")
        if self.group < 1:
            raise ValueError(f"a design needs at least one sample per group, got {self.group}")

    def uniform(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Uniforms of ``shape`` (batch axis first, a multiple of :attr:`group`) arranged by the design.

        Drawn in float32 from torch's global generator (seeded by the
        sampling engine) and cast to ``dtype``: in bfloat16 the strata of a
        large group would round into each other.
        """
        shape = tuple(int(s) for s in shape)
        batch, rest = shape[0], shape[1:]
        if batch % self.group:
            raise ValueError(f"a batch of {batch} rows is not whole groups of {self.group} samples")
        grouped = (batch // self.group, self.group, *rest)
        if self.kind == "independent" or self.group == 1:
            u = torch.rand(grouped, device=device)
        elif self.kind == "antithetic":
            half = torch.rand((grouped[0], (self.group + 1) // 2, *rest), device=device)
            # Pairs side by side: rows 2j and 2j + 1 of a group are u_j and 1 - u_j (an odd group's last is unpaired).
            u = torch.stack((half, 1.0 - half), dim=2).flatten(1, 2)[:, : self.group]
        else:
            order = torch.rand(grouped, device=device).argsort(dim=1)  # a random permutation per element
            u = (order + torch.rand(grouped, device=device)) / self.group
        return u.reshape(shape).to(dtype)
