"""Coverage and width per region, the spread of the std, and an NLL that stays finite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import ndtri
from test_metrics import ScaledGaussian

from uqsynth.metrics import CohortEvaluator, RegionIntervalAccumulator, evaluate_subject, interval_scores

NAMES = {1: "white matter", 2: "lesion", 3: "grey matter"}
Z90 = float(ndtri(0.95))


def labelled_subject(seed: int, *, shape=(8, 20, 24), lesion_bias: float = 4.0):
    """A box brain in three slabs of regions; truths ~ N(mean, std^2) except in the lesion, where the mean is off."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[1:7, 2:18, 2:22] = True
    regions = np.zeros(shape, dtype=np.int16)
    regions[:, :, :8], regions[:, :, 8:14], regions[:, :, 14:] = 1, 2, 3
    regions[~mask] = 0
    std = rng.uniform(0.01, 0.03, shape)
    truth = rng.uniform(0.3, 0.7, shape)
    mean = truth + std * rng.standard_normal(shape)
    mean[regions == 2] += lesion_bias * std[regions == 2]  # the intervals miss the truth in the lesion only
    return truth, mean, std, mask, regions


def test_the_region_where_intervals_fail_has_low_picp_the_others_the_level():
    cohort = CohortEvaluator(axis=0, interval_fns={"x2": ScaledGaussian(2.0).interval})
    for seed in range(3):
        truth, mean, std, mask, regions = labelled_subject(seed)
        cohort.add(f"s{seed}", truth, mean, std, mask, regions=regions, region_names=NAMES)
    result = cohort.result()
    assert json.loads(json.dumps(result)) == result
    regions = result["regions"]
    assert list(regions) == ["white matter", "lesion", "grey matter"]  # label order
    for name in ("white matter", "grey matter"):
        assert regions[name]["gaussian"]["picp"]["0.9"] == pytest.approx(0.9, abs=0.02)
    assert regions["lesion"]["gaussian"]["picp"]["0.9"] < 0.1
    # Twice the std still misses the lesion (bias 4 std > 2 x 1.645), and covers nearly everything elsewhere.
    assert regions["lesion"]["calibrators"]["x2"]["picp"]["0.9"] < 0.5
    assert regions["grey matter"]["calibrators"]["x2"]["picp"]["0.9"] > 0.99
    labels = labelled_subject(0)[4]
    assert regions["lesion"]["voxels"] == 3 * int((labels == 2).sum()) and regions["lesion"]["subjects"] == 3
    assert sum(r["voxels"] for r in regions.values()) == result["std"]["voxels"]
    # Widths on [0, 255]: 2 * 1.645 * std, pooled.
    pooled_std = np.concatenate([std[labels == 1] for _, _, std, _, labels in map(labelled_subject, range(3))])
    assert regions["white matter"]["gaussian"]["width"]["0.9"] == pytest.approx(2 * Z90 * pooled_std.mean() * 255)
    assert regions["white matter"]["calibrators"]["x2"]["width"]["0.9"] == pytest.approx(
        4 * Z90 * pooled_std.mean() * 255)


def test_whole_brain_picp_hides_the_failing_region():
    truth, mean, std, mask, regions = labelled_subject(0)
    whole = interval_scores(truth, mean, std, mask)["picp"]["0.9"]
    per_region = evaluate_subject(truth, mean, std, mask, axis=0, regions=regions, region_names=NAMES)["regions"]
    assert whole > 0.55 and per_region["lesion"]["gaussian"]["picp"]["0.9"] < 0.1


def test_merge_of_two_parts_equals_one_pass():
    subjects = {f"s{seed}": labelled_subject(seed, lesion_bias=seed) for seed in range(4)}
    settings = {"interval_fns": {"x2": ScaledGaussian(2.0).interval}, "quantile_fns": {"x2": ScaledGaussian(2.0).quantile}}
    one = CohortEvaluator(axis=0, **settings)
    parts = [CohortEvaluator(axis=0, **settings), CohortEvaluator(axis=0, **settings)]
    for index, (subject_id, (truth, mean, std, mask, regions)) in enumerate(subjects.items()):
        one.add(subject_id, truth, mean, std, mask, regions=regions, region_names=NAMES)
        # Interleaved shards, as world.shard gives them, and the lesion first seen in the second part.
        part = parts[index % 2]
        names = NAMES if index else {1: "white matter", 3: "grey matter", 2: "lesion"}
        part.add(subject_id, truth, mean, std, mask, regions=regions, region_names=names)
    merged = parts[0].merge(parts[1], order=list(subjects)).result()
    expected = one.result()
    assert list(merged["regions"]) == list(expected["regions"])
    assert json.dumps(merged["regions"]) == json.dumps(json.loads(json.dumps(merged["regions"])))
    for name, numbers in expected["regions"].items():
        got = merged["regions"][name]
        assert got["voxels"] == numbers["voxels"] and got["subjects"] == numbers["subjects"]
        for got_group, group in ((got["gaussian"], numbers["gaussian"]),
                                 (got["calibrators"]["x2"], numbers["calibrators"]["x2"])):
            assert got_group["picp"] == group["picp"]  # counts: exact
            assert got_group["width"] == pytest.approx(group["width"], rel=1e-12)
    assert merged["std"] == pytest.approx(expected["std"], rel=1e-12)


def test_subjects_without_regions_are_left_out_of_the_regions_only():
    cohort = CohortEvaluator(axis=0)
    truth, mean, std, mask, regions = labelled_subject(0)
    cohort.add("with", truth, mean, std, mask, regions=regions, region_names=NAMES)
    cohort.add("without", *labelled_subject(1)[:4])
    result = cohort.result()
    assert result["regions"]["lesion"]["subjects"] == 1
    assert sum(r["voxels"] for r in result["regions"].values()) == int(mask.sum())
    bare = CohortEvaluator(axis=0)
    bare.add("without", *labelled_subject(1)[:4])
    assert bare.result()["regions"] is None
    assert "regions" not in evaluate_subject(*labelled_subject(1)[:4], axis=0)


def test_region_labels_must_be_named_and_the_right_shape():
    truth, mean, std, mask, regions = labelled_subject(0)
    with pytest.raises(ValueError, match=r"region label\(s\) \[3\] have no name"):
        evaluate_subject(truth, mean, std, mask, axis=0, regions=regions, region_names={1: "a", 2: "b"})
    with pytest.raises(ValueError, match="regions has shape"):
        evaluate_subject(truth, mean, std, mask, axis=0, regions=regions[:-1], region_names=NAMES)
    with pytest.raises(ValueError, match="whole numbers"):
        RegionIntervalAccumulator().update(truth, mean, std, regions + 0.5, NAMES)
    with pytest.raises(ValueError, match="different levels"):
        RegionIntervalAccumulator().merge(RegionIntervalAccumulator(levels=(0.5,)))


def test_label_zero_is_no_region_and_one_name_may_pool_two_labels():
    truth, mean, std, mask, regions = labelled_subject(0)
    regions[:, :, :4] = 0
    result = RegionIntervalAccumulator().update(truth, mean, std, regions, {1: "normal", 2: "lesion", 3: "normal"},
                                                mask).result()
    assert list(result) == ["normal", "lesion"]
    assert result["normal"]["voxels"] + result["lesion"]["voxels"] == int((mask & (regions > 0)).sum())


def test_std_spread_and_point_masses_are_counted_and_the_nll_stays_finite():
    truth, mean, std, mask, _ = labelled_subject(0)
    std = std.copy()
    flat = np.flatnonzero(mask)[:7]
    std.flat[flat] = 0.0
    mean.flat[flat] += 0.05  # wrong and certain: infinite NLL, if it were scored
    result = evaluate_subject(truth, mean, std, mask, axis=0)
    assert result["std_below_floor"] == 7
    assert result["std_mean"] == pytest.approx(std[mask].mean() * 255)
    assert np.isfinite(result["gaussian"]["nll"]) and result["gaussian"]["nll_left_out"] == 7
    resolved = mask.copy()
    resolved.flat[flat] = False
    assert result["gaussian"]["nll"] == pytest.approx(evaluate_subject(truth, mean, std, resolved, axis=0)["gaussian"]["nll"])
    cohort = CohortEvaluator(axis=0)
    cohort.add("a", truth, mean, std, mask)
    cohort.add("b", *labelled_subject(1)[:4])
    spread = cohort.result()["std"]
    assert spread["below_floor"] == 7 and spread["floor"] == 1e-6
    assert spread["voxels"] == 2 * int(mask.sum())


def test_a_calibrated_nll_function_is_scored_per_calibrator():
    truth, mean, std, mask, _ = labelled_subject(0)
    wide = ScaledGaussian(2.0)

    def nll(m, s, t):
        scale = 2.0 * s
        return 0.5 * np.log(2 * np.pi * scale**2) + 0.5 * ((t - m) / scale) ** 2

    result = evaluate_subject(truth, mean, std, mask, axis=0, quantile_fns={"x2": wide.quantile},
                              nll_fns={"x2": nll})
    expected = evaluate_subject(truth, mean, 2.0 * std, mask, axis=0)["gaussian"]["nll"]
    assert result["calibrators"]["x2"]["nll"] == pytest.approx(expected)
    assert result["calibrators"]["x2"]["nll_left_out"] == 0
    with pytest.raises(ValueError, match="no quantile or interval function"):
        evaluate_subject(truth, mean, std, mask, axis=0, nll_fns={"other": nll})
