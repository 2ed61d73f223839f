"""Exact search through FAISS's scan gives clustermac's own results bit for bit (ties included)."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac as cm
from clustermac import Index
from clustermac.search.exact import exact_topk

faiss = pytest.importorskip("faiss")


def unit_rows(rng, n, d):
    return cm.l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("n,q,d,k", [(5000, 17, 64, 10), (3000, 5, 512, 100), (800, 40, 7, 1), (70, 3, 8, 30)])
@pytest.mark.parametrize("threads", [1, 2])
def test_faiss_path_equals_our_kernel_on_real_valued_vectors(n, q, d, k, threads):
    rng = np.random.default_rng(n + d + k)
    database, queries = unit_rows(rng, n, d), unit_rows(rng, q, d)
    ours = cm.topk_search(database, queries, k, threads)
    through_faiss = exact_topk(database, queries, k, threads, use_faiss=True)
    assert through_faiss[0].dtype == np.float32 and through_faiss[1].dtype == np.int64
    np.testing.assert_array_equal(through_faiss[1], ours[1])
    np.testing.assert_array_equal(through_faiss[0], ours[0])  # the same floats, not just close ones


def test_ties_go_to_the_smaller_index_and_uncertain_queries_fall_back():
    # Duplicated rows: many exactly equal scores at and around the k-th, so FAISS's pool
    # cannot be certified for some queries and candidates tie inside the pool for others.
    rng = np.random.default_rng(3)
    base = unit_rows(rng, 400, 32)
    database = np.ascontiguousarray(np.concatenate([base] * 5)[rng.permutation(2000)])
    queries = np.concatenate([base[:6], unit_rows(rng, 6, 32)])
    for k in (1, 5, 7, 40):
        ours = cm.topk_search(database, queries, k, 1)
        through_faiss = exact_topk(database, queries, k, 1, use_faiss=True)
        np.testing.assert_array_equal(through_faiss[1], ours[1])
        np.testing.assert_array_equal(through_faiss[0], ours[0])
    # Integer vectors: exact float scores, huge tie groups (every query is uncertain here).
    integers = rng.integers(-1, 2, size=(3000, 6)).astype(np.float32)
    small_queries = rng.integers(-1, 2, size=(9, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        exact_topk(integers, small_queries, 25, 2, use_faiss=True)[1], cm.topk_search(integers, small_queries, 25, 2)[1]
    )


def test_constant_database_and_a_memory_mapped_one(tmp_path):
    database = np.full((500, 16), 0.25, np.float32)
    queries = np.ones((2, 16), np.float32)
    scores, indices = exact_topk(database, queries, 10, 1, use_faiss=True)
    np.testing.assert_array_equal(indices, np.tile(np.arange(10), (2, 1)))
    rng = np.random.default_rng(5)
    np.save(tmp_path / "db.npy", unit_rows(rng, 4000, 48))
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    queries = unit_rows(rng, 3, 48)
    ours = cm.topk_search(mapped, queries, 20, 1)
    through_faiss = exact_topk(mapped, queries, 20, 1, use_faiss=True)
    np.testing.assert_array_equal(through_faiss[0], ours[0])
    np.testing.assert_array_equal(through_faiss[1], ours[1])


@pytest.mark.parametrize("threads", [1, 2])  # 1: through FAISS's scan, 2: our kernel (the fixed rule)
def test_index_exact_backend_results_do_not_depend_on_faiss(threads):
    rng = np.random.default_rng(11)
    vectors = unit_rows(rng, 3000, 24)
    index = Index(24, n_threads=threads)
    index.add(vectors, [f"image{i}" for i in range(len(vectors))])
    queries = unit_rows(rng, 4, 24)
    scores, indices = index.search(queries, k=15)
    ours = cm.topk_search(vectors, queries, 15, 1)
    np.testing.assert_array_equal(indices, ours[1])
    np.testing.assert_array_equal(scores, ours[0])
