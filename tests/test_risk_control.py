"""Subject-level risk control keeps its promises over many calibration draws (issue 18).

Synthetic subjects stand in for a model's predictions: each has its own
noise level (the model's std is off by a subject-specific factor) and
spatially correlated errors (smoothed noise), and a few voxels with std 0.
So a subject's voxels are not exchangeable with another's, which is what
voxel-level conformal assumes and subject-level risk control does not.

Each draw calibrates on 40 subjects from a bank of 600 and measures the
risk (the expected fraction of a new subject's voxels outside its 90 %
interval) on a fixed pool of 400 fresh subjects. Over 200 draws:
RCPS's risk exceeds alpha in at most delta of them (plus 3 binomial standard
errors); CRC's mean risk is at most alpha (plus 3 standard errors); voxel-level
conformal at the same level exceeds alpha in more draws than RCPS.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from uqsynth.calibration.conformal import ConformalCalibrator
from uqsynth.calibration.risk import (
    ConformalRiskControl,
    RiskControl,
    combine_subject_summaries,
    hoeffding_bentkus_ucb,
)

ALPHA, DELTA, LEVEL = 0.1, 0.1, 0.9
SIDE = 16  # a subject is a 16 x 16 image
DRAWS, PER_DRAW, BANK, POOL = 200, 40, 600, 400


def synthetic_subjects(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, std, truth)``, each ``(count, SIDE * SIDE)``: one row per subject."""
    rng = np.random.default_rng(seed)
    shape = (count, SIDE, SIDE)
    smooth = lambda field: gaussian_filter(field, sigma=(0, 2, 2), mode="wrap")  # noqa: E731
    std = np.exp(0.5 * smooth(rng.standard_normal(shape)) / smooth(rng.standard_normal(shape)).std())
    std[rng.random(shape) < 0.03] = 0.0  # voxels every MC sample agreed on
    errors = smooth(rng.standard_normal(shape))
    errors /= errors.std(axis=(1, 2), keepdims=True)  # correlated within a subject, unit variance
    factor = np.exp(rng.normal(0.0, 0.4, (count, 1, 1)))  # the model is off by its own factor per subject
    mean = rng.uniform(50.0, 200.0, shape)
    truth = mean + factor * np.hypot(std, 0.5) * errors
    return tuple(array.reshape(count, -1) for array in (mean, std, truth))


def risk(calibrator, pool) -> float:
    """Mean over the pool's subjects of the fraction of its voxels outside the 90 % interval."""
    mean, std, truth = pool
    lower, upper = calibrator.interval(mean, std, LEVEL)
    return float(np.mean(((truth < lower) | (truth > upper)).mean(axis=1)))


@pytest.fixture(scope="module")
def draws():
    bank, pool = synthetic_subjects(BANK, seed=1), synthetic_subjects(POOL, seed=2)
    # Both share the summary (same bins): each subject is summarized once, and each draw combines 40.
    summaries = [ConformalRiskControl().subject_summary(bank[0][i], bank[1][i], bank[2][i], f"sub-{i}")
                 for i in range(BANK)]
    rng = np.random.default_rng(3)
    risks = {"crc": [], "rcps": [], "conformal": []}
    for _ in range(DRAWS):
        chosen = rng.choice(BANK, PER_DRAW, replace=False)
        crc = ConformalRiskControl(alpha=ALPHA).load_summary(
            combine_subject_summaries([summaries[i] for i in chosen]))
        rcps = RiskControl(alpha=ALPHA, delta=DELTA).load_summary(
            combine_subject_summaries([summaries[i] for i in chosen]))
        conformal = ConformalCalibrator().fit(*(array[chosen].ravel() for array in bank))
        for name, calibrator in (("crc", crc), ("rcps", rcps), ("conformal", conformal)):
            risks[name].append(risk(calibrator, pool))
    risks = {name: np.asarray(values) for name, values in risks.items()}
    for name, values in risks.items():  # shown with -s, and in the note
        print(f"{name}: mean risk {values.mean():.4f}, exceeds alpha in {np.mean(values > ALPHA):.3f} of draws")
    return risks


def test_rcps_risk_exceeds_alpha_in_at_most_delta_of_the_draws(draws):
    exceeded = float(np.mean(draws["rcps"] > ALPHA))
    bound = DELTA + 3.0 * np.sqrt(DELTA * (1.0 - DELTA) / DRAWS)
    assert exceeded <= bound, f"RCPS's risk exceeded alpha in {exceeded:.3f} of {DRAWS} draws (bound {bound:.3f})"
    assert np.isfinite(draws["rcps"]).all() and (draws["rcps"] > 0).all(), "RCPS gave no finite intervals"


def test_crc_mean_risk_is_at_most_alpha(draws):
    mean, error = draws["crc"].mean(), draws["crc"].std(ddof=1) / np.sqrt(DRAWS)
    assert mean <= ALPHA + 3.0 * error, f"CRC's mean risk {mean:.4f} > alpha {ALPHA} + 3 SE {error:.4f}"
    assert mean > ALPHA - 0.03, f"CRC's mean risk {mean:.4f} is far below alpha: its intervals are needlessly wide"


def test_voxel_level_conformal_breaks_the_subject_level_target_more_often_than_rcps(draws):
    conformal, rcps = int(np.sum(draws["conformal"] > ALPHA)), int(np.sum(draws["rcps"] > ALPHA))
    assert conformal > rcps, f"conformal exceeded alpha in {conformal} draws, RCPS in {rcps}"


def test_hoeffding_bentkus_bound_matches_its_closed_form_at_zero_risk():
    # With no loss observed the binomial term is e (1 - a)^n and Hoeffding's (1 - a)^n: the bound solves (1 - a)^n = delta.
    for n in (22, 40, 100):
        assert hoeffding_bentkus_ucb(np.zeros(1), n, DELTA)[0] == pytest.approx(1.0 - DELTA ** (1.0 / n), rel=1e-9)


def test_too_few_subjects_are_named_before_fitting():
    assert ConformalRiskControl(alpha=0.1).required_subjects() == 9
    assert ConformalRiskControl(alpha=0.05).required_subjects() == 19
    assert RiskControl(alpha=0.1, delta=0.1).required_subjects() == 22


def test_batches_of_one_subject_add_up_and_subjects_merge_exactly():
    mean, std, truth = synthetic_subjects(6, seed=5)
    whole = ConformalRiskControl().fit(mean.ravel(), std.ravel(), truth.ravel(),
                                       subject=np.repeat([f"s{i}" for i in range(6)], mean.shape[1]))
    streamed = ConformalRiskControl()
    for i in range(6):
        half = mean.shape[1] // 2
        for part in (slice(0, half), slice(half, None)):
            streamed.partial_fit(mean[i, part], std[i, part], truth[i, part], subject=f"s{i}")
    assert int(streamed.n_subjects_) == 6
    for name, value in whole.summary().items():
        assert np.array_equal(value, streamed.summary()[name]), name
    with pytest.raises(ValueError, match="calibrates on whole subjects"):
        ConformalRiskControl().fit(mean.ravel(), std.ravel(), truth.ravel())


def fitted_on(calibrator, count: int, seed: int = 3):
    mean, std, truth = synthetic_subjects(count, seed)
    subject = np.repeat(np.arange(count), mean.shape[1])
    return calibrator.fit(mean.ravel(), std.ravel(), truth.ravel(), subject=subject)


def test_the_certificate_of_a_risk_controlled_interval_states_the_subject_level_promise(tmp_path):
    import json

    from uqsynth.certificate import interval_entry, write_certificate

    mean, std, _ = synthetic_subjects(1, seed=9)
    for calibrator, delta, rule in ((RiskControl(), 0.1, "Hoeffding-Bentkus"), (ConformalRiskControl(), None,
                                                                                 "conformal risk control")):
        fitted_on(calibrator, 40)
        lower, upper = calibrator.interval(mean[0], std[0], LEVEL)
        entry = interval_entry(LEVEL, lower, upper, name="risk", calibrator=calibrator)
        assert entry["unit"] == "subject" and entry["calibration_subjects"] == 40 and entry["delta"] == delta
        assert entry["alpha"] == ALPHA and rule in entry["statement"] and "the 40 calibration subjects" in entry["statement"]
        assert entry["mean_width"] == pytest.approx(np.mean(upper - lower) * 255) and entry["infinite_voxels"] == 0
    # Too few subjects for RCPS at this level: the interval is infinite, and the certificate says so in strict JSON.
    calibrator = fitted_on(RiskControl(), RiskControl().required_subjects() - 1)
    lower, upper = calibrator.interval(mean[0], std[0], LEVEL)
    entry = interval_entry(LEVEL, lower, upper, name="risk_control", calibrator=calibrator)
    assert entry["mean_width"] is None and entry["infinite_voxels"] == mean.shape[1]
    path = write_certificate(tmp_path / "s_uncertainty.json", {"intervals": [entry]})
    assert json.loads(path.read_text())["intervals"][0]["mean_width"] is None


LESION = 2  # region labels of the Mondrian test: 1 the rest of the brain, 2 a lesion


def subjects_with_a_lesion(count: int, seed: int) -> tuple[np.ndarray, ...]:
    """:func:`synthetic_subjects` with a 6 x 6 lesion per subject (14 % of it) where the std is 3 times too small."""
    mean, std, truth = synthetic_subjects(count, seed)
    rng = np.random.default_rng(seed + 1000)
    labels = np.ones(mean.shape, dtype=np.int64)
    for i, (row, column) in enumerate(rng.integers(0, SIDE - 6, (count, 2))):
        square = np.zeros((SIDE, SIDE), dtype=bool)
        square[row : row + 6, column : column + 6] = True
        labels[i, square.ravel()] = LESION
    truth = np.where(labels == LESION, mean + 3.0 * (truth - mean), truth)
    return mean, std, truth, labels


def risks_by_region(calibrator, pool, *, with_labels: bool) -> dict[str, float]:
    """Mean over the pool of the fraction outside the 90 % interval: of the brain, and of the lesion."""
    mean, std, truth, labels = pool
    lower, upper = calibrator.interval(mean, std, LEVEL, regions=labels if with_labels else None)
    outside = (truth < lower) | (truth > upper)
    lesion = labels == LESION
    return {"brain": float(outside.mean(axis=1).mean()),
            "lesion": float(((outside & lesion).sum(axis=1) / lesion.sum(axis=1)).mean()),
            "width": float(np.mean((upper - lower)[~lesion]))}


@pytest.fixture(scope="module")
def mondrian_draws():
    bank, pool = subjects_with_a_lesion(BANK, seed=11), subjects_with_a_lesion(POOL, seed=12)
    summaries = {regions: [ConformalRiskControl(regions=regions).subject_summary(
        bank[0][i], bank[1][i], bank[2][i], f"sub-{i}", regions=bank[3][i]) for i in range(BANK)] for regions in (0, 2)}
    rng = np.random.default_rng(13)
    results = {key: [] for key in ("brain only", "mondrian", "mondrian with labels", "rcps mondrian")}
    for _ in range(MONDRIAN_DRAWS):
        chosen = rng.choice(BANK, PER_DRAW, replace=False)
        joined = {regions: combine_subject_summaries([parts[i] for i in chosen]) for regions, parts in summaries.items()}
        brain_only = ConformalRiskControl(alpha=ALPHA).load_summary(joined[0])
        mondrian = ConformalRiskControl(alpha=ALPHA, regions=2).load_summary(joined[2])
        rcps = RiskControl(alpha=ALPHA, delta=DELTA, regions=2).load_summary(joined[2])
        results["brain only"].append(risks_by_region(brain_only, pool, with_labels=False))
        results["mondrian"].append(risks_by_region(mondrian, pool, with_labels=False))
        results["mondrian with labels"].append(risks_by_region(mondrian, pool, with_labels=True))
        results["rcps mondrian"].append(risks_by_region(rcps, pool, with_labels=False))
    out = {key: {part: np.array([r[part] for r in rows]) for part in rows[0]} for key, rows in results.items()}
    for key, parts in out.items():  # shown with -s, and in the note
        print(f"{key}: " + ", ".join(f"{part} {values.mean():.4f}" for part, values in parts.items()))
    return out


MONDRIAN_DRAWS = 100


def below_alpha(values: np.ndarray) -> bool:
    return values.mean() <= ALPHA + 3.0 * values.std(ddof=1) / np.sqrt(values.size)


def test_one_scale_per_region_keeps_the_promise_inside_the_lesion_too(mondrian_draws):
    # One scale for the brain keeps the brain's promise and breaks the lesion's: its std is 3 times too small there.
    assert below_alpha(mondrian_draws["brain only"]["brain"])
    assert mondrian_draws["brain only"]["lesion"].mean() > 2 * ALPHA
    # Mondrian, on a new volume without labels (the largest scale): both promises hold.
    for key in ("mondrian", "mondrian with labels"):
        assert below_alpha(mondrian_draws[key]["brain"]), key
        assert below_alpha(mondrian_draws[key]["lesion"]), key
    # Knowing the labels spends the lesion's width on the lesion only: narrower elsewhere.
    assert (mondrian_draws["mondrian with labels"]["width"] < mondrian_draws["mondrian"]["width"]).all()
    # RCPS per region: the lesion's risk exceeds alpha in at most delta of the draws.
    exceeded = float(np.mean(mondrian_draws["rcps mondrian"]["lesion"] > ALPHA))
    assert exceeded <= DELTA + 3.0 * np.sqrt(DELTA * (1.0 - DELTA) / MONDRIAN_DRAWS)


def test_a_region_too_few_subjects_had_gets_no_promise_of_its_own():
    mean, std, truth, labels = subjects_with_a_lesion(30, seed=21)
    labels[5:, :] = np.where(labels[5:] == LESION, 1, labels[5:])  # only 5 subjects have a lesion
    subject = np.repeat(np.arange(30), mean.shape[1])
    calibrator = ConformalRiskControl(regions=2).fit(mean.ravel(), std.ravel(), truth.ravel(), subject=subject,
                                                     regions=labels.ravel())
    assert list(calibrator.region_subjects_) == [30, 5] and calibrator.certified_regions() == [1]
    guarantee = calibrator.guarantee(LEVEL)
    assert guarantee["regions"] == {"certified": {"1": 30}, "without_promise": [2]}
    assert "each region label (1)" in guarantee["statement"]
    # Its voxels keep the whole brain's finite scale rather than an infinite one.
    assert np.isfinite(calibrator.scale(LEVEL)) and calibrator.scale(LEVEL, LESION) == calibrator.scale(LEVEL, 0)
