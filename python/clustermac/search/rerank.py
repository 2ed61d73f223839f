"""Spatial re-ranking by approximate max-pooling localisation (AML), then query expansion.

Tolias, Sicre & Jégou (ICLR 2016, Sec. 4–5) re-rank the top N (1000) images of the initial
ranking: in each one, AML finds the box whose approximate MAC vector best matches the
query's MAC vector (:func:`clustermac.aml_localize`: sums of x^p, p = 10, over the boxes of a
3-cell grid with aspect ratio within ×1.1 of the query's, 5 refinement rounds);
the image is re-scored by the similarity of the query descriptor to the descriptor (R-MAC or
ClusterMAC) computed inside that box; finally average query expansion with the top 5
localised descriptors re-scores the same N images.

The database feature maps come from a :class:`~clustermac.search.feature_map_store.FeatureMapStore`.
The descriptor inside a box is the caller's ``descriptor_fn``
(:meth:`clustermac.Extractor.box_descriptor` gives the right one for each method:
:class:`clustermac.RMACInBox` and :class:`clustermac.ClusterMACInBox` work on the 8-bit codes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import _core
from .feature_map_store import FeatureMapStore
from .query_expansion import average_of_neighbours

__all__ = ["RerankResult", "aml_rerank"]

#: Candidates localised and described together (one whitening product per group): fixed, so that
#: results do not depend on the number of threads.
BATCH = 25


@dataclass
class RerankResult:
    """Outcome of :func:`aml_rerank`.

    indices: the candidates re-ordered (the re-ranked top N first, then the rest unchanged).
    scores: float32 scores of the re-ranked top N (after QE if enabled), aligned with
        ``indices[:len(scores)]``.
    boxes: int32 top_n × 4 AML boxes [x0, y0, x1, y1) in feature-map cells, aligned with
        ``indices[:len(boxes)]``.
    expanded_query: the query after QE (or the query descriptor itself when qe_k = 0).
    """

    indices: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    expanded_query: np.ndarray


def aml_rerank(
    query_mac: np.ndarray,
    query_descriptor: np.ndarray,
    candidates: Sequence[int],
    store: FeatureMapStore,
    descriptor_fn: Callable[[np.ndarray], np.ndarray],
    *,
    top_n: int = 1000,
    query_aspect: float | None = None,
    p: float = 10.0,
    step: int = 3,
    aspect_tolerance: float = 1.1,
    refine_iterations: int = 5,
    qe_k: int = 5,
    n_threads: int = 0,
) -> RerankResult:
    """Re-rank the top ``top_n`` candidates by AML localisation, then query expansion.

    Parameters
    ----------
    query_mac:
        float32 D: the query's MAC vector (max-pooling of its feature map over the query box),
        used to localise; D is the feature maps' channel count.
    query_descriptor:
        float32 D': the query's l2-normalised global descriptor (R-MAC, ClusterMAC, …), the
        same kind ``descriptor_fn`` returns.
    candidates:
        Database indices (into ``store``) in their initial ranked order, best first; e.g. a
        row of the indices from :meth:`clustermac.Index.search`.
    store:
        The database feature maps (:class:`FeatureMapStore`).
    descriptor_fn:
        ``descriptor_fn(crop) -> vector``: computes the l2-normalised descriptor (length D')
        of a float32 D×h×w feature-map crop, the dequantised activations inside the AML box.
        If it has a method ``from_store(store, index, box) -> vector`` (as :class:`RMACInBox`
        and :class:`ClusterMACInBox` do), that is called instead, and no dequantised crop is
        made; for :class:`RMACInBox` it returns what ``descriptor_fn(crop)`` would. If it has the
        methods ``regional_vectors_from_store(store, index, box) -> R×D`` and
        ``aggregate_many(list of R×D) -> N×D'`` (as :class:`RMACInBox` does), each candidate's
        regional vectors are taken right after its localisation (its map still in the cache) and
        the descriptors of fixed groups of ``BATCH`` consecutive candidates are aggregated together
        (one whitening product per group), so that results do not depend on ``n_threads``.
    top_n:
        How many of the leading candidates to localise and re-score (Tolias: 1000).
    query_aspect:
        Width / height of the query box; boxes whose aspect ratio differs by more than a
        factor ``aspect_tolerance`` are not considered. None: no constraint.
    p, step, aspect_tolerance, refine_iterations:
        AML parameters, see :func:`clustermac.aml_localize` (Tolias' values are the defaults).
    qe_k:
        Average query expansion: the query descriptor plus the localised descriptors of the
        top ``qe_k`` re-ranked images, l2-normalised, re-scores the top N (0: no QE).
    n_threads:
        Threads over the candidates (``<= 0``: every core; 1: none). Results do not depend on it;
        ``descriptor_fn`` is then called from several threads at once.

    Returns
    -------
    :class:`RerankResult`.

    Raises ``ValueError`` naming the candidate when ``descriptor_fn`` returns NaN or Inf (never
    NaN scores).
    """
    query_mac = np.ascontiguousarray(query_mac, dtype=np.float32)
    query_descriptor = np.ascontiguousarray(query_descriptor, dtype=np.float32)
    if query_descriptor.ndim != 1 or not np.isfinite(query_descriptor).all():
        raise ValueError(f"query_descriptor: expected a finite 1-D vector, got shape {query_descriptor.shape}")
    order = np.asarray(candidates, dtype=np.int64).reshape(-1)
    if order.size and (order.min() < 0 or order.max() >= len(store)):
        raise ValueError(f"candidates: expected indices in [0, {len(store)}), got range [{order.min()}, {order.max()}]")
    if not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ValueError(f"top_n: expected a positive integer, got {top_n!r}")
    if not isinstance(qe_k, (int, np.integer)) or qe_k < 0:
        raise ValueError(f"qe_k: expected an integer >= 0, got {qe_k!r}")
    head = order[:top_n]
    regional_vectors_from_store = getattr(descriptor_fn, "regional_vectors_from_store", None)
    aggregate_many = getattr(descriptor_fn, "aggregate_many", None)
    grouped = callable(regional_vectors_from_store) and callable(aggregate_many)
    from_store = getattr(descriptor_fn, "from_store", None)
    if from_store is not None and not callable(from_store):
        from_store = None
    if from_store is None and not callable(descriptor_fn):
        raise ValueError(
            "descriptor_fn: expected a callable crop -> vector, or an object with a method "
            f"from_store(store, index, box) -> vector, got {type(descriptor_fn).__name__}"
        )
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads: expected an integer (<= 0: every core), got {n_threads!r}")
    workers = (os.cpu_count() or 1) if n_threads <= 0 else int(n_threads)

    def localise(index: int) -> np.ndarray:
        box, _ = _core.aml_localize_codes(
            store.codes(index),
            query_mac,
            p=p,
            step=step,
            aspect_tolerance=aspect_tolerance,
            refine_iterations=refine_iterations,
            query_aspect=query_aspect,
        )
        return box

    def describe(index: int, box: np.ndarray) -> np.ndarray:
        raw = from_store(store, index, box) if from_store is not None else descriptor_fn(store.feature_map(index, box))
        return np.asarray(raw, dtype=np.float32).reshape(-1)

    def localise_and_describe(group: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not grouped:
            return [(box, describe(index, box)) for index, box in ((i, localise(i)) for i in group)]
        group_boxes, vectors = [], []
        for index in group:
            group_boxes.append(localise(index))
            vectors.append(regional_vectors_from_store(store, index, group_boxes[-1]))
        described = np.asarray(aggregate_many(vectors), dtype=np.float32)
        if described.ndim != 2 or described.shape[0] != len(group):
            raise ValueError(
                f"descriptor_fn.aggregate_many: returned shape {described.shape}, expected one row per candidate "
                f"({len(group)} rows)"
            )
        return list(zip(group_boxes, described))

    # Fixed groups of consecutive candidates (the same whatever n_threads is); the C++ steps
    # release the GIL, so groups are processed on a thread pool.
    candidates_head = [int(index) for index in head]
    groups = [candidates_head[start : start + BATCH] for start in range(0, len(candidates_head), BATCH)]
    if workers > 1 and len(groups) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(groups))) as pool:
            outcomes = [outcome for done in pool.map(localise_and_describe, groups) for outcome in done]
    else:
        outcomes = [outcome for group in groups for outcome in localise_and_describe(group)]
    boxes = np.zeros((head.size, 4), dtype=np.int32)
    descriptors = np.zeros((head.size, query_descriptor.size), dtype=np.float32)
    for row, (box, descriptor) in enumerate(outcomes):
        if descriptor.shape != query_descriptor.shape:
            raise ValueError(
                f"descriptor_fn: returned a vector of shape {descriptor.shape}, expected "
                f"{query_descriptor.shape} like query_descriptor"
            )
        if not np.isfinite(descriptor).all():
            raise ValueError(
                f"descriptor_fn: returned NaN or Inf for candidate {candidates_head[row]} (position {row} of "
                "candidates); expected a finite vector (is the feature map or the whitening damaged?)"
            )
        boxes[row] = box
        descriptors[row] = descriptor
    scores = descriptors @ query_descriptor
    ranking = np.lexsort((np.arange(head.size), -scores))  # stable: ties keep the initial order
    expanded = query_descriptor
    if qe_k > 0 and head.size:
        expanded = average_of_neighbours(query_descriptor, descriptors[ranking[:qe_k]])
        scores = descriptors @ expanded
        ranking = np.lexsort((np.arange(head.size), -scores))
    reordered = np.concatenate([head[ranking], order[top_n:]])
    return RerankResult(
        indices=reordered, scores=scores[ranking].astype(np.float32), boxes=boxes[ranking], expanded_query=expanded
    )
