"""The shortcut baseline: a per-subject linear intensity map."""

import numpy as np
import pytest

from uqsynth.baselines import linear_map_prediction, masked_rmse


def test_linear_map_recovers_an_exact_linear_relation_inside_the_mask():
    rng = np.random.default_rng(0)
    source = rng.random((6, 7, 5))
    mask = source > 0.3
    target = np.where(mask, 0.4 * source + 0.1, 0.0)
    prediction = linear_map_prediction(source, target, mask)
    assert np.allclose(prediction, target)
    assert np.all(prediction[~mask] == 0)
    assert masked_rmse(prediction, target, mask) < 1e-9


def test_linear_map_cannot_follow_an_inverted_contrast():
    # CSF-like inversion: bright-then-dark target, which no line through the source fits.
    source = np.linspace(0, 1, 101)
    target = np.where(source < 0.5, 1.0 - source, source)
    mask = np.ones_like(source, dtype=bool)
    rmse = masked_rmse(linear_map_prediction(source, target, mask), target, mask)
    assert rmse > 0.05 * 255


def test_rmse_is_on_the_0_255_scale_and_needs_a_mask():
    target = np.zeros(4)
    assert masked_rmse(np.full(4, 0.5), target, np.ones(4, bool)) == pytest.approx(127.5)
    with pytest.raises(ValueError, match="at least two voxels"):
        linear_map_prediction(target, target, np.zeros(4, bool))
