"""Query expansion (AQE, αQE) and database-side augmentation against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac as cm


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ranking(queries, database):
    return np.argsort(-(queries.astype(np.float64) @ database.astype(np.float64).T), axis=1, kind="stable")


def reference_aqe(queries, database, ranks, k):
    out = []
    for q, row in zip(queries.astype(np.float64), ranks):
        v = q + database[row[:k]].astype(np.float64).sum(axis=0)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def reference_alpha_qe(queries, database, ranks, k, alpha):
    out = []
    for q, row in zip(queries.astype(np.float64), ranks):
        v = q.copy()
        for i in row[:k]:
            x = database[i].astype(np.float64)
            v += max(q @ x, 0.0) ** alpha * x
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_average_query_expansion_matches_numpy_in_both_layouts():
    rng = np.random.default_rng(0)
    database, queries = unit(rng, 60, 8), unit(rng, 4, 8)
    ranks = ranking(queries, database)
    expected = reference_aqe(queries, database, ranks, 5)
    np.testing.assert_allclose(cm.average_query_expansion(queries, database, ranks, k=5), expected, atol=1e-6)
    # clustermac.evaluate's database × queries layout.
    np.testing.assert_allclose(cm.average_query_expansion(queries, database, ranks.T, k=5), expected, atol=1e-6)
    # Top indices from the Index give the same result.
    index = cm.Index(8)
    index.add(database, [str(i) for i in range(60)])
    _, top = index.search(queries, k=5)
    np.testing.assert_allclose(cm.average_query_expansion(queries, database, top), expected, atol=1e-6)
    out = cm.average_query_expansion(queries, database, ranks, k=0)
    np.testing.assert_allclose(out, queries, atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(cm.average_query_expansion(queries[0], database, ranks[0]), axis=1), 1, atol=1e-6
    )


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_alpha_query_expansion_matches_numpy(alpha):
    rng = np.random.default_rng(1)
    database, queries = unit(rng, 50, 6), unit(rng, 3, 6)
    ranks = ranking(queries, database)
    ranks[:, 3] = ranks[:, -1]  # a negatively similar vector in the top k gets weight 0
    out = cm.alpha_query_expansion(queries, database, ranks, alpha=alpha, k=6)
    np.testing.assert_allclose(out, reference_alpha_qe(queries, database, ranks, 6, alpha), atol=1e-6)
    aqe = cm.average_query_expansion(queries, database, ranks, k=6)
    if alpha == 0.0:  # weights max(s, 0)^0 = 1: average QE
        np.testing.assert_allclose(out, aqe, atol=1e-6)
    else:  # the negatively similar vector is weighted 0, unlike in average QE
        assert not np.allclose(out, aqe, atol=1e-3)


def test_database_side_augmentation_matches_numpy_and_memmap_out(tmp_path):
    rng = np.random.default_rng(2)
    database = unit(rng, 90, 7)
    k, alpha = 4, 3.0
    similarity = database.astype(np.float64) @ database.astype(np.float64).T
    expected = []
    for i in range(90):
        order = np.lexsort((np.arange(90), -similarity[i]))[:k]
        v = sum(max(similarity[i, j], 0.0) ** alpha * database[j].astype(np.float64) for j in order)
        expected.append(v / np.linalg.norm(v))
    expected = np.array(expected)
    np.testing.assert_allclose(
        cm.database_side_augmentation(database, k=k, alpha=alpha, batch_size=16), expected, atol=1e-5
    )
    out = np.lib.format.open_memmap(tmp_path / "dba.npy", mode="w+", dtype=np.float32, shape=database.shape)
    result = cm.database_side_augmentation(database, k=k, alpha=alpha, batch_size=32, out=out)
    assert result is out
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    # k = 1 keeps every vector (its own nearest neighbour).
    np.testing.assert_allclose(cm.database_side_augmentation(database, k=1), database, atol=1e-6)


def test_query_expansion_errors():
    rng = np.random.default_rng(3)
    database, queries = unit(rng, 20, 4), unit(rng, 2, 4)
    ranks = ranking(queries, database)
    with pytest.raises(ValueError, match="at least k = 5"):
        cm.average_query_expansion(queries, database, ranks[:, :3])
    with pytest.raises(ValueError, match="integer"):
        cm.average_query_expansion(queries, database, ranks.astype(float))
    with pytest.raises(ValueError, match=r"shape \(2, m\)"):
        cm.average_query_expansion(queries, database, np.zeros((3, 7), np.int64))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        cm.average_query_expansion(queries, database, ranks + 100)
    with pytest.raises(ValueError, match=r"database.*\(n, 4\)"):
        cm.average_query_expansion(queries, unit(rng, 20, 5), ranks)
    with pytest.raises(ValueError, match="alpha"):
        cm.alpha_query_expansion(queries, database, ranks, alpha=-1)
    with pytest.raises(ValueError, match="k"):
        cm.average_query_expansion(queries, database, ranks, k=-1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= N = 20"):
        cm.database_side_augmentation(database, k=21)
    with pytest.raises(ValueError, match="out"):
        cm.database_side_augmentation(database, out=np.zeros((3, 4), np.float32))
