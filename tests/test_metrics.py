"""Metrics: hand-checked small arrays, invariances, streaming == one shot, and cross-checks.

Cross-checks against open implementations on the same arrays: scipy
(t-test, correlations), properscoring (CRPS), scikit-image (SSIM, PSNR) and
uncertainty-toolbox (calibration curve, RMS calibration error,
miscalibration area; its formulas are also reproduced here so the check
runs where the package is not installed).
"""

from __future__ import annotations

import json

import numpy as np
import properscoring
import pytest
from scipy import stats
from scipy.special import ndtr, ndtri
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from uqsynth.baselines import masked_rmse
from uqsynth.metrics import (
    DEFAULT_LEVELS,
    CalibrationCurveAccumulator,
    CohortEvaluator,
    CRPSAccumulator,
    IntervalAccumulator,
    NLLAccumulator,
    SparsificationAccumulator,
    ause,
    calibration_curve,
    calibration_rms,
    correlation,
    crps_from_quantiles,
    crps_gaussian,
    crps_levels,
    evaluate_subject,
    gaussian_nll,
    interval_scores,
    mae,
    miscalibration_area,
    nrmse,
    nstd,
    paired_ttest,
    psnr,
    rmse,
    slice_level,
    sparsification_curve,
    ssim,
    triage,
    voxel_pairs,
)


class ScaledGaussian:
    """Stand-in for a fitted calibrator: N(mean, (factor * std)^2), the Calibrator interface."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def cdf(self, mean, std, values):
        return ndtr((values - mean) / (self.factor * std))

    def quantile(self, mean, std, q):
        return mean + self.factor * std * ndtri(q)

    def interval(self, mean, std, level):
        tail = (1.0 - level) / 2.0
        return self.quantile(mean, std, tail), self.quantile(mean, std, 1.0 - tail)


def gaussian_voxels(n: int, *, seed: int = 0, std_factor: float = 1.0, bias: float = 0.0):
    """Truths drawn from N(mean + bias, std^2); the predictor claims std * std_factor."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.2, 0.8, n)
    std = rng.uniform(0.01, 0.05, n)
    truth = mean + bias + std * rng.standard_normal(n)
    return truth, mean, std * std_factor


def subject(seed: int, *, shape=(6, 20, 22), noise: float = 0.03):
    """A small 'brain': a box mask, truth 0 outside, errors that grow with the std."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[1:5, 3:17, 4:19] = True
    truth = np.where(mask, rng.uniform(0.2, 0.9, shape), 0.0)
    std = rng.uniform(0.2, 1.0, shape) * noise
    mean = np.clip(truth + std * rng.standard_normal(shape), 0.0, 1.0)
    return truth, mean, std, mask


# ---------------------------------------------------------------- accuracy


def test_rmse_and_mae_by_hand_on_the_255_scale():
    truth = np.zeros((2, 2))
    prediction = np.array([[0.1, -0.1], [0.2, 5.0]])
    mask = np.array([[True, True], [True, False]])
    assert rmse(truth, prediction, mask) == pytest.approx(255 * np.sqrt((0.01 + 0.01 + 0.04) / 3))
    assert mae(truth, prediction, mask) == pytest.approx(255 * 0.4 / 3)
    assert rmse(truth, prediction, mask, scale=1.0) == pytest.approx(np.sqrt(0.02))
    assert rmse(truth, prediction, mask) == pytest.approx(masked_rmse(prediction, truth, mask))


def test_accuracy_ignores_voxels_outside_the_mask():
    truth, mean, _, mask = subject(0)
    changed = np.where(mask, mean, np.random.default_rng(1).uniform(0, 1, mean.shape))
    for metric in (rmse, mae, psnr):
        assert metric(truth, changed, mask) == metric(truth, mean, mask)
    assert ssim(truth, changed, mask, axis=0) == pytest.approx(ssim(truth, mean, mask, axis=0), abs=1e-12)


def test_psnr_uses_data_range_one_and_equals_psnr_on_the_255_scale():
    truth = np.full(10, 0.5)
    prediction = truth + 0.1  # MSE 0.01 -> 20 dB at data range 1
    assert psnr(truth, prediction) == pytest.approx(20.0)
    reference = peak_signal_noise_ratio(truth * 255, prediction * 255, data_range=255)
    assert psnr(truth, prediction) == pytest.approx(reference)
    assert psnr(truth, truth) == np.inf


def test_ssim_matches_skimage_maps_and_orders_predictions():
    truth, mean, _, _ = subject(2, shape=(3, 16, 18))
    full = np.ones(truth.shape, dtype=bool)
    maps = [
        structural_similarity(
            truth[k], mean[k], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
        )[1]
        for k in range(3)
    ]
    assert ssim(truth, mean, full, axis=0) == pytest.approx(np.mean(maps))
    truth, mean, _, mask = subject(3)
    assert ssim(truth, truth, mask, axis=0) == pytest.approx(1.0)
    worse = np.clip(mean + 0.1 * np.random.default_rng(4).standard_normal(mean.shape), 0, 1)
    assert ssim(truth, worse, mask, axis=0) < ssim(truth, mean, mask, axis=0) < 1.0


def test_ssim_crop_to_the_brain_leaves_the_map_unchanged():
    truth, mean, _, mask = subject(5, shape=(2, 40, 40))
    smap = structural_similarity(
        np.where(mask[1], truth[1], 0),
        np.where(mask[1], mean[1], 0),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )[1]
    assert ssim(truth[1:], mean[1:], mask[1:], axis=0) == pytest.approx(smap[mask[1]].mean(), rel=1e-12)


def test_metrics_refuse_bad_inputs():
    truth, mean, _, mask = subject(0)
    with pytest.raises(ValueError, match="shape"):
        rmse(truth, mean[:-1], mask[:-1])
    with pytest.raises(ValueError, match="mask has shape"):
        rmse(truth, mean, mask[:-1])
    with pytest.raises(ValueError, match="no voxels"):
        rmse(truth, mean, np.zeros_like(mask))
    with pytest.raises(ValueError, match="NaN"):
        rmse(truth, np.where(mask, np.nan, mean), mask)
    rmse(truth, np.where(mask, mean, np.nan), mask)  # NaN outside the brain is fine
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(truth[:, :8, :8], mean[:, :8, :8], mask[:, :8, :8], axis=0)


# ---------------------------------------------------------------- levels


def test_nrmse_and_nstd_by_hand():
    truth = np.array([3.0, 4.0, 99.0])
    mean = np.array([3.3, 4.4, 0.0])
    mask = np.array([True, True, False])
    assert nrmse(truth, mean, mask) == pytest.approx(0.5 / 5.0)
    assert nstd(np.array([0.1, 0.1, 7.0]), mask) == pytest.approx(25.5)
    assert nstd(np.array([0.3, 0.4, 7.0]), mask, scale=1.0) == pytest.approx(np.sqrt(0.125))


def test_slice_level_skips_slices_without_brain_and_matches_per_slice_values():
    truth, mean, std, mask = subject(1)
    result = slice_level(truth, mean, std, mask, axis=0)
    assert result["index"] == [1, 2, 3, 4]
    for k, value_nrmse, value_nstd in zip(result["index"], result["nrmse"], result["nstd"]):
        assert value_nrmse == pytest.approx(nrmse(truth[k], mean[k], mask[k]))
        assert value_nstd == pytest.approx(nstd(std[k], mask[k]))
    along_rows = slice_level(truth, mean, std, mask, axis=1)
    assert along_rows["index"] == list(range(3, 17))
    json.dumps(result)


def test_voxel_pairs_subsample_is_deterministic_and_bounded():
    truth, mean, std, mask = subject(2)
    error, spread = voxel_pairs(truth, mean, std, mask, max_points=100, seed=3)
    again = voxel_pairs(truth, mean, std, mask, max_points=100, seed=3)
    assert error.shape == spread.shape == (100,)
    np.testing.assert_array_equal(error, again[0])
    all_error, all_spread = voxel_pairs(truth, mean, std, mask, max_points=10**6)
    assert all_error.size == mask.sum()
    np.testing.assert_allclose(all_error, 255 * np.abs(mean - truth)[mask])
    assert set(np.round(spread, 12)) <= set(np.round(all_spread, 12))


def test_correlation_matches_scipy_and_handles_degenerate_input():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    result = correlation(x, y)
    assert result["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert result["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert correlation(x, np.exp(x))["spearman"] == pytest.approx(1.0)
    assert np.isnan(correlation(x, np.ones(50))["spearman"])
    assert np.isnan(correlation([1.0], [2.0])["pearson"])


# ---------------------------------------------------------------- calibration curve


def test_calibration_curve_by_hand():
    truth = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    zeros, ones = np.zeros(5), np.ones(5)
    # Gaussian quantiles at p = 0.05, 0.2, 0.5, 0.8, 0.95: -1.645, -0.842, 0, 0.842, 1.645;
    # truths at or below them: 1, 2, 3 (0 <= 0 counts), 3, 4 of 5.
    expected, observed = calibration_curve(truth, zeros, ones, levels=[0.05, 0.2, 0.5, 0.8, 0.95])
    np.testing.assert_allclose(observed, [1 / 5, 2 / 5, 3 / 5, 3 / 5, 4 / 5])
    assert calibration_rms(expected, observed) == pytest.approx(
        np.sqrt(np.mean(np.square([0.15, 0.2, 0.1, -0.2, -0.15])))
    )
    # The end points 0 and 1 hold for every predictor.
    _, observed = calibration_curve(truth, zeros, ones, levels=[0.0, 0.5, 1.0])
    np.testing.assert_allclose(observed, [0.0, 0.6, 1.0])


def test_calibrated_gaussian_curve_is_diagonal():
    truth, mean, std = gaussian_voxels(200_000)
    expected, observed = calibration_curve(truth, mean, std)
    np.testing.assert_allclose(expected, np.arange(1, 20) * 0.05)
    assert np.abs(observed - expected).max() < 0.005
    assert calibration_rms(expected, observed) < 0.003
    assert miscalibration_area(expected, observed) < 0.003


def test_overconfident_gaussian_gives_an_s_shaped_curve():
    truth, mean, std = gaussian_voxels(50_000, std_factor=1 / 3)
    expected, observed = calibration_curve(truth, mean, std)
    below_half, above_half = expected < 0.5, expected > 0.5
    # Too narrow: the low quantiles are too high and the high ones too low.
    assert (observed[below_half] > expected[below_half]).all()
    assert (observed[above_half] < expected[above_half]).all()
    assert observed[0] > 0.25 and observed[-1] < 0.75
    assert observed[expected == 0.5] == pytest.approx(0.5, abs=0.01)
    assert calibration_rms(expected, observed) > 0.15
    # Theory: observed = Phi(Phi^-1(p) / 3).
    np.testing.assert_allclose(observed, ndtr(ndtri(expected) / 3), atol=0.01)


def test_a_calibrators_quantile_function_straightens_the_curve():
    truth, mean, std = gaussian_voxels(50_000, std_factor=1 / 3)
    before = calibration_rms(*calibration_curve(truth, mean, std))
    after = calibration_rms(*calibration_curve(truth, mean, std, quantile_fn=ScaledGaussian(3.0).quantile))
    assert before > 0.15 and after < 0.01


def test_miscalibration_area_by_hand_with_and_without_crossings():
    # Above the diagonal only: the triangle (0,0)-(0.5,0.7)-(1,1) over y = x.
    assert miscalibration_area([0.5], [0.7]) == pytest.approx(0.5 * 1.0 * 0.2)
    # Crossing at 0.5: two triangles of 0.025 (end points (0,0), (1,1) added).
    assert miscalibration_area([0.25, 0.75], [0.35, 0.65]) == pytest.approx(0.0125 + 0.025 + 0.0125)
    assert miscalibration_area([0.0, 0.5, 1.0], [0.0, 0.5, 1.0]) == 0.0


def test_streaming_calibration_curve_equals_one_shot():
    truth, mean, std, mask = subject(4)
    one_shot = CalibrationCurveAccumulator().update(truth, mean, std, mask)
    streamed = CalibrationCurveAccumulator()
    for k in range(truth.shape[0]):  # slice by slice; the first slice has no brain
        if mask[k].any():
            streamed.update(truth[k], mean[k], std[k], mask[k])
    np.testing.assert_array_equal(streamed.below_, one_shot.below_)
    assert streamed.n_ == one_shot.n_ == mask.sum()
    halves = CalibrationCurveAccumulator().update(truth[:3], mean[:3], std[:3], mask[:3])
    halves.merge(CalibrationCurveAccumulator().update(truth[3:], mean[3:], std[3:], mask[3:]))
    assert halves.result() == one_shot.result()
    with pytest.raises(ValueError, match="increase"):
        CalibrationCurveAccumulator(levels=[0.5, 0.2])


# Uncertainty-toolbox (Chung et al. 2021), metrics_calibration.py, reproduced:
# residuals = y_pred - y_true; for prop_type="quantile" the observed
# proportion at p is mean(residuals / y_std <= Phi^-1(p)) over
# exp_proportions = linspace(0, 1, num_bins); rmsce = sqrt(mean((exp - obs)^2));
# miscalibration_area = sum of vertical-sided trapezoids between the curve
# and the diagonal, split into two triangles where they cross.


def toolbox_proportions(mean, std, truth, num_bins):
    expected = np.linspace(0, 1, num_bins)
    normalized = ((mean - truth) / std).reshape(-1, 1)
    return expected, (normalized <= ndtri(expected)).mean(axis=0)


def toolbox_area(expected, observed):
    area = 0.0
    for xl, xr, dl, dr in zip(expected[:-1], expected[1:], (observed - expected)[:-1], (observed - expected)[1:]):
        if dl * dr < 0:
            cross = xl + (xr - xl) * dl / (dl - dr)
            area += 0.5 * abs(dl) * (cross - xl) + 0.5 * abs(dr) * (xr - cross)
        else:
            area += (xr - xl) * abs(dl + dr) / 2
    return area


@pytest.mark.parametrize("std_factor, bias", [(1.0, 0.0), (0.4, 0.0), (2.5, 0.0), (0.7, 0.02)])
def test_calibration_matches_uncertainty_toolbox_formulas(std_factor, bias):
    truth, mean, std = gaussian_voxels(3000, seed=7, std_factor=std_factor, bias=bias)
    grid = np.linspace(0, 1, 100)
    expected, observed = calibration_curve(truth, mean, std, levels=grid)
    tb_expected, tb_observed = toolbox_proportions(mean, std, truth, 100)
    # The toolbox counts truths above the (1 - p)-quantile: the same curve
    # reflected through (0.5, 0.5) ...
    np.testing.assert_allclose(observed, 1.0 - tb_observed[::-1], atol=1e-12)
    # ... so the figures of merit agree on its symmetric grid.
    assert calibration_rms(expected, observed) == pytest.approx(np.sqrt(np.mean((tb_expected - tb_observed) ** 2)))
    assert miscalibration_area(expected, observed) == pytest.approx(toolbox_area(tb_expected, tb_observed))


@pytest.mark.parametrize("std_factor, bias", [(0.4, 0.0), (0.7, 0.02)])
def test_calibration_matches_uncertainty_toolbox_package(std_factor, bias):
    import uncertainty_toolbox.metrics_calibration as toolbox  # in the test extra: a missing install fails
    truth, mean, std = gaussian_voxels(3000, seed=8, std_factor=std_factor, bias=bias)
    expected, observed = calibration_curve(truth, mean, std, levels=np.linspace(0, 1, 100))
    tb_expected, tb_observed = toolbox.get_proportion_lists_vectorized(mean, std, truth, 100, None, "quantile")
    np.testing.assert_allclose(observed, 1.0 - tb_observed[::-1], atol=1e-12)
    arguments = dict(num_bins=100, vectorized=True, prop_type="quantile")
    rms = toolbox.root_mean_squared_calibration_error(mean, std, truth, **arguments)
    area = toolbox.miscalibration_area(mean, std, truth, **arguments)
    assert calibration_rms(expected, observed) == pytest.approx(rms)
    assert miscalibration_area(expected, observed) == pytest.approx(area)
    # Our default grid (no end points) on our own curve, against the toolbox's area formula.
    expected, observed = calibration_curve(truth, mean, std)
    padded_x, padded_y = np.r_[0.0, expected, 1.0], np.r_[0.0, observed, 1.0]
    assert miscalibration_area(expected, observed) == pytest.approx(
        toolbox.miscalibration_area_from_proportions(padded_x, padded_y)
    )


# ---------------------------------------------------------------- proper scores and intervals


def test_crps_by_hand_and_against_properscoring():
    # CRPS of N(0, 1) at its mean: 2 phi(0) - 1 / sqrt(pi).
    assert crps_gaussian(np.zeros(1), np.zeros(1), np.ones(1), scale=1.0) == pytest.approx(
        2 / np.sqrt(2 * np.pi) - 1 / np.sqrt(np.pi)
    )
    # A zero std gives the absolute error (MAE), floored rather than NaN.
    truth, mean = np.array([0.1, 0.5]), np.array([0.2, 0.2])
    assert crps_gaussian(truth, mean, np.zeros(2)) == pytest.approx(mae(truth, mean), rel=1e-4)
    truth, mean, std = gaussian_voxels(1000, seed=1)
    reference = properscoring.crps_gaussian(truth, mean, std).mean() * 255
    assert crps_gaussian(truth, mean, std) == pytest.approx(reference)


@pytest.mark.parametrize("std_factor", [1.0, 0.3, 3.0])
def test_quantile_crps_approximates_the_exact_gaussian_crps(std_factor):
    truth, mean, std = gaussian_voxels(20_000, seed=2, std_factor=std_factor)
    exact = crps_gaussian(truth, mean, std)
    assert crps_from_quantiles(truth, mean, std) == pytest.approx(exact, rel=2e-3)
    finer = crps_from_quantiles(truth, mean, std, levels=crps_levels(99))
    assert abs(finer - exact) < abs(crps_from_quantiles(truth, mean, std) - exact)
    # A calibrator's quantiles score its own (wider) predictive.
    widened = crps_from_quantiles(truth, mean, std, quantile_fn=ScaledGaussian(2.0).quantile)
    assert widened == pytest.approx(crps_gaussian(truth, mean, 2.0 * std), rel=2e-3)


def test_gaussian_nll_by_hand_and_point_masses_left_out():
    assert gaussian_nll(np.zeros(1), np.zeros(1), np.ones(1), scale=1.0) == pytest.approx(0.5 * np.log(2 * np.pi))
    assert gaussian_nll(np.ones(1), np.zeros(1), np.full(1, 2.0), scale=1.0) == pytest.approx(
        0.5 * np.log(2 * np.pi * 4.0) + 1 / 8
    )
    # On [0, 255] the density is 255 times flatter.
    assert gaussian_nll(np.zeros(1), np.zeros(1), np.ones(1)) == pytest.approx(0.5 * np.log(2 * np.pi) + np.log(255))
    # A zero std is a point mass: left out and counted, not floored into a number that dominates the mean.
    truth, mean, std = np.array([0.0, 0.5, 0.3]), np.zeros(3), np.array([1.0, 0.0, 1e-9])
    assert gaussian_nll(truth, mean, std, scale=1.0) == pytest.approx(0.5 * np.log(2 * np.pi))
    result = NLLAccumulator(scale=1.0).update(truth, mean, std).result()
    assert result["n"] == 1 and result["n_left_out"] == 2 and np.isfinite(result["nll"])
    assert np.isnan(gaussian_nll(np.zeros(2), np.zeros(2), np.zeros(2), std_floor=0.01, scale=1.0))
    merged = NLLAccumulator(scale=1.0).update(truth[:2], mean[:2], std[:2])
    merged.merge(NLLAccumulator(scale=1.0).update(truth[2:], mean[2:], std[2:]))
    assert merged.result() == result
    truth, mean, std = gaussian_voxels(50_000, seed=3)
    calibrated = gaussian_nll(truth, mean, std)
    assert gaussian_nll(truth, mean, std / 3) > calibrated and gaussian_nll(truth, mean, std * 3) > calibrated


def test_interval_coverage_and_width_by_hand():
    truth = np.array([0.0, 0.5, 2.0])
    # Central 50 % interval of N(0, 1): +-0.674 holds 0 and 0.5; 95 %: +-1.96 misses 2.
    result = interval_scores(truth, np.zeros(3), np.ones(3), levels=(0.5, 0.95), scale=1.0)
    assert result["picp"] == pytest.approx({"0.5": 2 / 3, "0.95": 2 / 3})
    assert result["width"]["0.95"] == pytest.approx(2 * 1.959964)
    wide = interval_scores(truth, np.zeros(3), np.ones(3), interval_fn=ScaledGaussian(2.0).interval, scale=1.0)
    assert wide["picp"]["0.95"] == 1.0
    assert wide["width"]["0.9"] == pytest.approx(4 * 1.644854)


def test_calibrated_intervals_cover_their_level():
    truth, mean, std = gaussian_voxels(100_000, seed=4)
    result = interval_scores(truth, mean, std)
    for level, coverage in result["picp"].items():
        assert coverage == pytest.approx(float(level), abs=0.005)
    narrow = interval_scores(truth, mean, std / 3)
    assert narrow["picp"]["0.9"] < 0.6
    fixed = interval_scores(truth, mean, std / 3, interval_fn=ScaledGaussian(3.0).interval)
    assert fixed["picp"]["0.9"] == pytest.approx(0.9, abs=0.005)


def test_streaming_scores_equal_one_shot():
    truth, mean, std, mask = subject(5)
    quantile = ScaledGaussian(1.5).quantile
    makers = [
        lambda: CRPSAccumulator(),
        lambda: CRPSAccumulator(quantile_fn=quantile),
        lambda: NLLAccumulator(),
        lambda: IntervalAccumulator(),
    ]
    for make in makers:
        one_shot = make().update(truth, mean, std, mask).result()
        streamed = make()
        for k in range(truth.shape[0]):
            if mask[k].any():
                streamed.update(truth[k], mean[k], std[k], mask[k])
        merged = make().update(truth[:2], mean[:2], std[:2], mask[:2])
        merged.merge(make().update(truth[2:], mean[2:], std[2:], mask[2:]))
        for other in (streamed.result(), merged.result()):
            assert other.keys() == one_shot.keys()
            assert json.dumps(other, sort_keys=True) == json.dumps(
                json.loads(json.dumps(other)), sort_keys=True
            )
            for key, value in one_shot.items():
                assert other[key] == pytest.approx(value, rel=1e-12)


# ---------------------------------------------------------------- sparsification


def test_sparsification_by_hand():
    error = np.array([1.0, 2.0, 3.0, 4.0])
    uncertainty = np.array([0.4, 0.1, 0.3, 0.2])  # ranks errors 2, 4, 3, 1 as the least uncertain
    result = sparsification_curve(error, np.zeros(4), uncertainty, recall=[1.0, 0.5, 0.25], scale=1.0)
    assert result["rmse"] == pytest.approx([np.sqrt(30 / 4), np.sqrt((4 + 16) / 2), 2.0])
    assert result["rmse_oracle"] == pytest.approx([np.sqrt(30 / 4), np.sqrt((1 + 4) / 2), 1.0])
    gap = np.array(result["rmse"]) - np.array(result["rmse_oracle"])
    assert result["ause"] == pytest.approx(0.5 * (gap[0] + gap[1]) / 2 + 0.25 * (gap[1] + gap[2]) / 2)
    assert result["ause_normalized"] == pytest.approx(result["ause"] / np.sqrt(30 / 4))


def test_sparsification_of_the_true_error_is_the_oracle():
    truth, mean, std, mask = subject(6)
    result = sparsification_curve(truth, mean, np.abs(mean - truth), mask)
    np.testing.assert_allclose(result["rmse"], result["rmse_oracle"])
    assert result["ause"] == pytest.approx(0.0, abs=1e-9)
    assert result["rmse"][0] == pytest.approx(rmse(truth, mean, mask))
    assert np.all(np.diff(result["rmse"]) <= 1e-12)  # removing the worst voxels only helps


def test_random_uncertainty_has_positive_ause_and_informative_uncertainty_less():
    truth, mean, std, mask = subject(7)
    informative = sparsification_curve(truth, mean, std, mask)
    random = sparsification_curve(truth, mean, np.random.default_rng(0).uniform(size=std.shape), mask)
    assert random["ause"] > 2 * informative["ause"] > 0
    # A random ranking keeps the RMSE roughly flat.
    assert random["rmse"][50] == pytest.approx(random["rmse"][0], rel=0.15)
    assert informative["rmse"][50] < 0.8 * informative["rmse"][0]


def test_binned_sparsification_matches_the_exact_curve():
    rng = np.random.default_rng(8)
    n = 60_000
    std = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), n))
    truth = rng.uniform(0.2, 0.8, n)
    mean = truth + std * rng.standard_normal(n)
    exact = sparsification_curve(truth, mean, std)
    binned = SparsificationAccumulator().update(truth, mean, std).result()
    np.testing.assert_allclose(binned["rmse"], exact["rmse"], rtol=5e-3)
    np.testing.assert_allclose(binned["rmse_oracle"], exact["rmse_oracle"], rtol=5e-3)
    assert binned["ause"] == pytest.approx(exact["ause"], rel=0.02)
    # Coarser bins lose resolution: the agreement gets visibly worse.
    coarse = SparsificationAccumulator(bins=8).update(truth, mean, std).result()
    assert np.abs(np.array(coarse["rmse"]) / exact["rmse"] - 1).max() > 0.01


def test_binned_sparsification_streams_over_subjects():
    subjects = [subject(seed) for seed in (9, 10, 11)]
    streamed = SparsificationAccumulator()
    for truth, mean, std, mask in subjects:
        streamed.update(truth, mean, std, mask)
    stacked = [np.concatenate([s[i][s[3]] for s in subjects]) for i in range(3)]
    one_shot = SparsificationAccumulator().update(*stacked)
    np.testing.assert_array_equal(streamed.count_, one_shot.count_)
    assert streamed.result()["rmse"] == pytest.approx(one_shot.result()["rmse"], rel=1e-12)
    # ~2700 voxels: at the smallest recall only ~30 are kept, so allow 1 %.
    exact = sparsification_curve(*stacked)
    assert streamed.result()["rmse"] == pytest.approx(exact["rmse"], rel=1e-2)


def test_ause_trapezoid_any_order():
    assert ause([1.0, 0.5, 0.0], [2.0, 2.0, 2.0], [2.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert ause([0.0, 0.5, 1.0], [2.0, 2.0, 2.0], [0.0, 1.0, 2.0], normalize=True) == pytest.approx(0.5)


# ---------------------------------------------------------------- comparisons


def test_paired_ttest_matches_scipy_and_hand_computation():
    a = {"s1": 10.0, "s2": 12.0, "s3": 9.0, "s4": 15.0}
    b = {"s4": 13.5, "s2": 11.0, "s1": 9.5, "s3": 9.2}  # pairing is by id, not order
    result = paired_ttest(a, b)
    difference = np.array([0.5, 1.0, -0.2, 1.5])
    t = difference.mean() / (difference.std(ddof=1) / 2.0)
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
    reference = stats.ttest_rel([10, 12, 9, 15], [9.5, 11, 9.2, 13.5])
    assert (result["t"], result["p"]) == pytest.approx((reference.statistic, reference.pvalue))
    assert result["n"] == 4 and result["mean_difference"] == pytest.approx(0.7)
    assert paired_ttest(b, a)["t"] == pytest.approx(-t)


def test_paired_ttest_refuses_mismatched_or_too_few_subjects():
    with pytest.raises(ValueError, match="only in a: \\['s3'\\]"):
        paired_ttest({"s1": 1.0, "s2": 2.0, "s3": 3.0}, {"s1": 1.0, "s2": 2.5})
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest({"s1": 1.0}, {"s1": 2.0})


def test_triage_ranks_volumes_by_uncertainty():
    nrmse_values = {"a": 0.10, "b": 0.30, "c": 0.20, "d": 0.05}
    monotone = {key: np.exp(3 * value) for key, value in nrmse_values.items()}
    result = triage(monotone, nrmse_values)
    assert result["spearman"] == pytest.approx(1.0)
    assert [row["id"] for row in result["ranking"]] == ["b", "c", "a", "d"]
    assert [row["nrmse_rank"] for row in result["ranking"]] == [1, 2, 3, 4]
    reversed_ = triage({key: -value for key, value in nrmse_values.items()}, nrmse_values)
    assert reversed_["spearman"] == pytest.approx(-1.0)
    json.dumps(result)
    with pytest.raises(ValueError):
        triage({"a": 1.0}, {"a": 1.0})


# ---------------------------------------------------------------- per subject and cohort


def test_evaluate_subject_gives_the_individual_metrics_as_json():
    truth, mean, std, mask = subject(12)
    calibrator = ScaledGaussian(1.5)
    result = evaluate_subject(
        truth,
        mean,
        std,
        mask,
        axis=0,
        quantile_fns={"wide": calibrator.quantile},
        interval_fns={"wide": calibrator.interval, "intervals_only": ScaledGaussian(0.5).interval},
    )
    assert json.loads(json.dumps(result)) == result
    assert result["rmse"] == pytest.approx(rmse(truth, mean, mask))
    assert result["ssim"] == pytest.approx(ssim(truth, mean, mask, axis=0))
    assert result["nrmse"] == pytest.approx(nrmse(truth, mean, mask))
    assert result["slices"] == slice_level(truth, mean, std, mask, axis=0)
    assert result["gaussian"]["crps"] == pytest.approx(crps_gaussian(truth, mean, std, mask))
    assert result["gaussian"]["picp"].keys() == {"0.5", "0.9", "0.95"}
    assert result["calibrators"]["wide"]["crps"] == pytest.approx(
        crps_from_quantiles(truth, mean, std, mask, quantile_fn=calibrator.quantile)
    )
    assert result["calibrators"]["wide"]["calibration_rms"] == pytest.approx(
        calibration_rms(*calibration_curve(truth, mean, std, mask, quantile_fn=calibrator.quantile))
    )
    assert set(result["calibrators"]["intervals_only"]) == {"picp", "width"}
    assert result["calibrators"]["intervals_only"]["picp"]["0.9"] < result["gaussian"]["picp"]["0.9"]
    assert result["ause"] == pytest.approx(sparsification_curve(truth, mean, std, mask)["ause"])


def test_cohort_streaming_equals_pooled_voxels():
    subjects = {f"sub-{seed}": subject(seed, noise=0.01 * seed) for seed in (1, 2, 3, 4)}
    cohort = CohortEvaluator(axis=0, quantile_fns={"x2": ScaledGaussian(2.0).quantile})
    for subject_id, volumes in subjects.items():
        cohort.add(subject_id, *volumes)
    with pytest.raises(ValueError, match="added already"):
        cohort.add("sub-1", *subjects["sub-1"])
    result = cohort.result()
    assert json.loads(json.dumps(result)) == result
    pooled = [np.concatenate([v[i][v[3]] for v in subjects.values()]) for i in range(3)]
    curve = calibration_curve(*pooled)
    assert result["gaussian"]["calibration"]["observed"] == pytest.approx(list(curve[1]))
    assert result["gaussian"]["calibration"]["rms"] == pytest.approx(calibration_rms(*curve))
    assert result["gaussian"]["crps"] == pytest.approx(crps_gaussian(*pooled))
    assert result["calibrators"]["x2"]["crps"] == pytest.approx(
        crps_from_quantiles(*pooled, quantile_fn=ScaledGaussian(2.0).quantile)
    )
    assert result["sparsification"]["rmse"][0] == pytest.approx(rmse(pooled[0], pooled[1]), rel=1e-9)
    assert result["rmse_per_subject"] == {key: cohort.subjects_[key]["rmse"] for key in subjects}
    assert result["rmse_mean"] == pytest.approx(np.mean(list(result["rmse_per_subject"].values())))
    # Noise grows with the seed, so nSTD ranks the volumes like their nRMSE.
    assert result["triage"]["spearman"] == pytest.approx(1.0)
    assert result["levels"]["volume"]["spearman"] == pytest.approx(1.0)
    assert result["levels"]["slice"]["n"] == 16
    assert set(cohort.voxel_pairs_) == set(subjects)


def test_default_grid_is_the_papers_even_grid():
    np.testing.assert_allclose(DEFAULT_LEVELS, np.linspace(0.05, 0.95, 19))


def test_absolute_levels_tell_a_std_that_tracks_the_error_where_the_papers_relative_nrmse_does_not():
    """Brighter slices err more, and their std says so; their *relative* error is smaller all the same."""
    rng = np.random.default_rng(0)
    shape = (6, 12, 12)
    brightness = np.linspace(0.2, 1.0, shape[0])[:, None, None] * np.ones(shape)
    error_scale = 0.05 * np.sqrt(brightness)  # grows with the signal, slower than it
    truth = brightness
    mean = truth + error_scale * rng.standard_normal(shape)
    std = error_scale
    mask = np.ones(shape, dtype=bool)
    cohort = CohortEvaluator(axis=0)
    cohort.add("s", truth, mean, std, mask)
    levels = cohort.result()["levels"]
    assert levels["slice_absolute"]["spearman"] > 0.8  # RMSE rises with nSTD
    assert levels["slice"]["spearman"] < -0.8  # nRMSE = RMSE / ||truth|| falls as the std rises
