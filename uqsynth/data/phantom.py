"""Built-in phantom: paired T1w/T2w brain-like volumes simulated from MR physics.

The phantom is the default data set, so uqsynth runs (tests, examples,
benchmarks) with nothing downloaded. It is built so that the T1w -> T2w mapping
has the structure the paper's method is about: mostly predictable, because both
contrasts come from the same proton density (PD), T1 and T2 maps, and in places
genuinely ambiguous, because some tissues look alike in T1w and differ in T2w.

Anatomy (all distances in mm, in a "template" frame that a smooth random
deformation and a per-axis scale map onto the image):

* The brain's outer boundary is an ellipsoid whose radius is modulated by a
  random polynomial of degree <= 3 in the direction (the span of the spherical
  harmonics of degree <= 3), flattened at the base.
* The cortex is a grey-matter (GM) ribbon below a thin CSF layer. Sulci are the
  zero level set of a band-passed random field (a maze of sheets about 12 mm
  apart), cut from the surface down to a depth that varies over the brain;
  each sulcus holds a thin CSF sheet lined by GM, and white matter (WM) starts
  one GM thickness (itself a smooth field, 2-4.5 mm) away from any CSF. An
  interhemispheric fissure cuts between the hemispheres.
* Two lateral ventricles (body, frontal, occipital and temporal horns; tilted
  so that a coronal slice shows the butterfly), a third ventricle and deep GM
  nuclei (thalamus, caudate head, lentiform nucleus) sit near the centre.
* Optionally a lesion: a necrotic core inside an enhancing rim inside an
  irregular, larger edema, which spreads through WM and mostly spares cortex.
  The lesion pushes the surrounding anatomy outwards (mass effect).

Region labels (``SubjectVolumes.regions``, names in :data:`REGION_NAMES`):
each brain voxel is labelled with its dominant tissue, the one with the
largest fraction (ties go to the first in :data:`TISSUES` order), so a
partial-volume voxel belongs to exactly one region. There are six: CSF (the
outer CSF, sulci, fissure and ventricles), grey matter (the cortical ribbon
and the deep grey nuclei: the phantom draws them as the same tissue), white
matter, and the lesion's parts, edema, enhancing rim and necrotic core
(present only where a lesion is drawn and large enough to dominate a voxel).
Outside the brain mask the label is 0.

Partial volume is simulated by turning every signed distance to a boundary
into a tissue fraction with a linear ramp one voxel wide (the exact fraction
for a planar boundary and a box-shaped voxel), so boundaries are not binary
and a coarser grid gives the same anatomy, more blurred.

Tissue parameters (PD relative to CSF, T1 and T2 in ms at 3 T) are drawn per
subject uniformly inside the ranges of :data:`TISSUES`, after Wansapura et al.
(1999) and Stanisz et al. (2005); the lesion ranges are deliberately wide, as in
the literature. A voxel's PD is the fraction-weighted PD of its tissues and its
relaxation rates (1/T1, 1/T2) are the proton-weighted average of the tissues'
rates (the fast-exchange approximation), with a +/-2 % smooth texture.

Signals:

* T1w: spoiled gradient echo, S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*),
  E1 = exp(-TR/T1), TR ~ 10 ms, a 10-15 deg (``t1w_flip_deg``; 20-30 deg gives a
  more strongly T1-weighted image, see :func:`make_phantom`), TE ~ 4 ms. T2* is taken as
  0.8 T2 (:data:`T2STAR_FACTOR`): at 3 T static-field inhomogeneity shortens T2*
  to roughly 0.7-0.9 T2 in brain tissue, and with TE = 4 ms the term moves
  the T1w signal by a few percent at most, so a fixed ratio suffices.
* T2w: spin echo, S = PD (1 - exp(-TR/T1)) exp(-TE/T2), TR 4000-6000 ms,
  TE 90-110 ms.

Each contrast is scaled by a receiver gain that makes normal white matter read
1000, multiplied by its own smooth bias field (an exponentiated random
quadratic, +/-10-20 %), and corrupted by Rician noise (the magnitude of complex
Gaussian noise, sigma 2-4 % of white matter). Volumes are skull-stripped: exactly
zero outside the brain mask and positive inside it.

With the table's typical values edema and GM differ by about 12 % in T1w but
by about 50 % in T2w (edema's T2 is twice GM's while their T1 overlap): under
bias and noise the T1w barely tells them apart, yet the T2w it must predict
differs a lot, so the mapping carries real ambiguity.

Randomness: ``numpy.random.SeedSequence([seed, index])`` (the sequence that
``numpy.random.default_rng([seed, index])`` uses) is split into one stream per
component (anatomy, lesion, tissues, sequences, noise), and every random field
lives on a lattice fixed in millimetres, so a subject is identical across runs
(on a given platform), its anatomy does not depend on the grid it is sampled
on, and changing ``lesion_probability`` only adds or removes lesions.

References:
    Wansapura J.P., Holland S.K., Dunn R.S., Ball W.S. (1999). NMR relaxation
    times in the human brain at 3.0 Tesla. J. Magn. Reson. Imaging 9(4):531-538.

    Stanisz G.J., Odrobina E.E., Pun J., Escaravage M., Graham S.J., Bronskill M.J.,
    Henkelman R.M. (2005). T1, T2 relaxation and magnetization transfer in tissue
    at 3T. Magn. Reson. Med. 54(3):507-512.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from uqsynth._files import atomic_path
from uqsynth.data.base import Dataset, SubjectVolumes, copy_volumes
from uqsynth.errors import DataError

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_FOV_MM",
    "REGION_LABELS",
    "REGION_NAMES",
    "T1W_SEQUENCE",
    "T2W_SEQUENCE",
    "T2STAR_FACTOR",
    "TISSUES",
    "PhantomDataset",
    "PhantomSubject",
    "Tissue",
    "make_phantom",
    "region_labels",
    "make_subject",
    "spin_echo",
    "spoiled_gradient_echo",
    "write_subjects",
]

#: Grid of a subject by default (R, A, S): 1.75 mm voxels over 224 x 224 x 168 mm.
#: Axial slices are square, as BraTS's 240 x 240, and a subject takes under a
#: second on a 2-core CPU.
DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 96)

#: Smallest field of view (R, A, S) in mm that the default voxel size covers;
#: every phantom brain fits inside it.
DEFAULT_FOV_MM: tuple[float, float, float] = (192.0, 224.0, 160.0)

#: T2* / T2 used in the gradient-echo model (see the module docstring).
T2STAR_FACTOR = 0.8

#: Ranges (low, high) the T1w spoiled-gradient-echo parameters are drawn from.
T1W_SEQUENCE: dict[str, tuple[float, float]] = {
    "tr_ms": (9.5, 10.5),
    "te_ms": (3.8, 4.2),
    "flip_deg": (10.0, 15.0),
}

#: Ranges (low, high) the T2w spin-echo parameters are drawn from.
T2W_SEQUENCE: dict[str, tuple[float, float]] = {
    "tr_ms": (4000.0, 6000.0),
    "te_ms": (90.0, 110.0),
}

_WM_REFERENCE = 1000.0  # what normal white matter reads before bias and noise
_TEXTURE = 0.02  # relative std of the smooth within-tissue T1/T2 variation


@dataclass(frozen=True)
class Tissue:
    """Ranges a tissue's parameters are drawn from, per subject, uniformly.

    Attributes:
        name: Human-readable name.
        pd: Proton density relative to CSF, (low, high).
        t1_ms: Longitudinal relaxation time at 3 T in ms, (low, high).
        t2_ms: Transverse relaxation time at 3 T in ms, (low, high).
    """

    name: str
    pd: tuple[float, float]
    t1_ms: tuple[float, float]
    t2_ms: tuple[float, float]

    def midpoint(self) -> dict[str, float]:
        """The centre of each range: the tissue's typical values."""
        return {key: 0.5 * (lo + hi) for key, (lo, hi) in self._ranges().items()}

    def draw(self, rng: np.random.Generator) -> dict[str, float]:
        """One subject's values, uniform inside the ranges."""
        return {key: float(rng.uniform(lo, hi)) for key, (lo, hi) in self._ranges().items()}

    def _ranges(self) -> dict[str, tuple[float, float]]:
        return {"pd": self.pd, "t1_ms": self.t1_ms, "t2_ms": self.t2_ms}


#: The phantom's tissues, DESIGN.md section 2 (3 T; Wansapura et al. 1999,
#: Stanisz et al. 2005). Single PD values carry a +/-0.02 jitter; CSF's PD is
#: the reference and stays 1. The order is the order of tissue fractions.
TISSUES: dict[str, Tissue] = {
    "csf": Tissue("CSF", (1.0, 1.0), (3700.0, 4300.0), (1500.0, 2000.0)),
    "grey_matter": Tissue("grey matter", (0.78, 0.82), (1330.0, 1820.0), (100.0, 110.0)),
    "white_matter": Tissue("white matter", (0.67, 0.71), (830.0, 1080.0), (70.0, 80.0)),
    "edema": Tissue("edema", (0.85, 0.90), (1400.0, 1700.0), (150.0, 250.0)),
    "enhancing_rim": Tissue(
        "enhancing rim (pre-contrast)", (0.78, 0.82), (1200.0, 1600.0), (100.0, 150.0)
    ),
    "necrotic_core": Tissue("necrotic core", (0.90, 0.95), (2000.0, 3000.0), (300.0, 800.0)),
}


#: Region label of each tissue (keys of :data:`TISSUES`), in their order; 0 is "outside the brain".
REGION_LABELS: dict[str, int] = {name: index + 1 for index, name in enumerate(TISSUES)}

#: Label -> region name: the tissue's readable name ("enhancing rim", without
#: the "(pre-contrast)" that qualifies its relaxation times).
REGION_NAMES: dict[int, str] = {
    REGION_LABELS[name]: TISSUES[name].name.split(" (")[0] for name in TISSUES
}


def region_labels(fractions: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Each brain voxel's dominant tissue as a region label (:data:`REGION_LABELS`), 0 outside ``mask``.

    Args:
        fractions: Tissue name (keys of :data:`TISSUES`) -> fraction map.
        mask: Brain mask, same shape.

    Returns:
        int16 labels: the tissue with the largest fraction (ties: the first in
        :data:`TISSUES` order) inside the mask, 0 outside.
    """
    dominant = np.zeros(mask.shape, dtype=np.int16)
    best = np.full(mask.shape, -np.inf, dtype=np.float32)
    for name in TISSUES:
        larger = fractions[name] > best  # strict: a tie keeps the earlier tissue
        best = np.where(larger, fractions[name], best)
        dominant[larger] = REGION_LABELS[name]
    dominant[~mask] = 0
    return dominant


def spoiled_gradient_echo(pd, t1_ms, t2_ms, *, tr_ms, te_ms, flip_deg, t2star_factor=T2STAR_FACTOR):
    """Steady-state spoiled gradient-echo signal (the phantom's T1w).

    Args:
        pd: Proton density (relative to CSF); scalar or array.
        t1_ms: T1 in ms; scalar or array.
        t2_ms: T2 in ms; T2* is taken as ``t2star_factor * t2_ms``.
        tr_ms: Repetition time in ms.
        te_ms: Echo time in ms.
        flip_deg: Flip angle in degrees.
        t2star_factor: T2* / T2.

    Returns:
        PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE / T2*), E1 = exp(-TR / T1).
    """
    alpha = math.radians(flip_deg)
    e1 = np.exp(-tr_ms / t1_ms)
    return pd * math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1) * np.exp(
        -te_ms / (t2star_factor * t2_ms)
    )


def spin_echo(pd, t1_ms, t2_ms, *, tr_ms, te_ms):
    """Spin-echo signal with full recovery between echoes (the phantom's T2w).

    Returns:
        PD (1 - exp(-TR / T1)) exp(-TE / T2).
    """
    return pd * (1.0 - np.exp(-tr_ms / t1_ms)) * np.exp(-te_ms / t2_ms)


@dataclass
class PhantomSubject:
    """A generated subject with its ground truth, for documentation and tests.

    Attributes:
        volumes: What a dataset returns (T1w source, T2w target, mask, affine, info,
            region labels of the dominant tissue).
        fractions: Tissue name (keys of :data:`TISSUES`) -> float32 fraction map;
            fractions sum to 1 in every brain voxel and are 0 outside the mask.
        pd: Proton-density map (0 outside the mask, as are the other maps).
        t1_ms: T1 map in ms.
        t2_ms: T2 map in ms.
        bias_t1w: Multiplicative bias field of the T1w image.
        bias_t2w: Multiplicative bias field of the T2w image.
    """

    volumes: SubjectVolumes
    fractions: dict[str, np.ndarray]
    pd: np.ndarray
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    bias_t1w: np.ndarray
    bias_t2w: np.ndarray


# ---------------------------------------------------------------------------
# Validation


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        entries = tuple(shape)
    except TypeError:
        entries = ()
    if len(entries) != 3 or not all(_is_int(n) and n >= 16 for n in entries):
        raise DataError(f"phantom: shape must be 3 integers >= 16, got {shape!r}")
    return tuple(int(n) for n in entries)


def _check_flip_range(t1w_flip_deg) -> tuple[float, float]:
    """``(low, high)`` flip angles of the T1w in degrees, ``0 < low <= high < 90``."""
    try:
        low, high = (float(v) for v in t1w_flip_deg)
        valid = not any(isinstance(v, bool) for v in t1w_flip_deg) and 0.0 < low <= high < 90.0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DataError(
            f"phantom: t1w_flip_deg must be two angles in degrees, 0 < low <= high < 90, got {t1w_flip_deg!r}"
        )
    return low, high


def _check_probability(lesion_probability) -> float:
    if (
        not isinstance(lesion_probability, numbers.Real)
        or isinstance(lesion_probability, bool)
        or not 0.0 <= lesion_probability <= 1.0
    ):
        raise DataError(
            f"phantom: lesion_probability must be a number in [0, 1], got {lesion_probability!r}"
        )
    return float(lesion_probability)


def _check_count(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise DataError(f"phantom: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _voxel_size(shape: tuple[int, int, int], voxel_size_mm) -> float:
    """The given voxel size, or the isotropic one that fits the default field of view."""
    if voxel_size_mm is None:
        return max(fov / n for fov, n in zip(DEFAULT_FOV_MM, shape))
    if (
        not isinstance(voxel_size_mm, numbers.Real)
        or isinstance(voxel_size_mm, bool)
        or not math.isfinite(voxel_size_mm)
        or voxel_size_mm <= 0
    ):
        raise DataError(f"phantom: voxel_size_mm must be a positive number, got {voxel_size_mm!r}")
    return float(voxel_size_mm)


# ---------------------------------------------------------------------------
# Random fields on lattices fixed in millimetres (so anatomy is grid-independent)


@dataclass(frozen=True)
class _Lattice:
    """A regular lattice in mm on which smooth random fields are drawn."""

    origin: tuple[float, float, float]
    step: float
    shape: tuple[int, int, int]

    def field(self, rng: np.random.Generator, sigma: float, sigma_out: float | None = None):
        """Gaussian-smoothed (or band-passed, if ``sigma_out``) white noise, unit std."""
        noise = rng.standard_normal(self.shape, dtype=np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma, mode="wrap")
        if sigma_out is not None:
            smooth -= ndimage.gaussian_filter(noise, sigma_out, mode="wrap")
        smooth /= smooth.std()
        return smooth


# Coarse lattice: 8 mm steps over +/-128 mm, for slowly varying fields.
_COARSE = _Lattice(origin=(-128.0, -128.0, -128.0), step=8.0, shape=(33, 33, 33))
# Fine lattice: 2 mm steps over the template brain, for the cortical folds.
_FINE = _Lattice(origin=(-92.0, -108.0, -78.0), step=2.0, shape=(93, 109, 79))


def _bspline_taps(positions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice nodes (4 x n, clamped at the ends) and cubic B-spline weights (4 x n)."""
    base = np.floor(positions)
    f = positions - base
    weights = np.stack(
        [(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]
    )
    nodes = np.clip(base.astype(int) + np.arange(-1, 3)[:, None], 0, size - 1)
    return nodes, (weights / 6.0).astype(np.float32)


def _sample_on_grid(lattice: _Lattice, values: np.ndarray, axes_mm) -> np.ndarray:
    """Sample a lattice field at the image grid points (cubic B-spline, C2-smooth).

    The grid is a product of three axes, so the interpolation separates into
    four-tap filters along each axis (the outermost last, where the gathers
    copy whole contiguous planes). Plain numpy on purpose: small multithreaded
    BLAS calls spin and slow everything else down on a busy 2-core machine.
    """
    out = values
    for axis in (2, 1, 0):
        nodes, weights = _bspline_taps(
            (np.asarray(axes_mm[axis]) - lattice.origin[axis]) / lattice.step, lattice.shape[axis]
        )
        shape = [1, 1, 1]
        shape[axis] = -1
        acc = np.take(out, nodes[0], axis=axis) * weights[0].reshape(shape)
        for tap in range(1, 4):
            acc += np.take(out, nodes[tap], axis=axis) * weights[tap].reshape(shape)
        out = acc
    return out


def _sample_at(lattice: _Lattice, values: np.ndarray, points) -> np.ndarray:
    """Sample a lattice field at arbitrary points (three arrays of mm)."""
    coords = np.stack([(p - o) / lattice.step for p, o in zip(points, lattice.origin)])
    return ndimage.map_coordinates(values, coords, order=1, mode="nearest")


def _ramp(signed_distance, voxel_mm: float):
    """Partial-volume fraction of the side where ``signed_distance`` > 0.

    The exact fraction of a box voxel cut by a plane: a ramp one voxel wide.
    """
    return np.clip(0.5 + signed_distance / voxel_mm, 0.0, 1.0)


def _between(field: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map a unit-std field smoothly onto (low, high)."""
    return low + (high - low) * 0.5 * (1.0 + np.tanh(field))


def _bbox(inside: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box of slices holding every True voxel, or None if none."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


# ---------------------------------------------------------------------------
# Per-subject random draws (each from its own stream)

_SEMI_AXES_MM = np.array([67.0, 82.0, 58.0])  # template brain, before scaling and bumps
_BUMP_STD = (0.02, 0.015, 0.01)  # std of the direction polynomial's coefficients, by degree
_MONOMIAL_DEGREES = (1,) * 3 + (2,) * 6 + (3,) * 10  # the degrees of _monomials' terms


def _monomials(ux, uy, uz) -> list:
    """Degree 1-3 monomials of the direction: they span the spherical harmonics of degree <= 3."""
    first = [ux, uy, uz]
    second = [ux * ux, uy * uy, uz * uz, ux * uy, ux * uz, uy * uz]
    third = [a * b for a, b in zip(second, first)]  # x^3, y^3, z^3
    third += [ux * ux * uy, ux * ux * uz, uy * uy * ux, uy * uy * uz, uz * uz * ux, uz * uz * uy]
    return first + second + third + [ux * uy * uz]


def _draw_anatomy(rng: np.random.Generator) -> dict:
    """Shape parameters and random fields of the normal anatomy."""
    return {
        "scale": rng.uniform(0.93, 1.05, size=3),
        "bumps": np.array([rng.normal(0.0, _BUMP_STD[d - 1]) for d in _MONOMIAL_DEGREES]),
        "deform_mm": rng.uniform(1.5, 4.0),
        "deform": [_COARSE.field(rng, 2.0) for _ in range(3)],
        "folds": _FINE.field(rng, 1.5, 3.0),
        "gm_thickness": (rng.uniform(2.2, 2.8), rng.uniform(3.6, 4.6)),
        "gm_thickness_field": _COARSE.field(rng, 1.5),
        "sulcal_depth": (rng.uniform(7.0, 10.0), rng.uniform(16.0, 22.0)),
        "sulcal_depth_field": _COARSE.field(rng, 1.5),
        "outer_csf_mm": rng.uniform(0.8, 2.0),
        "sulcal_csf_mm": rng.uniform(0.4, 1.0),
        "fissure_csf_mm": rng.uniform(0.8, 1.6),
        "fissure_depth_mm": rng.uniform(25.0, 32.0),
        "ventricle_size": rng.uniform(0.75, 1.4) * rng.uniform(0.92, 1.08, size=2),
        "texture": [_COARSE.field(rng, 1.0) for _ in range(2)],
    }


def _draw_lesion(rng: np.random.Generator, lesion_probability: float) -> dict:
    """Lesion parameters; always drawn so the stream does not depend on presence."""
    u = rng.random()
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    centre = direction * rng.uniform(0.25, 0.55) * _SEMI_AXES_MM
    if abs(centre[0]) < 15.0:  # keep it in a hemisphere, off the midline structures
        centre[0] = math.copysign(15.0, centre[0] if centre[0] != 0 else 1.0)
    radius = rng.uniform(6.0, 18.0)
    return {
        "present": bool(u < lesion_probability),
        "centre": centre,
        "radius_mm": radius,
        "core_radius_mm": radius * rng.uniform(0.3, 0.7),
        "edema_radius_mm": radius + rng.uniform(8.0, 25.0),
        "mass_effect": rng.uniform(0.15, 0.45),
        "shape": _COARSE.field(rng, 1.5),
    }


def _draw_sequences(rng: np.random.Generator, t1w_flip_deg: tuple[float, float]) -> dict:
    """Sequence parameters, bias-field polynomials and noise levels for both contrasts.

    The flip-angle range only moves the T1w's flip: every draw consumes the same random number.
    """
    out = {}
    t1w = {**T1W_SEQUENCE, "flip_deg": t1w_flip_deg}
    for name, ranges in (("t1w", t1w), ("t2w", T2W_SEQUENCE)):
        params = {key: float(rng.uniform(lo, hi)) for key, (lo, hi) in ranges.items()}
        params["bias_amplitude"] = float(rng.uniform(0.10, 0.20))
        params["noise_fraction"] = float(rng.uniform(0.02, 0.04))
        out[name] = (params, rng.normal(size=9))
    return out


# ---------------------------------------------------------------------------
# Anatomy


def _template_coordinates(anatomy: dict, axes_mm) -> list[np.ndarray]:
    """Image mm -> template mm: smooth random displacement, then a per-axis scale."""
    grids = np.meshgrid(*[ax.astype(np.float32) for ax in axes_mm], indexing="ij", sparse=True)
    coords = []
    for axis in range(3):
        shift = _sample_on_grid(_COARSE, anatomy["deform"][axis], axes_mm)
        shift *= anatomy["deform_mm"]
        coords.append((grids[axis] + shift) / np.float32(anatomy["scale"][axis]))
    return coords


def _mass_effect(coords, lesion: dict) -> list[np.ndarray]:
    """Pull the coordinates at which normal anatomy is read towards the lesion.

    Reading the anatomy closer to the lesion centre pushes it outwards in the
    image. The map r -> r (1 - k exp(-r^2 / 2 s^2)) stays monotonic for k < 1.
    """
    centre = lesion["centre"]
    sigma = lesion["radius_mm"] + 4.0
    diff = [c - np.float32(m) for c, m in zip(coords, centre)]
    r2 = diff[0] ** 2 + diff[1] ** 2 + diff[2] ** 2
    factor = 1.0 - lesion["mass_effect"] * np.exp(-r2 / np.float32(2.0 * sigma * sigma))
    return [np.float32(m) + d * factor for d, m in zip(diff, centre)]


def _depth(coords, anatomy: dict) -> tuple[np.ndarray, np.ndarray]:
    """Radial depth below the brain surface (mm, negative outside) and the up component.

    The surface radius along a direction u is the ellipsoid's times
    (1 + random polynomial in u), flattened below (the brain's base is flatter).
    """
    x, y, z = coords
    rho = np.sqrt(x * x + y * y + z * z)
    np.maximum(rho, 1e-3, out=rho)
    ux, uy, uz = x / rho, y / rho, z / rho
    a, b, c = (float(v) for v in _SEMI_AXES_MM)  # Python floats keep the arrays float32
    inv_radius = np.sqrt((ux / a) ** 2 + (uy / b) ** 2 + (uz / c) ** 2)
    bumps = -0.08 * np.minimum(uz, 0.0) ** 2
    for coef, term in zip(anatomy["bumps"], _monomials(ux, uy, uz)):
        bumps = bumps + np.float32(coef) * term
    return (1.0 + bumps) / inv_radius - rho, uz


def _cortex(coords, depth, up, anatomy: dict, axes_mm, voxel_mm: float):
    """CSF, GM and WM fractions of the folded cortex (deep structures come later)."""
    folds = _sample_at(_FINE, anatomy["folds"], coords)
    grad = np.gradient(folds, voxel_mm)
    slope = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)
    to_sheet = np.abs(folds) / np.maximum(slope, 0.02)  # first-order distance to F = 0
    sulcal_depth = _between(
        _sample_on_grid(_COARSE, anatomy["sulcal_depth_field"], axes_mm), *anatomy["sulcal_depth"]
    )
    thickness = _between(
        _sample_on_grid(_COARSE, anatomy["gm_thickness_field"], axes_mm), *anatomy["gm_thickness"]
    )
    # Sulci and the fissure are sheets cut from the surface down to a depth;
    # below it, the distance is to the sheet's bottom edge.
    to_sulcus = np.hypot(to_sheet, np.maximum(depth - sulcal_depth, 0.0))
    fissure_depth = np.maximum(anatomy["fissure_depth_mm"] + 8.0 * up, 8.0)
    to_fissure = np.hypot(np.abs(coords[0]), np.maximum(depth - fissure_depth, 0.0))
    to_csf = np.minimum(depth - anatomy["outer_csf_mm"], to_sulcus - anatomy["sulcal_csf_mm"])
    np.minimum(to_csf, to_fissure - anatomy["fissure_csf_mm"], out=to_csf)
    csf = _ramp(-to_csf, voxel_mm)
    wm = _ramp(to_csf - thickness, voxel_mm)
    return csf, 1.0 - csf - wm, wm


def _rotation(roll_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
    """Rows = a blob's local axes in template coordinates (roll about A, then pitch about R)."""
    r, p = math.radians(roll_deg), math.radians(pitch_deg)
    roll = np.array([[math.cos(r), 0, -math.sin(r)], [0, 1, 0], [math.sin(r), 0, math.cos(r)]])
    pitch = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    return pitch @ roll


def _blob_union(coords, blobs, voxel_mm: float) -> np.ndarray:
    """Fraction inside a union of rotated ellipsoids (centre, semi-axes, rotation)."""
    outside = np.ones_like(coords[0])
    for centre, semi, rot in blobs:
        diff = [c - np.float32(m) for c, m in zip(coords, centre)]
        q2 = 0
        for row, s in zip(rot, semi):
            local = diff[0] * np.float32(row[0]) + diff[1] * np.float32(row[1])
            local += diff[2] * np.float32(row[2])
            q2 = q2 + (local / np.float32(s)) ** 2
        outside *= 1.0 - _ramp((1.0 - np.sqrt(q2)) * min(semi), voxel_mm)
    return 1.0 - outside


def _ventricle_blobs(size) -> list:
    """Lateral ventricles (body, horns) per side, tilted into the butterfly, and the third."""
    blobs = [((0.0, -4.0, -2.0), (1.2 * size.mean(), 12.0, 8.0), _rotation())]
    for side, v in zip((-1.0, 1.0), size):
        blobs += [
            ((side * 6, -2, 13), (3.5 * v, 22, 7 * v), _rotation(roll_deg=side * 25)),
            ((side * 9, 20, 9), (4.5 * v, 10, 6.5 * v), _rotation(roll_deg=side * 30)),
            ((side * 15, -24, 7), (5 * v, 9, 7 * v), _rotation()),
            ((side * 15, -36, 5), (2.5 * v, 8, 3 * v), _rotation()),
            ((side * 26, -8, -12), (2.5 * v, 13, 3 * v), _rotation(pitch_deg=20)),
        ]
    return blobs


def _deep_grey_blobs() -> list:
    """Thalamus, caudate head and lentiform nucleus on each side."""
    blobs = []
    for side in (-1.0, 1.0):
        blobs += [
            ((side * 10, -12, 2), (8, 12, 8), _rotation()),
            ((side * 14, 14, 10), (4.5, 9, 7), _rotation()),
            ((side * 22, 2, 0), (6, 14, 9), _rotation()),
        ]
    return blobs


def _add_central_structures(coords, fractions, anatomy: dict, voxel_mm: float) -> None:
    """Turn WM into deep GM and anything into ventricular CSF, near the centre only."""
    x, y, z = coords
    near = (np.abs(x) < 45) & (np.abs(y) < 55) & (z > -30) & (z < 35)
    box = _bbox(near)
    if box is None:
        return
    local = [c[box] for c in coords]
    csf, gm, wm = (fractions[k][box] for k in ("csf", "grey_matter", "white_matter"))
    deep = _blob_union(local, _deep_grey_blobs(), voxel_mm)
    gm += wm * deep
    wm *= 1.0 - deep
    ventricles = _blob_union(local, _ventricle_blobs(anatomy["ventricle_size"]), voxel_mm)
    csf += (gm + wm) * ventricles
    gm *= 1.0 - ventricles
    wm *= 1.0 - ventricles


def _add_lesion(coords, fractions, lesion: dict, axes_mm, voxel_mm: float) -> None:
    """Replace tissue by necrotic core and enhancing rim; turn WM (and some GM) into edema."""
    diff = [c - np.float32(m) for c, m in zip(coords, lesion["centre"])]
    r = np.sqrt(diff[0] ** 2 + diff[1] ** 2 + diff[2] ** 2)
    # tanh bounds the irregularity (edema radius <= 1.3 x), so the box holds all of it.
    box = _bbox(r < 1.3 * lesion["edema_radius_mm"] + voxel_mm)
    if box is None:
        return
    r = r[box]
    local_axes = [ax[s] for ax, s in zip(axes_mm, box)]
    shape = np.tanh(_sample_on_grid(_COARSE, lesion["shape"], local_axes))
    tumour = _ramp(lesion["radius_mm"] * (1.0 + 0.15 * shape) - r, voxel_mm)
    core = _ramp(lesion["core_radius_mm"] * (1.0 + 0.15 * shape) - r, voxel_mm)
    swelling = _ramp(lesion["edema_radius_mm"] * (1.0 + 0.3 * shape) - r, voxel_mm)
    for name in ("csf", "grey_matter", "white_matter"):
        fractions[name][box] *= 1.0 - tumour
    fractions["necrotic_core"][box] = core
    fractions["enhancing_rim"][box] = tumour - core
    # Vasogenic edema follows white-matter tracts and largely spares the cortex.
    from_wm = fractions["white_matter"][box] * swelling
    from_gm = fractions["grey_matter"][box] * swelling * 0.3
    fractions["white_matter"][box] -= from_wm
    fractions["grey_matter"][box] -= from_gm
    fractions["edema"][box] = from_wm + from_gm


# ---------------------------------------------------------------------------
# Physics


def _parameter_maps(fractions, tissues: dict, anatomy: dict, axes_mm):
    """PD, T1 and T2 maps: PD mixes by fraction, rates by proton-weighted fraction."""
    pd = sum(fractions[k] * np.float32(tissues[k]["pd"]) for k in TISSUES)
    r1 = sum(fractions[k] * np.float32(tissues[k]["pd"] / tissues[k]["t1_ms"]) for k in TISSUES)
    r2 = sum(fractions[k] * np.float32(tissues[k]["pd"] / tissues[k]["t2_ms"]) for k in TISSUES)
    texture = [1.0 + _TEXTURE * _sample_on_grid(_COARSE, f, axes_mm) for f in anatomy["texture"]]
    return pd, pd / r1 * texture[0], pd / r2 * texture[1]


def _bias_field(coefs: np.ndarray, amplitude: float, axes_mm, mask: np.ndarray) -> np.ndarray:
    """exp(amplitude * q / max|q| in the brain) for a random quadratic q: smooth, +/-amplitude."""
    scaled = [(ax / 100.0).astype(np.float32) for ax in axes_mm]  # O(1) over the brain
    x, y, z = np.meshgrid(*scaled, indexing="ij", sparse=True)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    poly = sum(np.float32(c) * t for c, t in zip(coefs, terms))
    peak = np.abs(poly[mask]).max() if mask.any() else 1.0
    return np.exp(np.float32(amplitude / max(peak, 1e-6)) * poly)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise."""
    noise = rng.standard_normal((2,) + signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.hypot(signal + noise[0], noise[1])


def _acquire(maps, tissues, sequences, rng_noise, axes_mm, mask):
    """Both images: signal equation, gain to WM = 1000, bias field, Rician noise, skull strip."""
    pd, t1, t2 = maps
    wm = tissues["white_matter"]
    out, biases, info = [], [], {}
    for name, model in (("t1w", spoiled_gradient_echo), ("t2w", spin_echo)):
        params, coefs = sequences[name]
        physics = {k: params[k] for k in params if k.endswith(("_ms", "_deg"))}
        gain = _WM_REFERENCE / float(model(wm["pd"], wm["t1_ms"], wm["t2_ms"], **physics))
        bias = _bias_field(coefs, params["bias_amplitude"], axes_mm, mask)
        sigma = params["noise_fraction"] * _WM_REFERENCE
        image = _rician(rng_noise, model(pd, t1, t2, **physics) * np.float32(gain) * bias, sigma)
        image[~mask] = 0.0
        out.append(image.astype(np.float32, copy=False))
        biases.append(bias.astype(np.float32, copy=False))
        info[name] = {**params, "gain": gain, "noise_sigma": sigma}
        if name == "t1w":
            info[name]["t2star_factor"] = T2STAR_FACTOR
    return out, biases, info


# ---------------------------------------------------------------------------
# Public API


def make_phantom(
    index: int,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    voxel_size_mm: float | None = None,
    lesion_probability: float = 0.7,
    t1w_flip_deg: tuple[float, float] = T1W_SEQUENCE["flip_deg"],
) -> PhantomSubject:
    """Generate one subject with its ground truth (fractions, maps, bias fields).

    Args:
        index: Subject number (>= 0); with ``seed`` it fixes every random draw.
        seed: Data-set seed (>= 0).
        shape: Grid (R, A, S), each >= 16.
        voxel_size_mm: Isotropic voxel size. ``None`` takes the smallest one
            whose field of view covers :data:`DEFAULT_FOV_MM` (1.75 mm at
            :data:`DEFAULT_SHAPE`, 4 mm at (48, 56, 40)). The brain has a fixed
            physical size, so a smaller field of view crops it.
        lesion_probability: Chance that the subject has a lesion.
        t1w_flip_deg: Range of the T1w's flip angle (degrees). The default,
            10-15 degrees at TR 10 ms, is barely above the Ernst angle of brain
            tissue (about 8 degrees), so the T1w is half proton-density weighted
            and edema, whose higher PD offsets its longer T1, reads within a few
            percent of white matter. 20-30 degrees gives the grey/white contrast
            of clinical 3D T1w scans (GM/WM 0.75) and edema about 15 % below white
            matter: a lesion the T1w shows.

    Returns:
        The subject's volumes and the maps they were simulated from.

    Raises:
        DataError: A parameter is out of range.
    """
    index = _check_count("index", index, 0)
    seed = _check_count("seed", seed, 0)
    shape = _check_shape(shape)
    lesion_probability = _check_probability(lesion_probability)
    t1w_flip_deg = _check_flip_range(t1w_flip_deg)
    voxel_mm = _voxel_size(shape, voxel_size_mm)

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(5)]
    rng_anatomy, rng_lesion, rng_tissue, rng_sequence, rng_noise = streams
    anatomy = _draw_anatomy(rng_anatomy)
    lesion = _draw_lesion(rng_lesion, lesion_probability)
    tissues = {name: tissue.draw(rng_tissue) for name, tissue in TISSUES.items()}
    sequences = _draw_sequences(rng_sequence, t1w_flip_deg)

    axes_mm = [(np.arange(n) - (n - 1) / 2.0) * voxel_mm for n in shape]
    coords = _template_coordinates(anatomy, axes_mm)
    normal = _mass_effect(coords, lesion) if lesion["present"] else coords
    depth, up = _depth(normal, anatomy)
    mask = depth > 0
    csf, gm, wm = _cortex(normal, depth, up, anatomy, axes_mm, voxel_mm)
    fractions = {name: np.zeros(shape, np.float32) for name in TISSUES}
    fractions.update(csf=csf, grey_matter=gm, white_matter=wm)
    _add_central_structures(normal, fractions, anatomy, voxel_mm)
    if lesion["present"]:
        _add_lesion(coords, fractions, lesion, axes_mm, voxel_mm)
    fractions = {k: v.astype(np.float32, copy=False) for k, v in fractions.items()}

    maps = _parameter_maps(fractions, tissues, anatomy, axes_mm)
    (t1w, t2w), (bias_t1w, bias_t2w), acquisition = _acquire(
        maps, tissues, sequences, rng_noise, axes_mm, mask
    )
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = [ax[0] for ax in axes_mm]
    info = _info(index, seed, shape, voxel_mm, lesion, fractions, affine, tissues, acquisition)
    volumes = SubjectVolumes(
        subject_id=_subject_id(index), source=t1w, target=t2w, mask=mask, affine=affine, info=info,
        regions=region_labels(fractions, mask), region_names=dict(REGION_NAMES),
    )
    pd, t1, t2 = (m.astype(np.float32, copy=False) for m in maps)
    for array in (*fractions.values(), pd, t1, t2):
        array[~mask] = 0.0  # like the images: nothing is known outside the brain
    return PhantomSubject(volumes, fractions, pd, t1, t2, bias_t1w, bias_t2w)


def _info(index, seed, shape, voxel_mm, lesion, fractions, affine, tissues, acquisition) -> dict:
    """JSON-serializable record of what was drawn, for provenance."""
    tumour = fractions["necrotic_core"] + fractions["enhancing_rim"]
    present = lesion["present"] and float(tumour.sum()) > 0
    centre = None
    if present:
        index_centre = ndimage.center_of_mass(tumour)
        centre = [float(v) for v in affine[:3, :3] @ np.asarray(index_centre) + affine[:3, 3]]
    return {
        "generator": "uqsynth.data.phantom",
        "seed": seed,
        "index": index,
        "shape": list(shape),
        "voxel_size_mm": voxel_mm,
        "lesion": bool(present),
        "lesion_center_mm": centre,
        "lesion_radius_mm": float(lesion["radius_mm"]) if present else None,
        "edema_radius_mm": float(lesion["edema_radius_mm"]) if present else None,
        "tissues": {name: {k: float(v) for k, v in p.items()} for name, p in tissues.items()},
        **{name: {k: float(v) for k, v in p.items()} for name, p in acquisition.items()},
    }


def _subject_id(index: int) -> str:
    return f"phantom-{index:03d}"


def make_subject(
    index: int,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    voxel_size_mm: float | None = None,
    lesion_probability: float = 0.7,
    t1w_flip_deg: tuple[float, float] = T1W_SEQUENCE["flip_deg"],
) -> SubjectVolumes:
    """Generate one subject's paired T1w (source) and T2w (target) volumes.

    Arrays are RAS+ (axis 0 left->right, 1 posterior->anterior,
    2 inferior->superior), float32, exactly zero outside ``mask``; ``affine`` is
    diagonal (voxel size) with the grid centre at the world origin; ``info``
    records the drawn tissue and sequence parameters and whether a lesion is
    present; ``regions`` labels each brain voxel with its dominant tissue
    (:func:`region_labels`, names in :data:`REGION_NAMES`). Arguments are
    those of :func:`make_phantom`.

    Raises:
        DataError: A parameter is out of range.
    """
    return make_phantom(
        index,
        seed=seed,
        shape=shape,
        voxel_size_mm=voxel_size_mm,
        lesion_probability=lesion_probability,
        t1w_flip_deg=t1w_flip_deg,
    ).volumes


class PhantomDataset(Dataset):
    """The built-in data set: ``subjects`` phantoms, generated on demand.

    Nothing is stored on disk; the two most recently loaded subjects are kept
    in memory because the slicing pipeline tends to ask for the same one twice.

    Args:
        subjects: How many subjects (>= 1).
        seed: Data-set seed; the same seed gives the same subjects.
        shape: Grid of each subject, entries >= 16.
        lesion_probability: Chance that a subject has a lesion, in [0, 1].
        t1w_flip_deg: Range of the T1w's flip angle in degrees (see
            :func:`make_phantom`: 20-30 makes the lesion visible in the T1w).

    Raises:
        DataError: A parameter is out of range (the message names it).
    """

    #: The generic name of the source contrast (``uqsynth predict`` reads a BraTS folder's files of it).
    source_contrast = "t1"
    #: And of the target contrast it synthesizes (what ``uqsynth predict``'s output names say).
    target_contrast = "t2"

    _CACHE_SIZE = 2

    def __init__(
        self,
        *,
        subjects: int = 12,
        seed: int = 0,
        shape: tuple[int, int, int] = DEFAULT_SHAPE,
        lesion_probability: float = 0.7,
        t1w_flip_deg: tuple[float, float] = T1W_SEQUENCE["flip_deg"],
    ) -> None:
        self.subjects = _check_count("subjects", subjects, 1)
        self.seed = _check_count("seed", seed, 0)
        self.shape = _check_shape(shape)
        self.lesion_probability = _check_probability(lesion_probability)
        self.t1w_flip_deg = _check_flip_range(t1w_flip_deg)
        self._ids = {_subject_id(i): i for i in range(self.subjects)}
        self._cache: OrderedDict[str, SubjectVolumes] = OrderedDict()

    def subject_ids(self) -> list[str]:
        """Ids ``phantom-000`` ... in index order."""
        return list(self._ids)

    def load(self, subject_id: str) -> SubjectVolumes:
        """Generate (or fetch from the small cache) one subject; a fresh copy each time.

        Raises:
            DataError: ``subject_id`` is not one of :meth:`subject_ids`.
        """
        if subject_id not in self._ids:
            raise DataError(
                f"phantom: unknown subject {subject_id!r}; this data set has "
                f"{_subject_id(0)} to {_subject_id(self.subjects - 1)}"
            )
        if subject_id in self._cache:
            self._cache.move_to_end(subject_id)
        else:
            self._cache[subject_id] = make_subject(
                self._ids[subject_id],
                seed=self.seed,
                shape=self.shape,
                lesion_probability=self.lesion_probability,
                t1w_flip_deg=self.t1w_flip_deg,
            )
            while len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        return copy_volumes(self._cache[subject_id])

    def __repr__(self) -> str:
        return (
            f"PhantomDataset(subjects={self.subjects}, seed={self.seed}, shape={self.shape}, "
            f"lesion_probability={self.lesion_probability}, t1w_flip_deg={self.t1w_flip_deg})"
        )


def write_subjects(
    out_dir: Path,
    subjects: int,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    orientation: str = "RAS",
    lesion_probability: float = 0.7,
) -> list[Path]:
    """Write phantoms as a BraTS 2023-style folder tree of NIfTI files.

    Each subject gets ``out_dir/<id>/<id>-t1n.nii.gz`` (T1w) and
    ``<id>-t2w.nii.gz`` (T2w), float32, with qform and sform set to the affine,
    so the phantom exercises the same file-based loaders as real data.

    Args:
        out_dir: Root folder; created if missing.
        subjects: How many subjects (>= 1).
        seed: Data-set seed.
        shape: Grid of each subject.
        orientation: ``"RAS"`` writes the arrays as generated; ``"LPS"`` flips
            array axes 0 and 1 and adjusts the affine, so the image in world
            space is identical (to test loaders against non-RAS storage).
        lesion_probability: Chance that a subject has a lesion.

    Returns:
        The subject directories, in index order.

    Raises:
        DataError: A parameter is out of range.
    """
    import nibabel as nib
    from nibabel import orientations as ornt

    subjects = _check_count("subjects", subjects, 1)
    shape = _check_shape(shape)
    _check_probability(lesion_probability)
    if orientation not in ("RAS", "LPS"):
        raise DataError(f"phantom: orientation must be 'RAS' or 'LPS', got {orientation!r}")
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(orientation))
    out_dir = Path(out_dir)
    directories = []
    for index in range(subjects):
        subject = make_subject(index, seed=seed, shape=shape, lesion_probability=lesion_probability)
        folder = out_dir / subject.subject_id
        folder.mkdir(parents=True, exist_ok=True)
        affine = subject.affine @ ornt.inv_ornt_aff(transform, shape)
        for suffix, data in (("t1n", subject.source), ("t2w", subject.target)):
            image = nib.Nifti1Image(ornt.apply_orientation(data, transform), affine)
            image.set_data_dtype(np.float32)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            image.header.set_xyzt_units("mm")
            _save_atomically(image, folder / f"{subject.subject_id}-{suffix}.nii.gz")
        directories.append(folder)
    return directories


def _save_atomically(image, path: Path) -> None:
    """Save a NIfTI image so readers never see half a file."""
    import nibabel as nib

    with atomic_path(path) as temporary:
        nib.save(image, temporary)