"""affinity (paper Eq. 2-3) against a plain NumPy evaluation of the formulas."""

import numpy as np
import pytest

import clustermac


def reference_affinity(features, z_ratio=0.05, weights=None):
    f = features.astype(np.float64)
    if weights is None:
        variance = f.var(axis=0)
        weights = variance / variance.sum()
    d = np.sqrt((((f[:, None, :] - f[None, :, :]) ** 2) * np.asarray(weights, np.float64)).sum(-1))
    z = z_ratio * d.max()
    return np.exp(-d / z) ** 2


@pytest.mark.parametrize("c", [4, 7])
def test_matches_formula(c):
    rng = np.random.default_rng(c)
    features = (rng.normal(size=(250, c)) * np.linspace(3, 0.5, c)).astype(np.float32)
    s = clustermac.affinity(features)
    assert s.shape == (250, 250) and s.dtype == np.float32
    np.testing.assert_allclose(s, reference_affinity(features), atol=2e-6, rtol=1e-4)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_allclose(np.diag(s), 1.0)


def test_large_matrix_written_with_streaming_stores():
    # N = 2052: the 16.8 MB result takes the non-temporal store path, and N % 8 = 4 leaves a tail.
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(7)
    features = (rng.normal(size=(2052, 4)) * [3.0, 2.0, 1.0, 0.5]).astype(np.float32)
    s = clustermac.affinity(features)
    f = features.astype(np.float64)
    variance = f.var(axis=0)
    d = cdist(f, f, metric="minkowski", p=2, w=variance / variance.sum())
    np.testing.assert_allclose(s, np.exp(-d / (0.05 * d.max())) ** 2, atol=2e-6, rtol=1e-4)
    np.testing.assert_array_equal(s, s.T)


def test_given_weights_and_z_ratio():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 3)).astype(np.float32)
    weights = np.array([0.2, 0.0, 3.0], dtype=np.float32)
    s = clustermac.affinity(features, z_ratio=0.2, weights=weights)
    np.testing.assert_allclose(s, reference_affinity(features, 0.2, weights), atol=2e-6, rtol=1e-4)


def test_all_equal_features_give_all_ones():
    s = clustermac.affinity(np.full((7, 4), 2.0, dtype=np.float32))
    np.testing.assert_array_equal(s, np.ones((7, 7), dtype=np.float32))


def test_one_location():
    np.testing.assert_array_equal(clustermac.affinity(np.ones((1, 4), np.float32)), [[1.0]])


def test_constant_column_is_ignored_by_variance_weights():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(60, 3)).astype(np.float32)
    features[:, 1] = 5.0
    np.testing.assert_allclose(
        clustermac.affinity(features), clustermac.affinity(np.ascontiguousarray(features[:, [0, 2]])), atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=np.zeros((5, 2))), "dtype float32"),
        (dict(features=np.zeros((0, 2), np.float32)), "non-empty"),
        (dict(features=np.array([[np.inf, 0]], np.float32)), "NaN or Inf"),
        (dict(features=np.zeros((5, 2), np.float32), z_ratio=0.0), "z_ratio"),
        (dict(features=np.zeros((5, 2), np.float32), z_ratio=float("nan")), "z_ratio"),
        (dict(features=np.zeros((5, 2), np.float32), weights=np.ones(3, np.float32)), "weights"),
        (dict(features=np.zeros((5, 2), np.float32), weights=np.array([1, -1], np.float32)), "weights"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        clustermac.affinity(**kwargs)
