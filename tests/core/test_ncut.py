"""ncut_embedding / ncut against numpy.linalg.eigh and scikit-learn's spectral clustering."""

import numpy as np
import pytest
from sklearn.cluster import spectral_clustering
from sklearn.cluster._spectral import discretize as sklearn_discretize
from sklearn.metrics import adjusted_rand_score

import clustermac
from clustermac import _core
from clustermac.bench.reference import ncut_objective


def mixture(n, dim, n_groups, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim)) * 4.0
    truth = rng.integers(0, n_groups, n)
    points = centres[truth] + rng.normal(size=(n, dim)) * spread
    return points.astype(np.float32), truth


def reference_embedding(s, k, normalization):
    s = s.astype(np.float64)
    if normalization == "shi":
        degree = s.sum(1) + 1.0
        p = (s + 0.5 * np.eye(len(s))) / np.sqrt(np.outer(degree, degree))
    else:
        s = s - np.diag(np.diag(s))
        degree = s.sum(1)
        p = s / np.sqrt(np.outer(degree, degree))
    values, vectors = np.linalg.eigh(p)
    return vectors[:, ::-1][:, :k] / np.sqrt(degree)[:, None], values[::-1]


def subspace_distance(a, b):
    qa, _ = np.linalg.qr(a.astype(np.float64))
    qb, _ = np.linalg.qr(b.astype(np.float64))
    return np.linalg.norm(qa - qb @ (qb.T @ qa), 2)


@pytest.mark.parametrize("normalization", ["shi", "sym"])
@pytest.mark.parametrize("n,dim,k", [(150, 4, 4), (450, 4, 5), (420, 7, 6)])
def test_embedding_spans_the_eigh_subspace(normalization, n, dim, k):
    features, _ = mixture(n, dim, k, spread=0.7, seed=n)
    s = clustermac.affinity(features)
    embedding = clustermac.ncut_embedding(s, k, normalization=normalization)
    reference, _ = reference_embedding(s, k, normalization)
    assert embedding.shape == (n, k) and embedding.dtype == np.float32
    assert subspace_distance(embedding, reference) < 0.02
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=0), 1.0, rtol=1e-5)
    for column in embedding.T:
        assert column[np.argmax(np.abs(column))] > 0


def test_embedding_columns_match_eigh_with_clear_gaps():
    # Groups of very different sizes give well-separated leading eigenvalues with Shi's offset
    # (without it, "sym", near-disconnected groups all have eigenvalues ~1: only the subspace
    # is defined, which test_embedding_spans_the_eigh_subspace checks).
    normalization = "shi"
    rng = np.random.default_rng(5)
    centres = np.array([[0, 0, 0, 0], [9, 0, 0, 0], [0, 9, 0, 0]], dtype=np.float64)
    truth = np.repeat([0, 1, 2], [250, 120, 40])
    features = (centres[truth] + rng.normal(size=(len(truth), 4))).astype(np.float32)
    s = clustermac.affinity(features)
    embedding = _core._ncut_solver_statistics(s, 3, normalization, tolerance=1e-5, max_cycles=50)["embedding"]
    reference, _ = reference_embedding(s, 3, normalization)
    for k in range(3):
        ref = reference[:, k] / np.linalg.norm(reference[:, k])
        assert abs(abs(ref @ embedding[:, k]) - 1.0) < 1e-4


@pytest.mark.parametrize("normalization", ["shi", "sym"])
def test_eigenvalues_match_eigh(normalization):
    features, _ = mixture(400, 4, 5, spread=1.0, seed=9)
    s = clustermac.affinity(features)
    stats = _core._ncut_solver_statistics(s, 8, normalization, tolerance=1e-5, max_cycles=60)
    _, values = reference_embedding(s, 8, normalization)
    np.testing.assert_allclose(stats["eigenvalues"], values[:8], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discretisation_matches_scikit_learn(seed):
    features, _ = mixture(400, 4, 6, spread=0.6, seed=seed)
    s = clustermac.affinity(features)
    embedding = clustermac.ncut_embedding(s, 6)
    ours = _core._discretize(embedding, seed=seed)
    theirs = sklearn_discretize(embedding.astype(np.float64).copy(), random_state=seed)
    assert adjusted_rand_score(ours, theirs) > 0.98
    assert ncut_objective(s, ours) <= 1.01 * ncut_objective(s, theirs)


@pytest.mark.parametrize("normalization", ["shi", "sym"])
@pytest.mark.parametrize("dim,k", [(4, 5), (7, 8)])
def test_objective_no_worse_than_scikit_learn(normalization, dim, k):
    ours, theirs = [], []
    for seed in range(4):
        features, _ = mixture(360, dim, k, spread=1.6, seed=100 + seed)  # overlapping groups
        s = clustermac.affinity(features)
        ours.append(ncut_objective(s, clustermac.ncut(s, k, seed=seed, normalization=normalization)))
        sk = spectral_clustering(s.astype(np.float64), n_clusters=k, assign_labels="discretize", random_state=seed)
        theirs.append(ncut_objective(s, sk))
    assert np.mean(ours) <= 1.05 * np.mean(theirs)


@pytest.mark.parametrize("normalization", ["shi", "sym"])
def test_planted_groups_recovered(normalization):
    features, truth = mixture(300, 4, 4, spread=0.3, seed=11)
    labels = clustermac.ncut(clustermac.affinity(features), 4, normalization=normalization)
    assert labels.dtype == np.int32 and labels.shape == (300,)
    assert adjusted_rand_score(truth, labels) > 0.99


def test_deterministic_under_seed_and_the_seed_is_used():
    features, _ = mixture(300, 4, 6, spread=1.5, seed=12)  # overlapping groups: the start matters
    s = clustermac.affinity(features)
    labels = clustermac.ncut(s, 6, seed=3)
    np.testing.assert_array_equal(clustermac.ncut(s, 6, seed=3), labels)
    # Other seeds start the discretisation elsewhere: some partition differs (not just a
    # relabelling), yet every one is a near-equal cut of the same embedding.
    others = [clustermac.ncut(s, 6, seed=seed) for seed in (0, 1, 2, 4, 5, 6, 7)]
    agreement = [adjusted_rand_score(labels, other) for other in others]
    assert min(agreement) < 0.999, agreement
    assert min(agreement) > 0.9, agreement


def test_labels_are_compact():
    # Three real groups asked for eight clusters: whatever is used is numbered 0..m-1.
    features, _ = mixture(240, 4, 3, spread=0.05, seed=13)
    labels = clustermac.ncut(clustermac.affinity(features), 8)
    used = np.unique(labels)
    np.testing.assert_array_equal(used, np.arange(len(used)))
    assert 3 <= len(used) <= 8


def test_one_cluster_and_k_equal_n():
    s = clustermac.affinity(np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    np.testing.assert_array_equal(clustermac.ncut(s, 1), np.zeros(5, np.int32))
    labels = clustermac.ncut(s, 5)
    np.testing.assert_array_equal(np.unique(labels), np.arange(len(np.unique(labels))))
    np.testing.assert_array_equal(clustermac.ncut(np.ones((1, 1), np.float32), 1), [0])


def test_all_equal_similarities_do_not_produce_nan():
    embedding = clustermac.ncut_embedding(np.ones((30, 30), np.float32), 3)
    assert np.all(np.isfinite(embedding))
    labels = clustermac.ncut(np.ones((30, 30), np.float32), 3)
    assert labels.min() >= 0 and labels.max() < 3


def _square(n=6):
    return clustermac.affinity(np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: clustermac.ncut(_square(), 0), "n_clusters"),
        (lambda: clustermac.ncut(_square(), 7), "n_clusters"),
        (lambda: clustermac.ncut(np.ones((3, 4), np.float32), 2), "square"),
        (lambda: clustermac.ncut(np.array([[1, 0.5], [0.1, 1]], np.float32), 2), "symmetric"),
        (lambda: clustermac.ncut(np.array([[1, -0.5], [-0.5, 1]], np.float32), 2), "non-negative"),
        (lambda: clustermac.ncut(np.array([[1, np.nan], [np.nan, 1]], np.float32), 2), "NaN"),
        (lambda: clustermac.ncut(_square().astype(np.float64), 2), "dtype float32"),
        (lambda: clustermac.ncut(np.zeros((0, 0), np.float32), 1), "non-empty"),
        (lambda: clustermac.ncut(_square(), 2, normalization="rw"), "normalization"),
        (lambda: clustermac.ncut(_square(), 2, seed=-1), "seed"),
        (lambda: clustermac.ncut_embedding(_square(), 0), "n_vectors"),
        (lambda: clustermac.ncut_embedding(_square(), 7), "n_vectors"),
        (lambda: clustermac.ncut_embedding(_square()[:, :3], 2), "C-contiguous"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("k", [5, 20])
def test_objective_on_continuous_data_no_worse_than_scikit_learn(k):
    """No planted groups: a heavy-tailed cloud whose NCut spectrum has no clear gap (like CNN
    features), where a loose eigensolve would show up as a worse objective."""
    ours, theirs = [], []
    for seed in range(3):
        rng = np.random.default_rng(200 + seed)
        features = (rng.standard_t(3, size=(700, 4)) * [3.0, 2.0, 1.0, 0.5]).astype(np.float32)
        s = clustermac.affinity(features)
        ours.append(ncut_objective(s, clustermac.ncut(s, k, seed=seed)))
        sk = spectral_clustering(s.astype(np.float64), n_clusters=k, assign_labels="discretize", random_state=seed)
        theirs.append(ncut_objective(s, sk))
    assert np.mean(ours) <= 1.05 * np.mean(theirs)


needs_bf16 = pytest.mark.bf16  # skipped by conftest.py where the CPU lacks AVX512-BF16


@needs_bf16
@pytest.mark.parametrize("normalization", ["shi", "sym"])
@pytest.mark.parametrize("n,dim,k", [(450, 4, 5), (2051, 4, 20)])
def test_bf16_embedding_spans_the_eigh_subspace(normalization, n, dim, k):
    # The affinity rounded to bf16 (8 significant bits) and the eigensolver's products by
    # VDPBF16PS: the same subspace as float64 eigh within the float test's bound. n = 2051 is odd
    # (the last bf16 pair ends in a padding column) and its 24-vector blocks use every tile shape.
    features, _ = mixture(n, dim, k, spread=0.7, seed=n)
    s = clustermac.affinity(features)
    embedding = clustermac.ncut_embedding(s, k, normalization=normalization, similarity_precision="bfloat16")
    reference, _ = reference_embedding(s, k, normalization)
    assert embedding.shape == (n, k) and embedding.dtype == np.float32
    assert subspace_distance(embedding, reference) < 0.02
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=0), 1.0, rtol=1e-5)


@needs_bf16
def test_bf16_partitions_recover_planted_groups_and_match_the_float_objective():
    ratios = []
    for seed in range(3):
        features, truth = mixture(600, 4, 6, spread=0.8, seed=seed)
        s = clustermac.affinity(features)
        labels = {}
        for precision in ("float32", "bfloat16"):
            embedding = clustermac.ncut_embedding(s, 6, similarity_precision=precision)
            labels[precision] = _core._discretize(embedding, seed=0)
        assert adjusted_rand_score(truth, labels["bfloat16"]) > 0.95
        ratios.append(ncut_objective(s, labels["bfloat16"]) / ncut_objective(s, labels["float32"]))
    assert np.mean(ratios) < 1.03


def test_bf16_is_refused_when_turned_off_and_bad_precision_names_are_refused():
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, clustermac\n"
        "try:\n"
        "    clustermac.ncut_embedding(np.eye(3, dtype=np.float32) + 0.5, 1, similarity_precision='bfloat16')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, CLUSTERMAC_NO_BF16="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert "AVX512-BF16" in out and "float32" in out
    with pytest.raises(ValueError, match="similarity_precision"):
        clustermac.ncut_embedding(np.eye(3, dtype=np.float32) + 0.5, 1, similarity_precision="half")


def test_ncut_objective_reference_on_a_hand_computed_graph():
    # Two pairs joined by a weak edge: cut = 0.1 for each side, assoc = 1 + 1 + 0.1 (self-loops included).
    s = np.array([[1, 1, 0.1, 0], [1, 1, 0, 0], [0.1, 0, 1, 1], [0, 0, 1, 1]])
    assert ncut_objective(s, np.array([0, 0, 1, 1])) == pytest.approx(2 * 0.1 / 4.1)
    assert ncut_objective(s, np.array([0, 1, 0, 1])) == pytest.approx(2.0 / 4.2 + 2.0 / 4.0)
