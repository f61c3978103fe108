"""Subject-level risk control: intervals whose unit of calibration is the subject, not the voxel.

Voxel-level calibrators (isotonic, sigma scaling, split conformal) treat
every calibration voxel as one exchangeable draw. Voxels of one subject
are not: they share its anatomy, scanner and lesion, so "90 % of voxels"
says nothing about one new patient. The two calibrators here take each
calibration subject as one draw (``../shared/DESIGN.md``, section 6):

- the loss of subject ``i`` at scale ``lambda`` is ``L_i(lambda)``, the
  fraction of its brain voxels outside ``mean ± lambda * sigma_eff``
  (``sigma_eff = sqrt(std^2 + floor^2)``, the floor fitted as in
  :class:`~uqsynth.calibration.conformal.ConformalCalibrator`, so a zero
  std still gets a width); it does not grow with ``lambda``;
- ``conformal_risk`` (CRC, Angelopoulos et al. 2022) takes the smallest
  ``lambda`` with ``(n R(lambda) + 1) / (n + 1) <= alpha``, ``R`` the mean
  loss over the ``n`` calibration subjects: then the *expected* fraction of
  a new subject's voxels outside its interval is at most ``alpha``;
- ``risk_control`` (RCPS, Bates et al. 2021, as in im2im-uq) takes the
  smallest ``lambda`` from which on the Hoeffding-Bentkus upper confidence
  bound of ``R`` stays below ``alpha``: then, with probability at least
  ``1 - delta`` over the draw of the calibration subjects, that expected
  fraction is at most ``alpha``.

Both hold if the calibration subjects and the new one are exchangeable
(drawn alike), whatever the model and however its voxels' errors are
correlated. They need enough subjects: CRC about ``1 / alpha``, RCPS about
``log(delta) / log(1 - alpha)`` at the least (22 at ``alpha = delta = 0.1``)
and more in practice; :meth:`SubjectRiskCalibrator.required_subjects` says
how many, and a run checks it before training.

Streaming. Per calibration subject the summary is a histogram of its
scores ``|y - mean| / sigma_eff`` (``bins`` log-spaced bins over ``[low,
high]``, one for scores at or below ``low`` and one above ``high``) for every
candidate floor (the floor is only known at the end), plus the shared
histogram the floor is fitted on; O(subjects x floors x bins) integers.
Each score counts at its bin's *upper* edge, so a subject's loss at an edge
is never under-estimated: the guarantees survive the binning, at a width
cost below one bin (3.3 % at the defaults; scores range to 1e4
because an MC-only arm's std can be far below its errors, and a score
above ``high`` is never covered). Histograms are keyed by a hash
of the subject's id, so batches of one subject add up, and parts fitted on
different processes combine exactly (:meth:`merge`, and the all-reduce in
:func:`uqsynth.distributed.all_reduce_calibrator`).

The floor: as conformal does, a quarter of the voxels (by a hash of their
values) fit it, the others give the scores. The floor is one number fitted
on all calibration subjects' share, so strictly the score function is not
independent of the calibration draw; its dependence on any one subject is
of order ``1 / n``, and the split test (``tests/test_risk_control.py``)
measures the guarantees with it in place.

Regions (Mondrian; Teneggi et al. 2023 let the scale vary by region too).
With ``regions = K`` each subject also gets histograms of its voxels of
each label ``1..K``, and each label its own scale, certified on the
subjects that have it: "the expected fraction of a new subject's lesion
voxels outside is at most alpha" as well as of its brain. A voxel whose
label is known gets the larger of the brain's and its region's scale,
which keeps both promises (a larger scale never adds misses); a volume
without labels (a new patient, no segmentation) gets the largest scale of
all, which keeps every region's. A region fewer subjects had than the rule
needs has no promise of its own, and its voxels keep the brain's.

Levels. The summary holds every subject's whole loss curve, so an interval
at any level ``a`` is calibrated at ``alpha = 1 - a`` by the same rule; the
``alpha`` parameter is the level the run certifies (the certificate, and
how many subjects a run needs). The predictive distribution follows, as
conformal's: ``cdf(y) = 1/2 + sign(y - mean) / 2 * level(|y - mean| / sigma_eff)``,
``level(t)`` the largest level whose scale is at most ``t``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
from scipy.special import xlogy
from scipy.stats import binom
from sklearn.utils.validation import check_is_fitted

from uqsynth.calibration.base import StreamingCalibrator, check_inputs, check_probabilities, promise
from uqsynth.calibration.conformal import FLOOR_CANDIDATES as _CONFORMAL_FLOORS
from uqsynth.calibration.conformal import floor_share_histograms, nearest_floor
from uqsynth.config import Interval, Rule

#: Candidate floors (units of the target): two per decade from 1e-6 to 1e4.
#: Coarser than conformal's (a per-subject histogram per candidate is kept);
#: the guarantee holds for any floor, only widths depend on how close it is.
FLOOR_CANDIDATES = _CONFORMAL_FLOORS[::4]

_LEVEL_DECIMALS = 12


def subject_key(subject: object) -> np.int64:
    """A 64-bit key of a subject id (its string), the same on every process and in every run."""
    digest = hashlib.blake2b(str(subject).encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.int64)[0]


def hoeffding_bentkus_ucb(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Upper confidence bound at ``1 - delta`` of a mean risk in [0, 1] from ``n`` i.i.d. losses.

    Bates et al. 2021 (RCPS), Proposition 3.5: the p-value of the null
    "risk >= a" is ``min(exp(-n h(min(R, a), a)), e * P(Binomial(n, a) <= ceil(n R)))``
    with ``h(x, a) = x log(x / a) + (1 - x) log((1 - x) / (1 - a))``; the bound
    is the largest ``a`` the data do not reject at ``delta``, found by
    bisection to 1e-12.
    """
    risk = np.clip(np.asarray(risk, dtype=np.float64), 0.0, 1.0)
    successes = np.ceil(n * risk - 1e-9)  # n R is an integer count in exact arithmetic

    def p_value(a: np.ndarray) -> np.ndarray:
        x = np.minimum(risk, a)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = xlogy(x, x / a) + xlogy(1.0 - x, (1.0 - x) / (1.0 - a))
        hoeffding = np.exp(-n * np.nan_to_num(h, nan=np.inf, posinf=np.inf))
        bentkus = np.e * binom.cdf(successes, n, a)
        return np.minimum(hoeffding, bentkus)

    low, high = risk.copy(), np.ones_like(risk)
    for _ in range(45):  # 2^-45 < 1e-13
        middle = 0.5 * (low + high)
        rejected = p_value(middle) <= delta
        high = np.where(rejected, middle, high)
        low = np.where(rejected, low, middle)
    return high


class SubjectRiskCalibrator(StreamingCalibrator):
    """Base of calibrators whose unit is the subject: per-subject score histograms and a rule on their mean loss.

    Subclasses give :meth:`certified_risk` (the risk level each scale is
    certified at, from the mean loss curve and the number of subjects),
    :meth:`required_subjects` and :meth:`guarantee`.

    ``fit`` and ``partial_fit`` take ``subject``: one id for the whole batch,
    or one per voxel. ``fit`` without it is refused: the voxels' subjects
    are what this calibrator is about.

    Args:
        alpha: The miscoverage the run certifies (its certificate, and the subjects it needs).
        bins, low, high: The score histograms' log-spaced bins over ``[low, high]``.
        regions: Mondrian: labels ``1..regions`` of the voxels' regions (the
            dataset's: phantom tissues, a BraTS segmentation) get a scale of
            their own, so the promise also holds inside each region, e.g. the
            lesion. 0 (default): one scale for the whole brain.

    Attributes:
        counts_: Score histograms, shape ``(subjects, 1 + regions, len(FLOOR_CANDIDATES), bins + 2)``:
            the whole brain, then each tracked region label.
        subject_keys_: :func:`subject_key` of each row's subject.
        scale_counts_: The floor's share by std row and ``|z|`` bin (as conformal's).
        n_: Number of calibration voxels (both shares).
        floor_, fitted_floor_, floor_index_: The floor used, as fitted, and its candidate index.
        n_subjects_: Subjects with scored voxels.
        risk_: Mean loss over subjects at each finite upper bin edge (whole brain).
        region_subjects_: Per tracked label, the subjects that had voxels of it.
        region_certified_alpha_: The smallest ``alpha`` certified at each edge, whole brain then each label.
        certified_alpha_: At each edge, the largest of the whole brain's and the certified regions'
            (non-increasing): what label-free intervals use.
    """

    _summary_names = ("counts_", "subject_keys_", "scale_counts_", "n_")
    param_rules = (Rule(lambda low, high: low < high, "low must be below high"),)

    def __init__(
        self,
        *,
        alpha: Annotated[float, Interval(0.0, 1.0, closed="neither")] = 0.1,
        bins: Annotated[int, Interval(1, None)] = 500,
        low: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-3,
        high: Annotated[float, Interval(0.0, None, closed="neither")] = 1e4,
        regions: Annotated[int, Interval(0, 64)] = 0,
    ) -> None:
        self.alpha = alpha
        self.bins = bins
        self.low = low
        self.high = high
        self.regions = regions

    # --- the rule (subclasses) ---------------------------------------------------------------

    def certified_risk(self, risk: np.ndarray, n: int) -> np.ndarray:
        """Per scale, the risk level the rule certifies from mean loss ``risk`` over ``n`` subjects."""
        raise NotImplementedError

    # --- histograms --------------------------------------------------------------------------

    def upper_edges(self) -> np.ndarray:
        """Upper edge of every histogram bin, ``low`` first and ``+inf`` last."""
        self._validate_params()
        edges = np.geomspace(float(self.low), float(self.high), int(self.bins) + 1)
        return np.concatenate([edges, [np.inf]])

    def _subject_summary(self, mean, std, target, labels=None) -> dict[str, np.ndarray]:
        counts, scale_counts = floor_share_histograms(mean, std, target, FLOOR_CANDIDATES, self.upper_edges(),
                                                      labels=labels, slots=int(self.regions))
        return {"counts_": counts[None], "scale_counts_": scale_counts, "n_": np.asarray(mean.size, dtype=np.int64)}

    def subject_summary(self, mean, std, target, subject: object, regions=None) -> dict[str, np.ndarray]:
        """The summary of one subject's voxels, without fitting (for :func:`combine_subject_summaries`).

        Why public: experiments that refit on many subsets of subjects (the
        split test) summarize each subject once and combine summaries, which
        is exact and far cheaper than refitting from voxels.
        """
        self._validate_params()
        mean, std, target = (array.ravel() for array in check_inputs(mean, std, target))
        part = self._subject_summary(mean, std, target, self._labels(regions, mean.shape))
        part["subject_keys_"] = np.asarray([subject_key(subject)], dtype=np.int64)
        return part

    def _labels(self, regions, shape: tuple[int, ...]) -> np.ndarray | None:
        """Region labels as a 1D integer array of the voxels' shape, or None (no labels, or none tracked)."""
        if regions is None or not int(self.regions):
            return None
        labels = np.asarray(regions)
        if labels.shape != shape and labels.size != int(np.prod(shape)):
            raise ValueError(f"regions has shape {labels.shape}; expected one label per voxel {shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError("regions must be whole-number labels")
            labels = labels.astype(np.int64)
        return labels.ravel()

    def empty_summary(self) -> dict[str, np.ndarray]:
        """The summary of no subjects: zero rows of histograms, an empty floor histogram."""
        part = self._subject_summary(np.zeros(0), np.ones(0), np.zeros(0))
        return {"counts_": part["counts_"][:0], "subject_keys_": np.zeros(0, dtype=np.int64),
                "scale_counts_": part["scale_counts_"], "n_": np.asarray(0, dtype=np.int64)}

    def fit(self, mean, std, target, subject=None, regions=None) -> SubjectRiskCalibrator:
        """Forget any previous fit and learn from these voxels, ``subject`` giving each one's subject.

        ``regions``: each voxel's region label, used when the ``regions``
        parameter tracks labels (``1..regions``); None for subjects without labels.
        """
        if subject is None:
            raise ValueError(f"{type(self).__name__} calibrates on whole subjects: pass subject= "
                             "(one id per voxel, or one for the batch)")
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("_")]:
            delattr(self, name)
        return self.partial_fit(mean, std, target, subject=subject, regions=regions)

    def partial_fit(self, mean, std, target, subject=None, regions=None) -> SubjectRiskCalibrator:
        """Add voxels of one subject (``subject`` an id) or several (one id per voxel); return ``self``."""
        if subject is None:
            raise ValueError(f"{type(self).__name__} calibrates on whole subjects: pass subject= "
                             "(one id per voxel, or one for the batch)")
        self._validate_params()
        mean, std, target = check_inputs(mean, std, target)
        if mean.size == 0:
            raise ValueError("no voxels to fit on")
        ids = np.asarray(subject, dtype=object)
        if ids.ndim == 0:
            ids = np.full(mean.shape, ids.item(), dtype=object)
        elif ids.shape != mean.shape:
            raise ValueError(f"subject has shape {ids.shape}; expected one id, or one per voxel {mean.shape}")
        labels = self._labels(regions, mean.shape)
        mean, std, target, ids = mean.ravel(), std.ravel(), target.ravel(), ids.ravel()
        parts = [self.summary()] if hasattr(self, "n_") else []
        names = np.asarray([str(i) for i in ids])
        for name in np.unique(names):
            chosen = names == name
            part = self._subject_summary(mean[chosen], std[chosen], target[chosen],
                                         None if labels is None else labels[chosen])
            part["subject_keys_"] = np.asarray([subject_key(name)], dtype=np.int64)
            parts.append(part)
        return self.load_summary(combine_subject_summaries(parts))

    def merge(self, other: SubjectRiskCalibrator) -> SubjectRiskCalibrator:
        """Add ``other``'s subjects (same class and parameters); a subject in both has its histograms added."""
        if type(other) is not type(self) or other.get_params() != self.get_params():
            raise ValueError(f"cannot merge {other!r} into {self!r}: class and parameters must match")
        parts = ([self.summary()] if hasattr(self, "n_") else []) + [other.summary()]
        return self.load_summary(combine_subject_summaries(parts))

    def load_summary(self, summary: dict[str, np.ndarray]) -> SubjectRiskCalibrator:
        """Replace the summary and refit; the subject axis may have any length, the rest must match."""
        expected = self.empty_summary()
        if set(summary) != set(expected):
            raise ValueError(f"summary needs exactly {sorted(expected)}, got {sorted(summary)}")
        counts, keys = np.asarray(summary["counts_"]), np.asarray(summary["subject_keys_"])
        if counts.ndim != 4 or counts.shape[1:] != expected["counts_"].shape[1:] or keys.shape != counts.shape[:1]:
            raise ValueError(f"summary counts_ has shape {counts.shape} with {keys.shape} subject keys, but "
                             f"{type(self).__name__} with {self.get_params()} needs (subjects, "
                             f"{', '.join(map(str, expected['counts_'].shape[1:]))}); call fit to start over")
        if np.shape(summary["scale_counts_"]) != expected["scale_counts_"].shape:
            raise ValueError(f"summary scale_counts_ has shape {np.shape(summary['scale_counts_'])}, "
                             f"expected {expected['scale_counts_'].shape}")
        if np.unique(keys).size != keys.size:
            raise ValueError("summary lists a subject twice; combine its rows first")
        for name, value in summary.items():
            setattr(self, name, np.asarray(value).astype(expected[name].dtype, copy=True))
        if int(self.n_) <= 0:
            raise ValueError("the summary holds no voxels")
        self._finalize()
        return self

    def _finalize(self) -> None:
        fitted, index = nearest_floor(self.scale_counts_, FLOOR_CANDIDATES)
        self.fitted_floor_ = np.asarray(fitted)
        self.floor_ = np.asarray(FLOOR_CANDIDATES[index])
        self.floor_index_ = np.asarray(index, dtype=np.int64)
        slots = np.asarray(self.counts_)[:, :, index, :]  # (subjects, 1 + regions, bins + 2)
        risk, certified, subjects = [], [], []
        for slot in range(slots.shape[1]):
            # Slot 0 is the whole brain; slot r the voxels labelled r, of the subjects that have any.
            counts = slots[:, slot, :]
            counts = counts[counts.sum(axis=1) > 0]
            subjects.append(counts.shape[0])
            if counts.shape[0] == 0:
                risk.append(np.zeros(slots.shape[2] - 1))
                certified.append(np.ones(slots.shape[2] - 1))
                continue
            # Loss of each subject at edge j: the share of its scores whose bin lies above edge j.
            outside = 1.0 - np.cumsum(counts, axis=1)[:, :-1] / counts.sum(axis=1, keepdims=True)
            risk.append(np.clip(outside, 0.0, 1.0).mean(axis=0))
            curve = self.certified_risk(risk[-1], counts.shape[0])
            certified.append(np.maximum.accumulate(curve[::-1])[::-1])  # "for every larger scale too"
        if subjects[0] == 0:
            raise ValueError("no subject has voxels to score")
        self.n_subjects_ = np.asarray(subjects[0], dtype=np.int64)
        self.region_subjects_ = np.asarray(subjects[1:], dtype=np.int64)
        self.risk_ = risk[0]
        self.region_certified_alpha_ = np.asarray(certified)  # (1 + regions, edges); slot 0 the whole brain
        # Label-free intervals keep every promise at once: at each scale, the largest certified risk of
        # the whole brain and of every region the calibration subjects had enough of (certifiable).
        kept = [0, *(1 + np.flatnonzero(self.certified_regions_mask()))]
        self.certified_alpha_ = self.region_certified_alpha_[kept].max(axis=0)

    # --- intervals ---------------------------------------------------------------------------

    def certified_regions_mask(self) -> np.ndarray:
        """Per tracked label ``1..regions``: did enough calibration subjects have it (:meth:`required_subjects`)?

        A region too few subjects had gets no promise of its own (its voxels
        keep the whole-brain one) rather than infinite intervals for everyone.
        """
        return np.asarray(self.region_subjects_) >= self.required_subjects()

    def certified_regions(self) -> list[int]:
        """The region labels with a promise of their own."""
        check_is_fitted(self)
        return [int(label) for label in 1 + np.flatnonzero(self.certified_regions_mask())]

    def effective_std(self, std: np.ndarray) -> np.ndarray:
        """``sigma_eff = sqrt(std^2 + floor_^2)``, > 0 for every std >= 0."""
        check_is_fitted(self)
        return np.hypot(np.asarray(std, dtype=np.float64), float(self.floor_))

    def scale(self, level: float | np.ndarray, region: int | None = None) -> np.ndarray:
        """``lambda_hat`` for central intervals at ``level``: the smallest edge certified at ``1 - level``; inf if none.

        ``region`` None: the scale that keeps every promise (whole brain and
        every certified region; what a volume without labels gets). A label:
        the larger of the whole brain's scale and that region's own (the
        whole brain's alone for a label without a promise of its own).
        """
        check_is_fitted(self)
        level = np.round(np.asarray(level, dtype=np.float64), _LEVEL_DECIMALS)
        alpha = np.round(1.0 - level, _LEVEL_DECIMALS)
        certified = np.asarray(self.certified_alpha_)
        if region is not None:
            table = np.asarray(self.region_certified_alpha_)
            own = 0 < int(region) <= int(self.regions) and bool(self.certified_regions_mask()[int(region) - 1])
            certified = np.maximum(table[0], table[int(region)]) if own else table[0]
        edges = self.upper_edges()[:-1]
        ok = certified[None, :] <= alpha.reshape(-1, 1)
        first = np.argmax(ok, axis=1)
        result = np.where(ok.any(axis=1), edges[first], np.inf).reshape(alpha.shape)
        return np.where(level <= 0.0, 0.0, result)

    def level_at(self, t: np.ndarray) -> np.ndarray:
        """The largest level whose scale is at most ``t`` (0 below the first edge)."""
        check_is_fitted(self)
        edges = self.upper_edges()[:-1]
        j = np.searchsorted(edges, t, side="right") - 1
        level = 1.0 - np.asarray(self.certified_alpha_)[np.maximum(j, 0)]
        return np.where(j < 0, 0.0, np.clip(level, 0.0, 1.0))

    def cdf(self, mean, std, values):
        """``1/2 + sign(y - mean) / 2 * level(|y - mean| / sigma_eff)``, in [0, 1)."""
        check_is_fitted(self)
        mean, std, values = check_inputs(mean, std, values, other_name="values")
        residual = values - mean
        return 0.5 + 0.5 * np.sign(residual) * self.level_at(np.abs(residual) / self.effective_std(std))

    def quantile(self, mean, std, q):
        """``mean + sign(q - 1/2) * sigma_eff * lambda_hat(|2 q - 1|)``; infinite where no scale is certified."""
        check_is_fitted(self)
        q = check_probabilities(q)
        offset = np.sign(q - 0.5) * self.scale(np.abs(2.0 * q - 1.0))
        mean, std, _ = check_inputs(mean, std, q, other_name="q")
        return mean + self.effective_std(std) * offset

    def interval(self, mean, std, level, regions=None):
        """``mean ± lambda_hat(level) * sigma_eff``: the subject-level guarantee at ``alpha = 1 - level``.

        With ``regions`` (each voxel's label) a voxel gets its region's scale
        (:meth:`scale`); without, every voxel the scale that keeps every
        region's promise, which is what a new volume without a segmentation needs.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        labels = self._labels(regions, mean.shape)
        if labels is None:
            factor = self.scale(level)
        else:
            slots = int(self.regions)
            table = np.array([float(self.scale(level, label)) for label in range(slots + 1)])  # 0: the brain's
            tracked = (labels >= 1) & (labels <= slots)
            factor = table[np.where(tracked, labels, 0)].reshape(mean.shape)
        half_width = self.effective_std(std) * factor
        return mean - half_width, mean + half_width

    def moments(self, mean, std):
        """``(mean, sigma_eff * rms(lambda_hat))`` over the midpoint levels; infinite if the outer ones are."""
        check_is_fitted(self)
        mean, std, _ = check_inputs(mean, std, 0.0, other_name="level")
        from uqsynth.predictive import MIDPOINT_LEVELS

        rms = float(np.sqrt(np.mean(self.scale(MIDPOINT_LEVELS) ** 2)))
        return mean, self.effective_std(std) * rms

    def guarantee(self, level: float) -> dict[str, object]:
        """A promise about a new subject's whole brain (the rule's sentence: :meth:`_promise`), and per region.

        With ``regions``, the dict adds ``regions``: the certified labels
        (each with its own promise, as many subjects as had it) and those
        without one (too few calibration subjects had them).
        """
        n = int(self.n_subjects_) if hasattr(self, "n_subjects_") else None
        statement = self._promise(level, "n" if n is None else str(n))
        out = promise("subject", statement, level, delta=getattr(self, "delta", None), subjects=n)
        if int(self.regions) and n is not None:
            subjects = {label: int(count) for label, count in enumerate(self.region_subjects_, start=1)}
            certified = self.certified_regions()
            out["regions"] = {"certified": {str(label): subjects[label] for label in certified},
                              "without_promise": [label for label in subjects if label not in certified]}
            labels = ", ".join(map(str, certified)) or "none"
            out["statement"] = (f"{statement}; the same holds for the voxels of each region label ({labels}) "
                                "among the subjects that have it (one scale per region, Mondrian)")
        return out

    def _promise(self, level: float, subjects: str) -> str:
        """The guarantee at ``level`` in one sentence, ``subjects`` being how many calibration subjects there were."""
        raise NotImplementedError

    def fit_report(self) -> dict[str, float]:
        """``floor``, ``fitted_floor``, ``subjects``, and ``scale`` (``lambda_hat``) at the certified ``1 - alpha``."""
        check_is_fitted(self)
        return {"floor": float(self.floor_), "fitted_floor": float(self.fitted_floor_),
                "subjects": float(self.n_subjects_), "scale": float(self.scale(1.0 - float(self.alpha)))}


def combine_subject_summaries(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One summary from several: shared histograms added, subject rows joined (rows of one subject added)."""
    keys = np.concatenate([np.asarray(p["subject_keys_"], dtype=np.int64) for p in parts])
    counts = np.concatenate([np.asarray(p["counts_"], dtype=np.int64) for p in parts])
    unique, inverse = np.unique(keys, return_inverse=True)
    joined = np.zeros((unique.size, *counts.shape[1:]), dtype=np.int64)
    np.add.at(joined, inverse, counts)
    return {"counts_": joined, "subject_keys_": unique,
            "scale_counts_": sum(np.asarray(p["scale_counts_"], dtype=np.int64) for p in parts),
            "n_": np.asarray(sum(int(p["n_"]) for p in parts), dtype=np.int64)}


class ConformalRiskControl(SubjectRiskCalibrator):
    """Conformal risk control (CRC): the expected fraction of a new subject's voxels outside is <= alpha.

    (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal risk control",
    2022.) ``lambda_hat = inf{lambda : (n R(lambda) + 1) / (n + 1) <= alpha}``
    with ``R`` the mean per-subject loss (module docstring), bounded by 1.
    Needs ``n >= 1 / alpha - 1`` subjects for a finite interval at all.
    """

    def certified_risk(self, risk, n):
        return (n * risk + 1.0) / (n + 1.0)

    def required_subjects(self) -> int:
        """The fewest subjects with ``1 / (n + 1) <= alpha``: below that, no finite interval is certified."""
        alpha = round(float(self.alpha), _LEVEL_DECIMALS)
        n = max(int(np.ceil(1.0 / alpha - 1.0)) - 1, 1)
        while 1.0 / (n + 1.0) > alpha:
            n += 1
        return n

    def _promise(self, level: float, subjects: str) -> str:
        return (f"for a new subject drawn like the {subjects} calibration subjects, the expected fraction of its "
                f"brain voxels outside the {level:g} interval is at most {1.0 - level:.3g} (conformal risk control)")


class RiskControl(SubjectRiskCalibrator):
    """Risk-controlling prediction sets (RCPS): with probability >= 1 - delta, the expected miscoverage of a subject is <= alpha.

    (Bates, Angelopoulos, Lei, Malik, Jordan 2021; the image-to-image form
    of Angelopoulos et al. 2022, im2im-uq.) ``lambda_hat`` is the smallest
    scale from which on the Hoeffding-Bentkus upper confidence bound
    (:func:`hoeffding_bentkus_ucb`) of the mean per-subject loss stays below
    ``alpha``. Needs at least ``log(delta) / log(1 - alpha)`` subjects (22 at
    ``alpha = delta = 0.1``), and about 30 for intervals that are not wide.

    Args:
        alpha, bins, low, high, regions: As :class:`SubjectRiskCalibrator`.
        delta: Tolerated probability that the calibration draw breaks the promise.
    """

    def __init__(
        self,
        *,
        alpha: Annotated[float, Interval(0.0, 1.0, closed="neither")] = 0.1,
        delta: Annotated[float, Interval(0.0, 1.0, closed="neither")] = 0.1,
        bins: Annotated[int, Interval(1, None)] = 500,
        low: Annotated[float, Interval(0.0, None, closed="neither")] = 1e-3,
        high: Annotated[float, Interval(0.0, None, closed="neither")] = 1e4,
        regions: Annotated[int, Interval(0, 64)] = 0,
    ) -> None:
        super().__init__(alpha=alpha, bins=bins, low=low, high=high, regions=regions)
        self.delta = delta

    def certified_risk(self, risk, n):
        return hoeffding_bentkus_ucb(risk, n, float(self.delta))

    def required_subjects(self) -> int:
        """The fewest subjects whose bound at zero observed risk is below ``alpha``: ``(1 - alpha)^n <= delta``."""
        alpha = round(float(self.alpha), _LEVEL_DECIMALS)
        n = max(int(np.floor(np.log(float(self.delta)) / np.log1p(-alpha))) - 1, 1)
        while float(hoeffding_bentkus_ucb(np.zeros(1), n, float(self.delta))[0]) > alpha:
            n += 1
        return n

    def _promise(self, level: float, subjects: str) -> str:
        return (f"with probability at least {1.0 - float(self.delta):.3g} over the draw of the {subjects} "
                f"calibration subjects, the expected fraction of a new subject's brain voxels outside the {level:g} "
                f"interval is at most {1.0 - level:.3g} (risk-controlling prediction sets, Hoeffding-Bentkus bound)")
