"""Query expansion and database-side augmentation for descriptor retrieval.

* Average query expansion (AQE; Chum et al., ICCV 2007, as used with R-MAC by Tolias et al.,
  ICLR 2016 and by the paper, k = 5): the new query is the l2-normalised sum of the query and
  its top-k database vectors.
* α-weighted query expansion (αQE; Radenović, Tolias & Chum, TPAMI 2018): the top-k vectors
  are weighted by their similarity to the query raised to the power α.
* Database-side augmentation (DBA; Arandjelović & Zisserman, CVPR 2012; α-weighted as in
  Radenović et al.): every database vector is replaced by the weighted sum of its own
  top-k neighbours (itself included).

All inputs are float32 (or convertible) arrays; every returned vector is l2-normalised
(a zero sum stays zero).
"""

from __future__ import annotations

import numpy as np

from .. import _core

__all__ = ["average_query_expansion", "average_of_neighbours", "alpha_query_expansion", "database_side_augmentation"]


def _matrix(array: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    matrix = np.asarray(array)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or (dim is not None and matrix.shape[1] != dim):
        expected = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ValueError(f"{name}: expected an array of shape {expected}, got shape {np.shape(array)}")
    if not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point vectors, got dtype {matrix.dtype}")
    # A float32 C-contiguous memmap is used in place (rows are read on demand).
    if not (isinstance(matrix, np.memmap) and matrix.dtype == np.float32 and matrix.flags.c_contiguous):
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return matrix


def _top_indices(ranks_or_indices: np.ndarray, n_queries: int, n_database: int, k: int) -> np.ndarray:
    """Q × k database indices from a Q × m array (rows = queries) or an m × Q array (the
    database × queries ``ranks`` layout of clustermac.bench.evaluate), m >= k."""
    ranks = np.asarray(ranks_or_indices)
    if ranks.ndim == 1 and n_queries == 1:
        ranks = ranks[None, :]
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(
            f"ranks_or_indices: expected a 2-D integer array (Q × m ranked indices per query, or m × Q), "
            f"got dtype {ranks.dtype} and shape {ranks.shape}"
        )
    if ranks.shape[0] != n_queries:
        if ranks.shape[1] == n_queries:
            ranks = ranks.T
        else:
            raise ValueError(
                f"ranks_or_indices: expected shape ({n_queries}, m) or (m, {n_queries}) for "
                f"{n_queries} queries, got {ranks.shape}"
            )
    if ranks.shape[1] < k:
        raise ValueError(f"ranks_or_indices: expected at least k = {k} ranked indices per query, got {ranks.shape[1]}")
    top = ranks[:, :k].astype(np.int64)
    if top.size and (top.min() < 0 or top.max() >= n_database):
        raise ValueError(
            f"ranks_or_indices: expected indices in [0, {n_database}), got range [{top.min()}, {top.max()}]"
        )
    return top


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k: expected an integer >= 0, got {k!r}")
    return int(k)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")
    return alpha


def _expand(queries: np.ndarray, database: np.ndarray, top: np.ndarray, alpha: float | None) -> np.ndarray:
    expanded = queries.astype(np.float64)
    if top.size:
        rows = np.asarray(database[top.reshape(-1)], dtype=np.float64).reshape(top.shape + (queries.shape[1],))
        if alpha is None:
            weights = np.ones(top.shape)
        else:
            similarity = np.einsum("qd,qkd->qk", expanded, rows)
            weights = np.maximum(similarity, 0.0) ** alpha
        expanded = expanded + np.einsum("qk,qkd->qd", weights, rows)
    return _core.l2_normalize(np.ascontiguousarray(expanded, dtype=np.float32))


def average_query_expansion(
    query_vectors: np.ndarray,
    database: np.ndarray,
    ranks_or_indices: np.ndarray,
    k: int = 5,
) -> np.ndarray:
    """Average query expansion: q' = l2(q + sum of the query's top-k database vectors).

    Parameters
    ----------
    query_vectors:
        Q × D (or D) query descriptors, l2-normalised.
    database:
        N × D database descriptors (an array or np.memmap; only the rows used are read).
    ranks_or_indices:
        The initial ranking: Q × m ranked database indices per query (e.g. the indices
        returned by :meth:`clustermac.Index.search`), or the m × Q ``ranks`` layout of
        :func:`clustermac.compute_map` (recognised when m ≠ Q); m >= k.
    k:
        Number of top results averaged into the query (the paper: 5). ``k = 0`` returns the
        normalised queries unchanged.

    Returns
    -------
    float32 Q × D, l2-normalised expanded queries (search again with them).
    """
    queries = _matrix(query_vectors, "query_vectors")
    base = _matrix(database, "database", queries.shape[1])
    top = _top_indices(ranks_or_indices, queries.shape[0], base.shape[0], _check_k(k))
    return _expand(queries, base, top, None)


def average_of_neighbours(query_vector: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion with the top-k vectors already at hand (e.g. the localised
    descriptors of re-ranking): l2(q + Σ rows of ``neighbours``), float32 D.

    Summed in float32, as :func:`clustermac.aml_rerank` has always done; it can differ from
    :func:`average_query_expansion` (which sums in float64) in the last bit.
    """
    query = np.asarray(query_vector, dtype=np.float32)
    rows = np.asarray(neighbours, dtype=np.float32)
    return _core.l2_normalize(np.ascontiguousarray(query + rows.sum(axis=0)))


def alpha_query_expansion(
    query_vectors: np.ndarray,
    database: np.ndarray,
    ranks_or_indices: np.ndarray,
    alpha: float = 3.0,
    k: int = 5,
) -> np.ndarray:
    """α-weighted query expansion: q' = l2(q + Σ_{i<k} max(q·x_i, 0)^α · x_i).

    Same arguments as :func:`average_query_expansion`; ``alpha`` = 0 gives average QE.
    Negative similarities get weight 0. Returns float32 Q × D, l2-normalised.
    """
    queries = _matrix(query_vectors, "query_vectors")
    base = _matrix(database, "database", queries.shape[1])
    top = _top_indices(ranks_or_indices, queries.shape[0], base.shape[0], _check_k(k))
    return _expand(queries, base, top, _check_alpha(alpha))


def database_side_augmentation(
    database: np.ndarray,
    k: int = 5,
    alpha: float = 3.0,
    batch_size: int = 4096,
    out: np.ndarray | None = None,
    n_threads: int = 0,
) -> np.ndarray:
    """Database-side augmentation: x' = l2(Σ_{i<k} max(x·x_i, 0)^α · x_i) over the k nearest
    database vectors x_i of x (x itself, with similarity 1, is normally the first).

    ``alpha = 0`` is the plain average of Arandjelović & Zisserman. The neighbours are found
    with the exact top-k search, ``batch_size`` database rows at a time, so memory stays
    bounded; pass ``out`` (a float32 N × D array or writable np.memmap) to write the result in
    place of allocating it. Returns float32 N × D, l2-normalised.
    """
    base = _matrix(database, "database")
    k = _check_k(k)
    alpha = _check_alpha(alpha)
    n, dim = base.shape
    if k < 1 or k > n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    elif out.shape != (n, dim) or out.dtype != np.float32:
        raise ValueError(f"out: expected a float32 array of shape ({n}, {dim}), got {out.dtype} {out.shape}")
    for start in range(0, n, batch_size):
        batch = np.ascontiguousarray(base[start : start + batch_size], dtype=np.float32)
        scores, indices = _core.topk_search(base, batch, k, n_threads)
        neighbours = np.asarray(base[indices.reshape(-1)], dtype=np.float64).reshape(indices.shape + (dim,))
        weights = np.maximum(scores.astype(np.float64), 0.0) ** alpha
        combined = np.einsum("qk,qkd->qd", weights, neighbours)
        out[start : start + batch.shape[0]] = _core.l2_normalize(np.ascontiguousarray(combined, dtype=np.float32))
    return out
