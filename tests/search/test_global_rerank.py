"""SuperGlobal's MDescAug + RerankwMDA against a plain loop-by-loop NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from clustermac.search.global_rerank import descriptor_augmentation, superglobal_rerank


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(queries, database, indices, top, k, beta):
    """The paper's steps written out with Python loops, one vector at a time."""
    out = indices.copy()
    for q in range(len(queries)):
        chosen = list(indices[q, :top])
        x = database[chosen].astype(np.float64)
        augmented = []
        for m in range(len(chosen)):
            sims = [float(x[m] @ x[j]) for j in range(len(chosen))]
            order = sorted(range(len(chosen)), key=lambda j: (-sims[j], j))[: k + 1]
            total, weight_sum = np.zeros(x.shape[1]), 0.0
            for rank, j in enumerate(order):
                w = 1.0 if rank == 0 else beta * max(sims[j], 0.0)
                total += w * x[j]
                weight_sum += w
            augmented.append(total / weight_sum)
        augmented = np.array(augmented)
        first = [float(a @ queries[q].astype(np.float64)) for a in augmented]
        best = sorted(range(len(chosen)), key=lambda j: (-first[j], j))[: k + 1]
        pooled = np.max(augmented[best], axis=0)
        final = [(first[j] + float(augmented[j] @ pooled)) / 2 for j in range(len(chosen))]
        order = sorted(range(len(chosen)), key=lambda j: (-final[j], j))
        out[q, :top] = [chosen[j] for j in order]
    return out


@pytest.mark.parametrize("top,k,beta", [(12, 3, 0.15), (30, 9, 0.5), (5, 0, 0.15), (40, 2, 0.0)])
def test_matches_reference(top, k, beta):
    rng = np.random.default_rng(top + k)
    database = _unit(rng, 40, 16)
    queries = _unit(rng, 4, 16)
    indices = np.argsort(-(queries @ database.T), axis=1, kind="stable")
    got = superglobal_rerank(queries, database, indices, top=top, k=k, beta=beta)
    np.testing.assert_array_equal(got, _reference(queries, database, indices, top, k, beta))
    assert sorted(got[0]) == list(range(40))  # a permutation: nothing lost or duplicated
    np.testing.assert_array_equal(got[:, top:], indices[:, top:])  # below the top M: unchanged


def test_ranks_layout_and_short_lists():
    rng = np.random.default_rng(1)
    database, queries = _unit(rng, 25, 8), _unit(rng, 3, 8)
    indices = np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :10]
    rows = superglobal_rerank(queries, database, indices, top=400)  # top > m: all m re-ranked
    columns = superglobal_rerank(queries, database, np.ascontiguousarray(indices.T), top=400)
    np.testing.assert_array_equal(rows, columns)
    assert rows.shape == (3, 10)


def test_moves_a_neighbour_of_the_positives_up():
    # Two clear views of an object (p1, p2), a weak view w that resembles them more than it
    # resembles the query, and a distractor z slightly closer to the query than w. Augmenting w
    # with its neighbours p1, p2 lifts it above z.
    e = np.eye(5)
    database = np.array(
        [
            e[0] + 0.3 * e[1] + 0.5 * e[3],
            e[0] + 0.3 * e[1] + 0.5 * e[3] + 0.1 * e[4],
            0.4 * e[0] + e[3],
            0.45 * e[0] + e[2],
        ]
    )
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = (e[0] + 0.3 * e[1])[None, :] / np.linalg.norm(e[0] + 0.3 * e[1])
    before = np.argsort(-(query @ database.T), axis=1, kind="stable")
    assert list(before[0, 2:]) == [3, 2]
    after = superglobal_rerank(query, database, before, top=4, k=2, beta=1.0)
    assert list(after[0, 2:]) == [2, 3]


def test_descriptor_augmentation_self_weight():
    x = np.eye(3)
    # orthogonal vectors: neighbour weights are 0, every vector stays itself
    np.testing.assert_allclose(descriptor_augmentation(x, k=2, beta=0.15), x)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"top": 0}, "top"), ({"k": -1}, "k"), ({"beta": -0.1}, "beta"), ({"beta": float("nan")}, "beta")],
)
def test_bad_arguments(kwargs, message):
    rng = np.random.default_rng(2)
    database, queries = _unit(rng, 10, 4), _unit(rng, 2, 4)
    indices = np.argsort(-(queries @ database.T), axis=1)
    with pytest.raises(ValueError, match=message):
        superglobal_rerank(queries, database, indices, **kwargs)


def test_bad_indices():
    rng = np.random.default_rng(3)
    database, queries = _unit(rng, 10, 4), _unit(rng, 2, 4)
    with pytest.raises(ValueError, match="ranks_or_indices"):
        superglobal_rerank(queries, database, np.full((2, 5), 10))
    with pytest.raises(ValueError, match="database"):
        superglobal_rerank(queries, database[:, :3], np.zeros((2, 5), np.int64))
