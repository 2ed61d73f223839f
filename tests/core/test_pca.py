"""pca_project against a plain NumPy SVD of the centred features."""

import numpy as np
import pytest

import clustermac


def reference_pca(features: np.ndarray, n_components: int):
    centred = features.astype(np.float64) - features.astype(np.float64).mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[:n_components].T
    variances = singular[:n_components] ** 2 / max(len(features) - 1, 1)
    return projection, variances


def anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Well-separated leading variances, then a flat tail (pca_project's fixed Krylov budget
    # resolves leading components separated by clear gaps, as in CNN features).
    scales = np.concatenate([[20.0, 12.0, 7.0, 4.0, 2.5], np.linspace(1.0, 0.3, max(d - 5, 0))])[:d]
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * scales) @ rotation + 3.0).astype(np.float32)


@pytest.mark.parametrize("n,d", [(600, 40), (90, 300), (500, 3), (150, 120)])
def test_matches_svd_up_to_sign(n, d):
    features = anisotropic(n, d, seed=n + d)
    c = min(4, d)
    projection, variances = clustermac.pca_project(features, c)
    ref_projection, ref_variances = reference_pca(features, c)
    assert projection.shape == (n, c) and projection.dtype == np.float32
    assert variances.shape == (c,) and variances.dtype == np.float32
    np.testing.assert_allclose(variances, ref_variances, rtol=1e-4)
    for k in range(c):
        sign = np.sign(ref_projection[:, k] @ projection[:, k])
        np.testing.assert_allclose(
            projection[:, k], sign * ref_projection[:, k], atol=2e-3 * np.abs(ref_projection[:, k]).max()
        )


def test_variances_descending_and_sign_convention():
    projection, variances = clustermac.pca_project(anisotropic(300, 50, seed=1), 5)
    assert np.all(np.diff(variances) <= 0)
    for k in range(5):
        column = projection[:, k]
        assert column[np.argmax(np.abs(column))] > 0


def test_deterministic_and_equal_to_the_reference_with_its_sign_convention():
    features = anisotropic(400, 64, seed=2)
    a = clustermac.pca_project(features, 4)
    b = clustermac.pca_project(features, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # Not only repeatable: the very values of an independent SVD, with the documented sign
    # (each column's largest-magnitude entry positive) fixed, so no sign is left free.
    reference, variances = reference_pca(features, 4)
    reference *= np.sign(reference[np.argmax(np.abs(reference), axis=0), np.arange(4)])
    np.testing.assert_allclose(a[1], variances, rtol=1e-4)
    np.testing.assert_allclose(a[0], reference, atol=2e-3 * np.abs(reference).max())
    # A different input gives a different projection (the call does not return a cached result).
    assert not np.allclose(clustermac.pca_project(anisotropic(400, 64, seed=3), 4)[0], a[0], atol=1e-2)


def test_constant_features_give_zero_projection():
    features = np.full((50, 10), 3.5, dtype=np.float32)
    projection, variances = clustermac.pca_project(features, 4)
    assert np.all(projection == 0) and np.all(variances == 0)


def test_one_location():
    projection, variances = clustermac.pca_project(np.arange(8, dtype=np.float32)[None, :], 4)
    assert projection.shape == (1, 4) and np.all(projection == 0) and np.all(variances == 0)


def test_components_beyond_rank_are_zero():
    features = anisotropic(3, 10, seed=3)  # centred rank <= 2
    projection, variances = clustermac.pca_project(features, 4)
    ref_projection, ref_variances = reference_pca(features, 2)
    np.testing.assert_allclose(variances[:2], ref_variances, rtol=1e-4)
    assert np.all(variances[2:] == 0) and np.all(projection[:, 2:] == 0)


@pytest.mark.parametrize(
    "features,n_components,match",
    [
        (np.zeros((10, 5)), 2, "dtype float32"),
        (np.zeros(10, dtype=np.float32), 2, "2-D"),
        (np.zeros((10, 5), dtype=np.float32)[:, ::2], 2, "C-contiguous"),
        (np.zeros((0, 5), dtype=np.float32), 2, "non-empty"),
        (np.zeros((10, 5), dtype=np.float32), 0, "n_components"),
        (np.zeros((10, 5), dtype=np.float32), 6, "n_components"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]], dtype=np.float32), 1, "NaN"),
        ([[1.0, 2.0]], 1, "NumPy array"),
    ],
)
def test_bad_input_raises_value_error(features, n_components, match):
    with pytest.raises(ValueError, match=match):
        clustermac.pca_project(features, n_components)
