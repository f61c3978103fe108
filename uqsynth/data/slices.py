"""The paper's slice preprocessing, shared by every dataset.

From a subject's volumes to the network's inputs and back:

1. **Axial slicing from the affine.** Which array axis is inferior-superior is
   read from the affine (:func:`axial_axis`); data come in LPS, RAS or stored
   sagittally, so axis 2 is never assumed. :func:`to_axial_slices` reorients to
   a canonical view and :func:`from_axial_slices` is its exact inverse.
   Canonical view: ``slices[k]`` is the k-th axial slice counted from inferior
   to superior, rows run anterior -> posterior and columns patient right ->
   left, so ``imshow(slices[k])`` shows the usual radiological view.
2. **Per-slice normalization to [0, 1]** (:func:`normalize_slices`): each
   slice, source and target separately, is divided by its own robust maximum,
   the 99.5th percentile of its brain voxels, then clipped to [0, 1]. A
   percentile rather than the maximum, so a few hot voxels (vessels, flow or
   bias-field artefacts) do not squash the rest of the slice to dark grey.
   Negative values (interpolation undershoot after registration; the volumes
   are skull-stripped and otherwise >= 0) are clipped to 0. The per-slice
   scales are kept so predictions can be mapped back to intensities.
3. **Slice selection for training**: slices whose brain covers less than
   ``min_brain_fraction`` (default 2%) of the slice are skipped. Those are the
   caps of the brain: a few hundred voxels give a noisy robust maximum and
   nearly empty images that mostly teach the generator to draw background.
4. **Resizing**: bilinear (``align_corners=False``, no antialiasing) from the
   native in-plane size to ``load_size`` (paper: 286) and a random
   ``image_size`` crop (paper: 256) for training, with no flipping (the paper
   does not flip). Evaluation and prediction see the training scale: slices
   are resized to ``load_size`` too, and the generator runs on overlapping
   ``image_size`` tiles that cover the whole slice (:class:`EvalVolume`), so
   anatomy is exactly as large as in training (resizing straight to
   ``image_size`` would show it ``image_size / load_size`` times smaller:
   12 % for the paper's 256/286). Outputs are resized back to the native
   size, so they land on the input's own grid. Non-square slices are
   stretched to square and back, as pix2pix does.

Network tensors are in [-1, 1] (the generator ends in Tanh);
:func:`to_model_range` / :func:`from_model_range` convert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from uqsynth.data.base import Dataset, SubjectVolumes
from uqsynth.errors import ConfigError, DataError

#: Percentile of a slice's brain voxels used as its robust maximum.
ROBUST_PERCENTILE = 99.5
#: Training skips slices whose brain covers less than this fraction of the slice.
MIN_BRAIN_FRACTION = 0.02
#: The paper's resize target before cropping, and crop size (pix2pix defaults).
LOAD_SIZE = 286
IMAGE_SIZE = 256

# Array axes of the canonical volume before the final transpose: x increases to
# the patient's Left, y to Posterior, z to Superior. Transposed to (z, y, x) this
# gives slices from inferior to superior, rows A->P, columns R->L.
_CANONICAL = axcodes2ornt(("L", "P", "S"))


# --------------------------------------------------------------- orientation


def _orientation(affine: np.ndarray) -> np.ndarray:
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise DataError(f"affine has no usable orientation: {np.round(np.asarray(affine)[:3], 4).tolist()}")
    return ornt


def axial_axis(affine: np.ndarray) -> int:
    """Return the array axis closest to the world inferior-superior direction.

    Args:
        affine: 4x4 voxel-to-world (RAS+) affine; oblique ones are assigned
            their nearest axis, as :func:`nibabel.orientations.io_orientation` does.
    """
    return int(np.flatnonzero(_orientation(affine)[:, 0] == 2)[0])


def axial_subsample(volumes: SubjectVolumes, stride: int) -> SubjectVolumes:
    """Every ``stride``-th axial slice of a subject, as a thinner subject (the affine's axial step ``stride`` times longer).

    Why: the networks see one axial slice at a time and every slice is
    normalized on its own, so a slice's prediction does not depend on its
    neighbours; a calibrator fitted on a stride of slices sees the same
    kind of voxels at ``1 / stride`` of the sampling cost, and can be given
    more subjects for it (coverage varies more between subjects than
    between the slices of one).
    """
    if stride == 1:
        return volumes
    axis = axial_axis(volumes.affine)
    pick = [slice(None)] * volumes.source.ndim
    pick[axis] = slice(None, None, stride)
    pick = tuple(pick)
    affine = np.array(volumes.affine, dtype=np.float64, copy=True)
    affine[:3, axis] *= stride
    thin = lambda array: None if array is None else np.ascontiguousarray(array[pick])  # noqa: E731
    return dataclasses.replace(
        volumes, source=thin(volumes.source), target=thin(volumes.target), mask=thin(volumes.mask),
        regions=thin(volumes.regions), affine=affine, header=None,
    )


def to_axial_slices(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a volume into axial slices in the canonical view.

    Only flips and axis permutations are applied (no resampling), so
    :func:`from_axial_slices` restores the input bit for bit.

    Args:
        volume: 3D array in its file's axis order.
        affine: Its voxel-to-world affine.

    Returns:
        A new C-contiguous array ``(n_slices, H, W)``: inferior to superior,
        rows anterior -> posterior, columns right -> left.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    canonical = apply_orientation(volume, ornt_transform(_orientation(affine), _CANONICAL))
    return canonical.transpose(2, 1, 0).copy(order="C")


def from_axial_slices(slices: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Put canonical axial slices back into the original volume's grid (exact inverse).

    Args:
        slices: ``(n_slices, H, W)`` as returned by :func:`to_axial_slices`.
        affine: The original volume's affine.
        shape: The original volume's shape, checked against the result.

    Returns:
        A new C-contiguous array of shape ``shape``.
    """
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"expected slices (n, H, W), got shape {slices.shape}")
    volume = apply_orientation(slices.transpose(2, 1, 0), ornt_transform(_CANONICAL, _orientation(affine)))
    if volume.shape != tuple(shape):
        raise ValueError(f"slices {slices.shape} map to a volume of shape {volume.shape}, not {tuple(shape)}")
    return volume.copy(order="C")


# ------------------------------------------------------------- normalization


def brain_fraction(mask_slices: np.ndarray) -> np.ndarray:
    """Return the fraction of each slice ``(n, H, W)`` covered by brain, shape ``(n,)``."""
    mask_slices = np.asarray(mask_slices, dtype=bool)
    return mask_slices.reshape(len(mask_slices), -1).mean(axis=1)


def slice_scales(
    slices: np.ndarray, mask_slices: np.ndarray, percentile: float = ROBUST_PERCENTILE
) -> np.ndarray:
    """Return each slice's robust maximum: a percentile of its brain voxels.

    Returns:
        float32 array ``(n,)``; 0 for a slice with no brain voxels or a
        non-positive percentile (such a slice normalizes to all zeros, and
        mapping back by its scale gives zeros too).
    """
    scales = np.zeros(len(slices), dtype=np.float32)
    for k, (image, mask) in enumerate(zip(slices, mask_slices, strict=True)):
        voxels = image[mask]
        if voxels.size:
            scales[k] = max(float(np.percentile(voxels, percentile)), 0.0)
    return scales


def normalize_slices(
    slices: np.ndarray, mask_slices: np.ndarray, percentile: float = ROBUST_PERCENTILE
) -> tuple[np.ndarray, np.ndarray]:
    """Scale each slice to [0, 1] by its robust maximum (see the module docstring).

    Args:
        slices: ``(n, H, W)`` intensities.
        mask_slices: ``(n, H, W)`` brain mask; only brain voxels set the scale.
        percentile: Which percentile of the brain voxels is the robust maximum.

    Returns:
        ``(normalized, scales)``: float32 ``(n, H, W)`` in [0, 1] (values above
        the robust maximum clipped to 1, negatives to 0; all zero where the
        scale is 0) and the float32 ``(n,)`` scales, so ``normalized * scale``
        recovers the unclipped intensities.
    """
    slices = np.asarray(slices, dtype=np.float32)
    scales = slice_scales(slices, np.asarray(mask_slices, dtype=bool), percentile)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales > 0)
    normalized = np.clip(slices * inverse[:, None, None], 0.0, 1.0)
    normalized[scales == 0] = 0.0  # also turns any -0.0 into 0.0
    return normalized, scales


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] images to the generator's [-1, 1] range."""
    return images * 2.0 - 1.0


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map generator outputs in [-1, 1] back to [0, 1] (a std map: divide by 2 instead)."""
    return (images + 1.0) / 2.0


# ------------------------------------------------------------------ resizing


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))


def resize(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinearly resize ``(N, C, H, W)`` images to ``size`` (the paper's interpolation).

    ``align_corners=False`` and no antialiasing, as pix2pix-style pipelines in
    torch do; a same-size resize returns the input unchanged.
    """
    size = _pair(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)


def resize_back(images: torch.Tensor, native_size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize network-sized ``(N, C, h, w)`` outputs back to the native in-plane size."""
    return resize(images, native_size)


def random_crop_offsets(load_size: int, image_size: int) -> tuple[int, int]:
    """Draw a (top, left) crop corner with torch's global RNG.

    The global RNG (not a private generator) so that ``torch.manual_seed`` and
    the DataLoader's per-worker seeding make crops reproducible; a generator
    stored in the dataset would be copied into every worker and repeat crops.
    """
    top, left = torch.randint(0, load_size - image_size + 1, (2,)).tolist()
    return top, left


def _check_sizes(image_size: int, load_size: int | None = None) -> None:
    if image_size < 1:
        raise ConfigError(f"image_size must be positive; got {image_size}")
    if load_size is not None and load_size < image_size:
        raise ConfigError(f"load_size ({load_size}) must be at least image_size ({image_size})")


def _check_volumes(volumes: SubjectVolumes, need_target: bool = True) -> None:
    if need_target and volumes.target is None:
        raise DataError(f"subject {volumes.subject_id}: no target volume to train on")
    shapes = {"source": volumes.source.shape, "mask": volumes.mask.shape}
    if volumes.target is not None:
        shapes["target"] = volumes.target.shape
    if volumes.regions is not None:
        shapes["regions"] = np.shape(volumes.regions)
    if len(set(shapes.values())) != 1 or volumes.source.ndim != 3:
        found = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"subject {volumes.subject_id}: expected 3D volumes of one shape; got {found}")


# ------------------------------------------------------------------ training


@dataclass
class _SubjectSlices:
    subject_id: str
    slice_index: np.ndarray  # (k,) positions in the canonical axial stack
    source: np.ndarray  # (k, H, W) normalized, storage dtype
    target: np.ndarray
    mask: np.ndarray  # (k, H, W) bool
    source_scale: np.ndarray  # (k,) float32
    target_scale: np.ndarray


class TrainSlices(torch.utils.data.Dataset):
    """Training slices of some subjects: normalized once, resized and cropped per item.

    Each subject is loaded once; only the kept slices are stored, normalized,
    at native resolution. Memory, for the paper's 82 BraTS training subjects
    (240x240 in-plane, 155 slices), if every slice were kept:
    82 * 155 * 240 * 240 = 732 M voxels per contrast. Source + target take
    5.9 GB in float32 but 2.9 GB in float16, plus 0.7 GB for the bool masks,
    so float16 (the default) fits 8 GB with room for DataLoader workers (an
    upper bound: the brainless caps of each volume are not stored). float16 is exact enough because
    values are already in [0, 1]: its spacing there is at most 2**-11, about
    0.12 on the [0, 255] scale the paper reports in (below its 8-bit step of 1).

    Items are dicts of ``source`` and ``target`` (float32 ``(1, S, S)`` in
    [-1, 1]), ``mask`` (bool ``(1, S, S)``), ``subject_id`` and ``slice_index``
    (position in the canonical axial stack of :func:`to_axial_slices`). Crops
    use torch's global RNG: seed with ``torch.manual_seed`` (or the
    DataLoader's ``generator``, which seeds its workers) to reproduce them.

    Args:
        dataset: A dataset plugin to load the subjects from.
        subject_ids: Which of its subjects to use (e.g. ``split.train``).
        image_size: Crop size (paper: 256).
        load_size: Size slices are resized to before cropping (paper: 286).
        min_brain_fraction: Slices with less brain (share of the slice area) are skipped.
        percentile: Percentile of brain voxels used as each slice's robust maximum.
        dtype: Storage dtype of the normalized slices (float16 or float32).
        seed: Recorded only (shown in ``repr``). Crops deliberately draw from
            torch's global RNG, which the engine seeds and the DataLoader
            re-seeds per worker; a generator seeded here would be copied into
            every worker and repeat the same crops.
    """

    def __init__(
        self,
        dataset: Dataset,
        subject_ids: Sequence[str],
        *,
        image_size: int = IMAGE_SIZE,
        load_size: int = LOAD_SIZE,
        min_brain_fraction: float = MIN_BRAIN_FRACTION,
        percentile: float = ROBUST_PERCENTILE,
        dtype: np.dtype | type = np.float16,
        seed: int | None = None,
    ) -> None:
        _check_sizes(image_size, load_size)
        if not 0.0 <= min_brain_fraction <= 1.0:
            raise ConfigError(f"min_brain_fraction must be in [0, 1]; got {min_brain_fraction}")
        self.image_size = image_size
        self.load_size = load_size
        self.min_brain_fraction = min_brain_fraction
        self.percentile = percentile
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self._subjects = [self._prepare(dataset.load(sid)) for sid in subject_ids]
        self._index = np.array(
            [(s, k) for s, subject in enumerate(self._subjects) for k in range(len(subject.slice_index))],
            dtype=np.int64,
        ).reshape(-1, 2)
        if len(self._index) == 0:
            raise DataError(
                f"no training slices: none of {len(subject_ids)} subjects has a slice with at least "
                f"{min_brain_fraction:.0%} brain; lower min_brain_fraction or check the masks"
            )

    def _prepare(self, volumes: SubjectVolumes) -> _SubjectSlices:
        _check_volumes(volumes)
        mask = to_axial_slices(volumes.mask.astype(bool), volumes.affine)
        source, source_scale = normalize_slices(to_axial_slices(volumes.source, volumes.affine), mask, self.percentile)
        target, target_scale = normalize_slices(to_axial_slices(volumes.target, volumes.affine), mask, self.percentile)
        keep = (brain_fraction(mask) >= self.min_brain_fraction) & (source_scale > 0) & (target_scale > 0)
        # A slice must have brain and signal in both contrasts to teach anything.
        return _SubjectSlices(
            subject_id=volumes.subject_id,
            slice_index=np.flatnonzero(keep),
            source=source[keep].astype(self.dtype),
            target=target[keep].astype(self.dtype),
            mask=mask[keep],
            source_scale=source_scale[keep],
            target_scale=target_scale[keep],
        )

    def __len__(self) -> int:
        return len(self._index)

    @property
    def kept(self) -> list[tuple[str, int]]:
        """``(subject_id, slice_index)`` of every item, in item order."""
        return [(self._subjects[s].subject_id, int(self._subjects[s].slice_index[k])) for s, k in self._index]

    def __getitem__(self, index: int) -> dict[str, object]:
        s, k = self._index[index]
        subject = self._subjects[s]
        stack = np.stack([subject.source[k], subject.target[k], subject.mask[k]]).astype(np.float32)
        images = resize(torch.from_numpy(stack)[None], self.load_size)[0]
        top, left = random_crop_offsets(self.load_size, self.image_size)
        images = images[:, top : top + self.image_size, left : left + self.image_size]
        # Bilinear is a convex combination, so [0, 1] is kept up to rounding.
        source, target = to_model_range(images[:2].clamp(0.0, 1.0)).split(1)
        return {
            "source": source.contiguous(),
            "target": target.contiguous(),
            "mask": images[2:3] >= 0.5,
            "subject_id": subject.subject_id,
            "slice_index": int(subject.slice_index[k]),
        }

    def __repr__(self) -> str:
        return (
            f"TrainSlices(subjects={len(self._subjects)}, slices={len(self)}, image_size={self.image_size}, "
            f"load_size={self.load_size}, min_brain_fraction={self.min_brain_fraction}, dtype={self.dtype}, "
            f"seed={self.seed})"
        )


# ---------------------------------------------------------------- evaluation


def tile_offsets(length: int, size: int) -> list[int]:
    """Corners of the ``size`` tiles that cover ``length`` pixels, overlapping by at least half a tile.

    One tile when ``length == size``; otherwise evenly spaced from 0 to
    ``length - size``, at most ``size // 2`` apart, so every pixel lies in
    a tile's inner half but at the slice's own border.
    """
    if length < size:
        raise ConfigError(f"load_size ({length}) must be at least image_size ({size})")
    if length == size:
        return [0]
    count = math.ceil((length - size) / max(1, size // 2)) + 1
    return [int(v) for v in np.linspace(0, length - size, count).round()]


def tile_window(size: int) -> torch.Tensor:
    """``(size, size)`` blending weights of a tile: 1 inside, falling linearly over its outer eighth.

    Tile borders are where a fully convolutional network sees least context;
    the ramp lets the neighbouring tile's inner part take over there without
    a seam. Never zero, so a slice border covered by one tile keeps it.
    """
    ramp = max(1.0, size / 8)
    edge = torch.minimum(torch.arange(size), torch.arange(size).flip(0)).float()
    line = ((edge + 1) / ramp).clamp(max=1.0)
    return line[:, None] * line[None, :]


class EvalVolume:
    """All axial slices of one subject at network size, and the way back to its grid.

    Every slice is covered (brainless ones too: their input is background
    and their prediction maps back to zero). Slices are resized to
    ``load_size``, the scale the network was trained at (training crops
    ``image_size`` tiles out of ``load_size`` slices). When the two differ,
    the network input is a stack of overlapping ``image_size`` tiles per
    slice (:func:`tile_offsets`, slice-major), and :meth:`assemble` blends
    the tiles' predictive means and variances into one slice of
    ``load_size``: the predictive over tile placements, a mixture (mean
    ``sum w_i mu_i``, variance ``sum w_i (var_i + mu_i^2) - mean^2`` with
    :func:`tile_window` weights normalized per pixel), as the network was
    trained on every placement. With ``load_size == image_size`` there is
    one tile, and the result is the plain resize of earlier versions.

    Attributes:
        subject_id: The subject's id.
        shape: The input volume's shape; :meth:`to_native` returns this shape.
        affine: The input's affine (and ``header`` its header), for writing outputs.
        native_size: In-plane ``(H, W)`` of the canonical axial slices.
        load_size: The side ``L`` slices are resized to (the training scale).
        tiles: ``(top, left)`` corners of the ``image_size`` tiles of a slice (one, ``(0, 0)``, when
            ``load_size == image_size``).
        source: float32 tensor ``(n * tiles, 1, S, S)`` in [-1, 1], the network input (each slice's tiles together).
        target: Same for the target, or ``None`` when the subject has none (prediction).
        mask: bool tensor ``(n * tiles, 1, S, S)``, the brain mask at network size.
        source_scale: float32 ``(n,)`` robust maxima of the source slices.
        target_scale: float32 ``(n,)`` robust maxima of the target slices, or ``None``.
        region_names: Region label -> name (empty when the subject has no region labels).

    Args:
        volumes: The loaded subject (``target`` may be ``None`` for prediction).
        image_size: Network input size (paper: 256).
        load_size: The training scale slices are resized to (paper: 286; pass the
            run's ``data.load_size``); ``None``: ``image_size``, one tile per slice,
            which is the training scale only where training did not zoom.
        percentile: Percentile of brain voxels used as each slice's robust maximum.
    """

    def __init__(
        self,
        volumes: SubjectVolumes,
        *,
        image_size: int = IMAGE_SIZE,
        load_size: int | None = None,
        percentile: float = ROBUST_PERCENTILE,
    ) -> None:
        load_size = image_size if load_size is None else load_size
        _check_sizes(image_size, load_size)
        _check_volumes(volumes, need_target=False)
        self.subject_id = volumes.subject_id
        self.shape = tuple(volumes.source.shape)
        self.affine = volumes.affine
        self.header = volumes.header
        self.image_size = image_size
        self.load_size = load_size
        offsets = tile_offsets(load_size, image_size)
        self.tiles = [(top, left) for top in offsets for left in offsets]
        self._native_mask = to_axial_slices(volumes.mask.astype(bool), volumes.affine)
        self.native_size = tuple(self._native_mask.shape[1:])
        self._source_native, self.source_scale = normalize_slices(
            to_axial_slices(volumes.source, volumes.affine), self._native_mask, percentile
        )
        self.source = self._to_network(self._source_native)
        self.target = self.target_scale = self._target_native = None
        if volumes.target is not None:
            self._target_native, self.target_scale = normalize_slices(
                to_axial_slices(volumes.target, volumes.affine), self._native_mask, percentile
            )
            self.target = self._to_network(self._target_native)
        mask = resize(torch.from_numpy(self._native_mask.astype(np.float32))[:, None], load_size)
        self.mask = self._tile(mask) >= 0.5
        # Labels are only scored in the input's grid, never resized: kept as given.
        self._native_regions = None if volumes.regions is None else np.asarray(volumes.regions)
        self.region_names = dict(volumes.region_names) if volumes.regions is not None else {}

    def _to_network(self, normalized: np.ndarray) -> torch.Tensor:
        images = resize(torch.from_numpy(normalized)[:, None], self.load_size)
        return self._tile(to_model_range(images.clamp(0.0, 1.0))).contiguous()

    def _tile(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 1, L, L)`` -> ``(n * tiles, 1, S, S)``, each slice's tiles together."""
        if len(self.tiles) == 1:
            return images
        size = self.image_size
        tiles = [images[:, :, top : top + size, left : left + size] for top, left in self.tiles]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def assemble(self, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tile predictive ``(n * tiles, 1, S, S)`` -> per-slice ``(n, 1, L, L)`` mean and variance.

        The mixture over tile placements (see the class docstring); with one
        tile, the inputs themselves.
        """
        if len(self.tiles) == 1:
            return mean, variance
        n, size, length = len(self), self.image_size, self.load_size
        expected = (n * len(self.tiles), 1, size, size)
        if tuple(mean.shape) != expected or tuple(variance.shape) != expected:
            raise ValueError(f"expected tile predictions of shape {expected}, got {tuple(mean.shape)}")
        window = tile_window(size).to(mean.device, torch.float64)
        weight = torch.zeros(length, length, dtype=torch.float64, device=mean.device)
        first = torch.zeros(n, 1, length, length, dtype=torch.float64, device=mean.device)
        second = torch.zeros_like(first)
        mean = mean.double().view(n, len(self.tiles), 1, size, size)
        variance = variance.double().view(n, len(self.tiles), 1, size, size)
        for index, (top, left) in enumerate(self.tiles):
            where = (slice(top, top + size), slice(left, left + size))
            mu = mean[:, index]
            weight[where] += window
            first[(..., *where)] += window * mu
            second[(..., *where)] += window * (variance[:, index].clamp_min(0) + mu * mu)
        blended = first / weight
        mixture = (second / weight - blended * blended).clamp_min(0)
        return blended.float(), mixture.float()

    def __len__(self) -> int:
        return len(self._native_mask)

    def batches(self, batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(slices, source_batch)`` in order; ``slices`` indexes the axial stack, the batch holds their tiles."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive; got {batch_size}")
        tiles = len(self.tiles)
        for start in range(0, len(self), batch_size):
            where = slice(start, min(start + batch_size, len(self)))
            yield where, self.source[where.start * tiles : where.stop * tiles]

    def to_native(self, pred_slices: torch.Tensor | np.ndarray, *, rescale: bool = False) -> np.ndarray:
        """Map network-sized slices back to a volume in the input's own grid.

        The mapping is linear (bilinear resize, optional per-slice scale, mask),
        so it serves mean maps, std maps and errors alike.

        Args:
            pred_slices: ``(n, 1, L, L)`` or ``(n, L, L)`` at ``load_size``, in the
                normalized [0, 1] scale (use :func:`from_model_range` on generator
                outputs; halve a std computed in [-1, 1]; tile predictions go
                through :meth:`assemble` first).
            rescale: Multiply each slice by the target's robust maximum, giving
                the target's original intensity units (needs a target).

        Returns:
            float32 array of the input's shape, zero outside the brain mask.
        """
        pred = torch.as_tensor(pred_slices, dtype=torch.float32).detach().cpu()
        if pred.ndim == 3:
            pred = pred[:, None]
        expected = (len(self), 1, self.load_size, self.load_size)
        if tuple(pred.shape) != expected:
            raise ValueError(f"expected predictions of shape {expected}, got {tuple(pred.shape)}")
        native = resize_back(pred, self.native_size)[:, 0].numpy()
        if rescale:
            if self.target_scale is None:
                raise ValueError(f"subject {self.subject_id} has no target, so no intensity scale to rescale by")
            native = native * self.target_scale[:, None, None]
        native = np.where(self._native_mask, native, np.float32(0.0))
        return from_axial_slices(native.astype(np.float32), self.affine, self.shape)

    def normalized_source(self) -> np.ndarray:
        """The source as the network saw it ([0, 1] per slice) in the input's grid, zero outside the mask."""
        return self._native_volume(self._source_native)

    def normalized_target(self) -> np.ndarray:
        """The target in the same [0, 1] per-slice scale as predictions, in the input's grid.

        The ground truth to compare :meth:`to_native` outputs with (the paper's
        metrics are on this scale times 255), zero outside the mask.
        """
        if self._target_native is None:
            raise ValueError(f"subject {self.subject_id} has no target")
        return self._native_volume(self._target_native)

    def native_mask(self) -> np.ndarray:
        """The brain mask in the input's own grid (bool)."""
        return from_axial_slices(self._native_mask, self.affine, self.shape)

    def native_regions(self) -> np.ndarray | None:
        """The region labels in the input's own grid (int, 0 = no region; names in :attr:`region_names`), or ``None``."""
        return None if self._native_regions is None else self._native_regions.copy()

    def _native_volume(self, normalized: np.ndarray) -> np.ndarray:
        masked = np.where(self._native_mask, normalized, np.float32(0.0))
        return from_axial_slices(masked, self.affine, self.shape)

    def __repr__(self) -> str:
        return (f"EvalVolume({self.subject_id!r}, shape={self.shape}, slices={len(self)}, "
                f"image_size={self.image_size}, load_size={self.load_size}, tiles={len(self.tiles)})")
