"""l2-normalisation and PCA-whitening of the C++ core against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac as cm


def reference_whitening(vectors, dim, shrinkage):
    x = vectors.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / max(len(x) - 1, 1)
    values, vectors_ = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:dim]
    values, basis = np.maximum(values[order], 0), vectors_[:, order].T
    scale = (values + shrinkage * values[0]) ** -0.5
    return mean, basis * scale[:, None]


def assert_same_up_to_row_sign(actual, expected, atol):
    for row_a, row_e in zip(actual, expected):
        sign = np.sign(row_a @ row_e) or 1.0
        np.testing.assert_allclose(row_a * sign, row_e, atol=atol)


def test_l2_normalize_rows_vector_and_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x[3] = 0.0
    out = cm.l2_normalize(x)
    expected = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(out[3], 0.0)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(cm.l2_normalize(x[0]), x[0] / np.linalg.norm(x[0]), atol=1e-6)
    np.testing.assert_array_equal(cm.l2_normalize(np.zeros(4, np.float32)), 0.0)
    tiny = np.full(3, 1e-30, dtype=np.float32)  # squares underflow in float32, not in double
    np.testing.assert_allclose(cm.l2_normalize(tiny), np.full(3, 3**-0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        cm.l2_normalize(x.astype(np.float64))
    with pytest.raises(ValueError, match="vectors"):
        cm.l2_normalize(np.zeros((2, 2, 2), np.float32))


@pytest.mark.parametrize("n,d,dim", [(200, 12, 12), (200, 12, 5), (9, 30, 6), (9, 30, 9)])
def test_fit_pca_whitening_matches_numpy(n, d, dim):
    rng = np.random.default_rng(n + d)
    mixing = rng.standard_normal((d, d)) * np.linspace(3, 0.1, d)
    vectors = (rng.standard_normal((n, d)) @ mixing + 5.0).astype(np.float32)
    mean, projection = cm.fit_pca_whitening(vectors, dim, shrinkage=1e-2)
    ref_mean, ref_projection = reference_whitening(vectors, dim, 1e-2)
    assert mean.dtype == projection.dtype == np.float32
    assert projection.shape == (dim, d)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    scale = np.abs(ref_projection).max()
    if n > d:  # full-rank covariance: eigenvectors are unique up to sign
        assert_same_up_to_row_sign(projection / scale, ref_projection / scale, atol=2e-4)
    else:  # rank-deficient: compare the eigenvalue scaling of the non-null directions only
        rank = min(dim, n - 1)
        assert_same_up_to_row_sign(projection[:rank] / scale, ref_projection[:rank] / scale, atol=2e-4)
    # The sign convention: each row's largest-magnitude entry is positive.
    rows = np.arange(dim)
    assert (projection[rows, np.abs(projection).argmax(axis=1)] > 0).all()


def test_whitened_training_vectors_have_regularised_identity_covariance():
    rng = np.random.default_rng(3)
    vectors = (rng.standard_normal((500, 6)) * [10, 5, 2, 1, 0.5, 0.1]).astype(np.float32)
    mean, projection = cm.fit_pca_whitening(vectors, shrinkage=0.0)
    whitened = cm.apply_whitening(vectors, mean, projection)
    np.testing.assert_allclose(np.cov(whitened.T), np.eye(6), atol=1e-3)
    # With shrinkage r the k-th variance is λ_k / (λ_k + r·λ_max) < 1, smallest for small λ.
    mean, projection = cm.fit_pca_whitening(vectors, shrinkage=0.1)
    variances = np.diag(np.cov(cm.apply_whitening(vectors, mean, projection).T))
    assert (np.diff(variances) < 0).all() and variances[0] < 1.0


def test_apply_whitening_matches_numpy():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((7, 4)).astype(np.float32)
    mean = rng.standard_normal(4).astype(np.float32)
    projection = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        cm.apply_whitening(vectors, mean, projection), (vectors - mean) @ projection.T, rtol=1e-5, atol=1e-6
    )


def test_whitening_errors():
    vectors = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"dim.*min\(N, D\) = 4"):
        cm.fit_pca_whitening(vectors, 5)
    with pytest.raises(ValueError, match="dim"):
        cm.fit_pca_whitening(vectors, 0)
    with pytest.raises(ValueError, match="shrinkage"):
        cm.fit_pca_whitening(vectors, 2, shrinkage=-1.0)
    with pytest.raises(ValueError, match="identical"):
        cm.fit_pca_whitening(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="shrinkage is 0"):
        cm.fit_pca_whitening(vectors[:3], 3, shrinkage=0.0)  # 3 centred vectors have rank 2
    bad = vectors.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        cm.fit_pca_whitening(bad)
    mean, projection = cm.fit_pca_whitening(vectors, 2)
    with pytest.raises(ValueError, match="mean"):
        cm.apply_whitening(vectors, mean[:3], projection)
    with pytest.raises(ValueError, match="projection"):
        cm.apply_whitening(vectors, mean, projection.T.copy())
    with pytest.raises(ValueError, match="None"):
        cm.apply_whitening(vectors, None, None)
