"""Global re-ranking with descriptors only: SuperGlobal's MDescAug + RerankwMDA.

Shao, Chen, Karpur, Cui, Araujo, Cao, "Global Features are All You Need for Image Retrieval and
Reranking", ICCV 2023, section 3.3 (defaults M = 400, K = 9, β = 0.15 from the paper):

1. *MDescAug*: each of the query's top ``top`` (M) database vectors x_m is replaced by
   x̃_m = (x_m + Σ_j β·s_mj·x_j) / (1 + Σ_j β·s_mj) over its ``k`` nearest vectors x_j among the
   same top M (s_mj = x_m·x_j; x_m itself, its nearest, has weight 1). The top M are re-scored
   by s1_m = q·x̃_m.
2. *RerankwMDA*: the element-wise maximum of the k + 1 best augmented vectors (by s1) is a second
   query; the top M are ordered by (s1_m + max·x̃_m) / 2. Items below the top M keep their order.

Dot products only, no local features. Neighbour weights β·s_mj are clipped at 0 (ours: a
negative similarity, possible after whitening, would otherwise subtract a vector and can drive
the normaliser to zero).
"""

from __future__ import annotations

import numpy as np

from .query_expansion import _matrix, _top_indices

__all__ = ["superglobal_rerank", "descriptor_augmentation"]


def _check_positive_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def descriptor_augmentation(vectors: np.ndarray, k: int = 9, beta: float = 0.15) -> np.ndarray:
    """MDescAug of a set of M vectors (M × D, l2-normalised): each becomes the weighted mean of
    itself (weight 1) and its ``k`` nearest others in the set (weights β·similarity, clipped at
    0). Returns float64 M × D (not re-normalised, as in SuperGlobal)."""
    x = np.asarray(vectors, dtype=np.float64)
    similarity = x @ x.T
    n_neighbours = min(k + 1, len(x))
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :n_neighbours]
    weights = np.take_along_axis(similarity, order, axis=1)
    weights[:, 0] = 1.0
    weights[:, 1:] = np.maximum(weights[:, 1:], 0.0) * beta
    return np.einsum("mk,mkd->md", weights, x[order]) / weights.sum(axis=1, keepdims=True)


def superglobal_rerank(
    query_vectors: np.ndarray,
    database: np.ndarray,
    ranks_or_indices: np.ndarray,
    top: int = 400,
    k: int = 9,
    beta: float = 0.15,
) -> np.ndarray:
    """Re-rank each query's top ``top`` results with MDescAug + RerankwMDA (see the module doc).

    Parameters
    ----------
    query_vectors:
        Q × D (or D) l2-normalised query descriptors.
    database:
        N × D l2-normalised database descriptors (array or np.memmap; only the top rows are read).
    ranks_or_indices:
        The initial ranking: Q × m ranked database indices (e.g. from :meth:`clustermac.Index.search`),
        or the m × Q layout of :func:`clustermac.compute_map` (recognised when m ≠ Q).
    top:
        M, how many of the top results are re-ranked (m may be smaller: then all m are).
    k:
        K, neighbours per vector in MDescAug and (K + 1) vectors in the max-aggregated query.
    beta:
        β, the weight of a neighbour per unit of similarity (>= 0).

    Returns
    -------
    int64 Q × m: the new ranking, rows = queries (the first min(top, m) reordered).
    """
    queries = _matrix(query_vectors, "query_vectors")
    base = _matrix(database, "database", queries.shape[1])
    top = _check_positive_int("top", top, 1)
    k = _check_positive_int("k", k, 0)
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta: expected a finite number >= 0, got {beta!r}")
    indices = np.asarray(ranks_or_indices)
    m = indices.shape[1] if indices.ndim == 2 and indices.shape[0] == queries.shape[0] else indices.shape[0]
    ranked = _top_indices(indices, queries.shape[0], base.shape[0], m if indices.ndim == 2 else 1)
    out = ranked.copy()
    n_top = min(top, ranked.shape[1])
    for q, query in enumerate(queries.astype(np.float64)):
        chosen = ranked[q, :n_top]
        augmented = descriptor_augmentation(np.asarray(base[chosen], dtype=np.float64), k, beta)
        first = augmented @ query
        best = np.argsort(-first, kind="stable")[: k + 1]
        second = augmented @ augmented[best].max(axis=0)
        out[q, :n_top] = chosen[np.argsort(-(first + second) / 2.0, kind="stable")]
    return out
