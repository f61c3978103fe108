"""Dividing subjects into train, test and calibration sets.

Splits are by subject, never by slice: slices of one brain are nearly
identical neighbours, so a slice-level split would leak test anatomy into
training. The split depends only on the set of ids and the seed (ids are
sorted before shuffling), so the same data and seed give the same split on
any machine and in any listing order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from uqsynth.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """Disjoint subject id lists, each sorted.

    Attributes:
        train: Subjects to train on.
        test: Held-out subjects for evaluation.
        calibration: Subjects held out to fit calibrators; empty means
            calibrate on ``train`` (what the paper does).
    """

    train: list[str]
    test: list[str]
    calibration: list[str]


def _count(fraction: float, n: int) -> int:
    # Round half up (not to even), at least one when the fraction is positive.
    return max(1, math.floor(fraction * n + 0.5)) if fraction > 0 else 0


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1); got {value}")


def split_subjects(
    ids: Iterable[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_ids: Iterable[str] | None = None,
    calibration_fraction: float = 0.0,
) -> Split:
    """Split subject ids reproducibly into train / test / calibration.

    A sorted copy of the ids is shuffled with ``numpy.random.default_rng(seed)``;
    the first ``round(test_fraction * n)`` are the test set, the next
    ``round(calibration_fraction * n)`` the calibration set, the rest train.
    So changing ``calibration_fraction`` never changes the test set. With
    ``test_ids`` the test set is exactly those ids and ``test_fraction`` is
    ignored; the calibration set is then drawn from the remaining ids.

    Args:
        ids: All subject ids (unique).
        test_fraction: Share of subjects held out for testing (the paper: 20 of 102).
        seed: Seed of the shuffle.
        test_ids: Explicit test subjects, overriding ``test_fraction``.
        calibration_fraction: Share of all subjects held out for calibration.

    Returns:
        The split, each list sorted.

    Raises:
        DataError: Duplicate or unknown ids, or fewer than one train and one test subject.
    """
    ids = list(ids)
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DataError(f"duplicate subject ids: {', '.join(duplicates)}")
    _check_fraction("calibration_fraction", calibration_fraction)
    ordered = sorted(ids)
    n = len(ordered)
    rng = np.random.default_rng(seed)
    if test_ids is None:
        _check_fraction("test_fraction", test_fraction)
        shuffled = [ordered[i] for i in rng.permutation(n)]
        n_test = _count(test_fraction, n)
        test, rest = shuffled[:n_test], shuffled[n_test:]
    else:
        test = sorted(set(test_ids))
        unknown = sorted(set(test) - set(ordered))
        if unknown:
            raise DataError(f"test_ids not among the dataset's subjects: {', '.join(unknown)}")
        held_out = set(test)
        remaining = [i for i in ordered if i not in held_out]
        rest = [remaining[i] for i in rng.permutation(len(remaining))]
    n_calibration = _count(calibration_fraction, n)
    calibration, train = rest[:n_calibration], rest[n_calibration:]
    if not test or not train:
        raise DataError(
            f"cannot split {n} subjects into at least one train and one test subject "
            f"(got {len(train)} train, {len(test)} test, {len(calibration)} calibration)"
        )
    return Split(train=sorted(train), test=sorted(test), calibration=sorted(calibration))
