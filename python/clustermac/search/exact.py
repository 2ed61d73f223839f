"""Exact top-k dot-product search: FAISS's flat kernel where it is installed, with clustermac's results.

``benchmarks/search.py`` measured FAISS's ``IndexFlatIP`` scan faster than clustermac's own
exact kernel (:func:`clustermac.topk_search`) on an AMD EPYC, 1,000 queries × 1M × 512 (ratio
0.82× at one thread, same run; see README, "Speed"), and the Xeon figures of issue 17 say the
same (0.75×). With two threads on the same (shared, loaded) machine FAISS's OpenMP scan was 3.0×
*slower* than ours (76.7 s against 25.5 s), while our thread pool kept its pace. So the rule,
fixed and measured, is: single-threaded searches (``n_threads == 1``) with ``faiss`` importable
run FAISS's brute-force scan
(``faiss.knn``, which reads the database in place: no copy, memory-mapped files work) to find
candidates, then restore clustermac's results *bit for bit*; multi-threaded searches run
clustermac's kernel. Both give the same bits, so the rule can be revised by measurement alone
(a later single-thread run on the same loaded machine timed this path at 1.04x ours, i.e. no
measurable gain there: ``faiss.knn`` on a memory-mapped file did not keep ``IndexFlatIP``'s edge):

1. FAISS returns the best ``pool = 2k + 16`` rows per query by its own scores.
2. Every row's score in FAISS and in clustermac differ from the exact dot product by at most
   ``γ_d · ‖q‖ · ‖x‖`` (γ_d = d·u / (1 − d·u), u = 2⁻²⁴, the classical bound for a float sum of
   d products, whatever the summation order). With ``M`` = the largest row norm, a query whose
   k-th and pool-th FAISS scores differ by more than ``4 γ_d ‖q‖ M`` has all of clustermac's
   top k (ties included) among its pool candidates.
3. Those candidates, in ascending row order, are re-scored by clustermac's own kernel, which
   gives each (query, row) pair the same float as a full scan and breaks ties by the smaller
   row index, as it always has. Queries whose gap is too small (near-duplicate scores around
   the k-th) are searched by clustermac's kernel over the whole database.

The choice does not change any result (tests/search/test_exact.py checks equality, ties
included), so it needs no setting in the index files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from .. import _core

__all__ = ["exact_topk", "faiss_available"]

_UNIT_ROUNDOFF = 2.0**-24
_NORM_ROWS = 65536  # rows per step of the norm pass (bounded extra memory on memory-mapped data)


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported (then :func:`exact_topk` scans with it)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _faiss_threads(faiss, n_threads: int) -> Iterator[None]:
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads if n_threads > 0 else os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _largest_row_norm(database: np.ndarray) -> float:
    largest = 0.0
    for first in range(0, database.shape[0], _NORM_ROWS):
        block = np.asarray(database[first : first + _NORM_ROWS], dtype=np.float64)
        largest = max(largest, float(np.sqrt(np.einsum("ij,ij->i", block, block).max())))
    return largest


def exact_topk(
    database: np.ndarray, queries: np.ndarray, k: int, n_threads: int = 1, use_faiss: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``database`` (N × d float32) by dot product with each of ``queries`` (Q × d).

    Returns (scores float32 Q×k, descending; indices int64 Q×k), ties broken by the smaller row
    index: exactly what ``clustermac._core.topk_search(database, queries, k, n_threads)``
    returns. ``use_faiss``: ``None`` = FAISS's scan when faiss is installed and ``n_threads == 1``
    (the module docstring says why), ``False`` = clustermac's kernel only, ``True`` = require
    faiss. Inputs are validated by the caller (:class:`clustermac.Index`): finite float32,
    C-contiguous, 1 <= k <= N.
    """
    if use_faiss is None:
        use_faiss = n_threads == 1 and faiss_available()
    n, dim = database.shape
    pool = min(n, 2 * k + 16)
    if not use_faiss or pool == n:  # nothing to prune: one scan of ours
        return _core.topk_search(database, queries, k, n_threads)
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    with _faiss_threads(faiss, n_threads):
        faiss_scores, candidates = faiss.knn(queries, np.ascontiguousarray(database), pool, faiss.METRIC_INNER_PRODUCT)
    gamma = dim * _UNIT_ROUNDOFF / (1.0 - dim * _UNIT_ROUNDOFF)
    error = 4.0 * gamma * np.linalg.norm(queries.astype(np.float64), axis=1) * _largest_row_norm(database)
    gap = faiss_scores[:, k - 1].astype(np.float64) - faiss_scores[:, pool - 1].astype(np.float64)
    certified = (gap > 1.01 * error + 1e-30) & (candidates >= 0).all(axis=1)

    scores = np.empty((queries.shape[0], k), np.float32)
    indices = np.empty((queries.shape[0], k), np.int64)
    for row in np.flatnonzero(certified):
        rows = np.sort(candidates[row])
        row_scores, positions = _core.topk_search(database[rows], queries[row : row + 1], k, 1)
        scores[row], indices[row] = row_scores[0], rows[positions[0]]
    uncertain = np.flatnonzero(~certified)
    if uncertain.size:
        scores[uncertain], indices[uncertain] = _core.topk_search(database, queries[uncertain], k, n_threads)
    return scores, indices
