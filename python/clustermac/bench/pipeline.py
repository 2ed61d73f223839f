"""The evaluation pipeline behind `clustermac evaluate`, `clustermac demo` and
`benchmarks/retrieval.py`: one pass of the backbone over a dataset, then every method on the
same feature maps.

Feature maps are kept in memory as float16 (and the resized RGB as uint8) so that comparing
six methods costs one backbone pass, not six.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..backbones import Backbone
from ..descriptors import REGIONAL_METHODS, Extractor
from ..descriptors.global_pooling import mac_vector
from ..descriptors.pipeline import per_image_in_order, progress_bar
from ..search import rerank
from ..search.feature_map_store import FeatureMapStore, FeatureMapStoreWriter
from ..search.query_expansion import average_query_expansion
from .datasets import RetrievalDataset
from .evaluate import compute_map, revisited_map

# list of (float16 D×H×W, uint8 H×W×3) or None for an unreadable image; with multi-scale
# extraction, a list of such pairs (one per scale) per image.
FeatureMaps = list


@dataclass
class MethodSpec:
    """A method to evaluate: a label, the Extractor method name and its keyword settings."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


DEFAULT_METHODS = (
    MethodSpec("MAC", "mac"),
    MethodSpec("SPoC", "spoc"),
    MethodSpec("GeM", "gem"),
    MethodSpec("CroW", "crow"),
    MethodSpec("R-MAC", "rmac"),
    MethodSpec("ClusterMAC", "clustermac"),
)


def compute_feature_maps(
    extractor: Extractor,
    images: Sequence[str],
    boxes: Sequence[Sequence[float] | None] | None = None,
    progress: bool = True,
    description: str = "features",
) -> FeatureMaps:
    """Backbone feature maps of many images, kept compactly (float16 maps, uint8 RGB); a list of
    them per image (one per scale) when ``extractor`` is multi-scale."""
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    bar = progress_bar(len(images), description, progress)

    def compact_maps(i: int, side_by_side: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        prepared = extractor.prepare_scales(images[i], boxes[i])
        # With the RGB image whatever the extractor's method: the maps serve every method.
        return [_compact(fmap, rgb) for fmap, rgb in extractor.feature_maps(prepared, side_by_side, with_rgb=True)]

    out: FeatureMaps = []
    for i, scaled in per_image_in_order(extractor, len(images), compact_maps):
        if isinstance(scaled, (ValueError, OSError)):
            if hasattr(bar, "write"):
                bar.write(f"skipped {images[i]}: {scaled}")
            out.append(None)
        elif isinstance(scaled, Exception):
            raise scaled
        else:
            out.append(scaled[0] if extractor.scales == (1.0,) else scaled)
        bar.update(1)
    bar.close()
    return out


def _compact(fmap: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # float16 halves the memory; activations beyond its range (rare) stay float32.
    compact = fmap.astype(np.float16) if float(fmap.max(initial=0.0)) < 6.0e4 else fmap
    return compact, np.clip(rgb, 0, 255).astype(np.uint8)


def descriptors_from_maps(
    extractor: Extractor,
    maps: FeatureMaps,
    progress: bool = False,
    description: str = "pool",
    labels_out: list | None = None,
) -> np.ndarray:
    """One descriptor per feature map (a zero row for an unreadable image). For ClusterMAC,
    ``labels_out`` (a list) receives each map's cluster labels (None for an unreadable image),
    so that re-ranking need not cluster the database again."""
    out = np.zeros((len(maps), extractor.dim), dtype=np.float32)
    bar = progress_bar(len(maps), description, progress)
    for i, item in enumerate(maps):
        labels = None
        if isinstance(item, list):  # multi-scale: no labels kept (AML re-ranking is single-scale)
            out[i] = extractor.descriptor_from_feature_maps(item)
        elif item is not None:
            if labels_out is not None and extractor.clusters:
                labels = extractor.cluster_labels(np.ascontiguousarray(item[0], dtype=np.float32), item[1])
            out[i] = extractor.descriptor_from_feature_map(item[0], item[1], labels)
        if labels_out is not None:
            labels_out.append(labels)
        bar.update(1)
    bar.close()
    return out


def full_ranks(database: np.ndarray, queries: np.ndarray, k: int | None = None) -> np.ndarray:
    """Database indices ranked by cosine similarity, one column per query (the layout of
    `compute_map`): n_database × n_queries, or the top k rows."""
    k = database.shape[0] if k is None else min(k, database.shape[0])
    _, indices = _core.topk_search(
        np.ascontiguousarray(database, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32), k
    )
    return np.ascontiguousarray(indices.T)


def score_ranks(dataset: RetrievalDataset, ranks: np.ndarray) -> dict[str, float]:
    """mAP in the dataset's protocol(s), in percent: classic always, Easy/Medium/Hard when the
    ground truth has the revisited split."""
    result = {"mAP": 100.0 * compute_map(ranks, dataset.classic_gnd())[0]}
    if dataset.has_revisited:
        rev = revisited_map(ranks, dataset.revisited_gnd())
        result.update({name.capitalize(): 100.0 * rev[name]["map"] for name in ("easy", "medium", "hard")})
    return result


def per_query_scores(dataset: RetrievalDataset, ranks: np.ndarray) -> dict[str, np.ndarray]:
    """AP of every query in percent (NaN for a query without positives): ``"mAP"`` in the classic
    protocol, and ``"Hard"`` when the ground truth has the revisited split; the per-query
    values behind :func:`score_ranks`, for paired comparisons of two methods."""
    scores = {"mAP": 100.0 * compute_map(ranks, dataset.classic_gnd())[1]}
    if dataset.has_revisited:
        scores["Hard"] = 100.0 * revisited_map(ranks, dataset.revisited_gnd())["hard"]["aps"]
    return scores


@dataclass
class DatasetFeatureMaps:
    """Backbone output for a whole evaluation: database, whitening set, queries per crop mode."""

    database: FeatureMaps
    whitening: FeatureMaps
    queries: dict[str, FeatureMaps]
    seconds: float


def dataset_feature_maps(
    dataset: RetrievalDataset,
    backbone: Backbone,
    whitening_images: Sequence[str],
    crops: Sequence[str] = ("image",),
    max_size: int | None = None,
    progress: bool = True,
    scales: Sequence[float] = (1.0,),
) -> DatasetFeatureMaps:
    """One backbone pass over the database, the whitening images and the queries (once per
    crop mode: crop I runs the network on the cropped query), at each of ``scales``."""
    started = time.perf_counter()
    base = Extractor(backbone, "mac", max_size=max_size, scales=scales)
    database = compute_feature_maps(
        base,
        [str(dataset.image_path(i)) for i in range(len(dataset.images))],
        progress=progress,
        description="database",
    )
    whitening = [
        m
        for m in compute_feature_maps(
            base, [str(p) for p in whitening_images], progress=progress, description="whitening set"
        )
        if m is not None
    ]
    if not whitening:
        raise ValueError("none of the whitening images could be read")
    queries = {}
    for crop in crops:
        ex = Extractor(backbone, "mac", crop=crop, max_size=max_size, scales=scales)
        paths = [str(dataset.query_path(i)) for i in range(len(dataset.queries))]
        queries[crop] = compute_feature_maps(
            ex, paths, dataset.query_boxes, progress=progress, description=f"queries (crop {crop})"
        )
    return DatasetFeatureMaps(database, whitening, queries, time.perf_counter() - started)


RELU6_CAP = 6.0  # the cap of the embedded backbone's last activation as trained


def relu6_feature_maps(maps: DatasetFeatureMaps) -> DatasetFeatureMaps:
    """The ReLU6 maps of the embedded backbone from its uncapped ones: ``min(map, 6)`` of every
    map (RGB unchanged).

    The embedded EfficientNet-Lite0 with ``head="relu"`` differs from the network as trained
    (``head="relu6"``) only in its last activation, so capping its maps at 6 gives the ReLU6 maps
    bit for bit (6 is exact in float16, and rounding to float16 is monotone): one backbone pass
    serves the methods of both heads (``clustermac demo`` compares ``rmac`` and ``clustermac`` on
    ReLU6 with ``clustermac-box`` on the uncapped head)."""

    def capped(item):
        if item is None:
            return None
        if isinstance(item, list):  # multi-scale: one pair per scale
            return [capped(pair) for pair in item]
        fmap, rgb = item
        return np.minimum(fmap, fmap.dtype.type(RELU6_CAP)), rgb

    return DatasetFeatureMaps(
        [capped(m) for m in maps.database],
        [capped(m) for m in maps.whitening],
        {crop: [capped(m) for m in query_maps] for crop, query_maps in maps.queries.items()},
        maps.seconds,
    )


def fitted_extractor(
    backbone: Backbone, spec: MethodSpec, maps: DatasetFeatureMaps, max_size: int | None = None
) -> Extractor:
    """An Extractor for ``spec`` with its whitening (and dataset PCA, if asked) learned on the
    whitening set's feature maps."""
    extractor = Extractor(backbone, spec.method, max_size=max_size, **spec.params)
    scaled = [item if isinstance(item, list) else [item] for item in maps.whitening]
    if extractor.clustering_pca == "dataset":
        extractor.fit_clustering_pca(pair for item in scaled[:100] for pair in item)
    return extractor.fit_whitening_from_scaled_maps(scaled)


def evaluate_methods(
    dataset: RetrievalDataset,
    backbone: Backbone,
    maps: DatasetFeatureMaps,
    methods: Sequence[MethodSpec] = DEFAULT_METHODS,
    query_expansion: bool = True,
    qe_k: int = 5,
    rerank: bool = False,
    rerank_top: int = 1000,
    rerank_clusters: str = "stored",
    max_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every method on ``dataset`` from feature maps computed once.

    Returns ``{"rows": [...], "ranks": {row_label: ranks}, "timings": {...}}``; each row holds
    method, crop, qe, rerank and the scores of :func:`score_ranks`. With ``rerank``, R-MAC and
    ClusterMAC are also AML re-ranked (top ``rerank_top``) then QE'd; ``rerank_clusters`` says
    how ClusterMAC is described inside a box (see :func:`_rerank_then_qe`).
    """
    if rerank and any(isinstance(item, list) for item in maps.database):
        raise ValueError("rerank: AML re-ranking works on single-scale feature maps, not with multi-scale scales")
    timings: dict[str, float] = {"backbone_s": maps.seconds}
    rows: list[dict[str, Any]] = []
    all_ranks: dict[str, np.ndarray] = {}
    for spec in methods:
        started = time.perf_counter()
        extractor = fitted_extractor(backbone, spec, maps, max_size)
        database_labels: list | None = [] if rerank and rerank_clusters == "stored" else None
        database = descriptors_from_maps(extractor, maps.database, progress, f"{spec.label}: database", database_labels)
        for crop, query_maps in maps.queries.items():
            queries = descriptors_from_maps(extractor, query_maps)
            ranks = full_ranks(database, queries)
            variants = [("", ranks)]
            if query_expansion:
                variants.append(
                    (" + QE", full_ranks(database, average_query_expansion(queries, database, ranks.T, k=qe_k)))
                )
            if rerank and spec.method in REGIONAL_METHODS:
                aspects = [None if b is None else (b[2] - b[0]) / max(b[3] - b[1], 1e-6) for b in dataset.query_boxes]
                reranked = _rerank_then_qe(
                    extractor,
                    maps,
                    queries,
                    query_maps,
                    aspects,
                    ranks,
                    rerank_top,
                    qe_k,
                    rerank_clusters,
                    database_labels,
                )
                variants.append((" + R + QE", reranked))
            for suffix, r in variants:
                label = f"{spec.label}, crop {'I' if crop == 'image' else 'X'}{suffix}"
                rows.append(
                    {
                        "label": label,
                        "method": spec.label,
                        "crop": crop,
                        "qe": "QE" in suffix,
                        "rerank": "R" in suffix.replace("QE", ""),
                        **score_ranks(dataset, r),
                    }
                )
                all_ranks[label] = r
        timings[f"{spec.label}_s"] = time.perf_counter() - started
    return {"rows": rows, "ranks": all_ranks, "timings": timings}


def _rerank_then_qe(
    extractor,
    maps: DatasetFeatureMaps,
    queries: np.ndarray,
    query_maps: FeatureMaps,
    query_boxes_aspect: Sequence[float | None],
    ranks: np.ndarray,
    top: int,
    qe_k: int,
    rerank_clusters: str = "stored",
    database_labels: Sequence | None = None,
) -> np.ndarray:
    """AML re-ranking of the top ``top`` items, then average QE over the top ``qe_k``
    localised descriptors (Tolias et al. 2016, section 5). Returns new ranks.

    The descriptor inside a box is computed on the stored 8-bit codes for R-MAC and, with
    ``rerank_clusters="stored"``, for ClusterMAC from the database images' own clusters
    (:class:`clustermac.ClusterMACInBox`); ``"box"`` re-clusters the activations inside every
    box instead (no RGB clusters; a full NCut per candidate). ``database_labels`` (from
    :func:`descriptors_from_maps`) saves clustering the database again."""
    import tempfile

    if rerank_clusters not in ("stored", "box"):
        raise ValueError(f"rerank_clusters: expected 'stored' or 'box', got {rerank_clusters!r}")
    reclustering = extractor.clusters and rerank_clusters == "box"
    if reclustering or extractor.method not in REGIONAL_METHODS:

        def descriptor_fn(crop: np.ndarray) -> np.ndarray:
            # No RGB image is at hand for a database crop: the RGB clustering is skipped here.
            return extractor.descriptor_from_feature_map(crop, None)
    else:
        descriptor_fn = extractor.box_descriptor()
    store_labels = extractor.clusters and not reclustering

    out = ranks.copy()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "database.cmfm"
        with FeatureMapStoreWriter(store_path) as writer:
            for i, item in enumerate(maps.database):
                fmap = item[0] if item is not None else np.zeros((extractor.backbone.dim, 1, 1), np.float16)
                fmap = np.ascontiguousarray(fmap, dtype=np.float32)
                rgb = item[1] if item is not None else None
                labels = ()
                if store_labels:
                    known = database_labels[i] if database_labels is not None else None
                    labels = known if known is not None else extractor.cluster_labels(fmap, rgb)
                writer.add(fmap, str(i), labels=labels)
        store = FeatureMapStore(store_path)
        for q, item in enumerate(query_maps):
            if item is None:
                continue
            fmap = np.ascontiguousarray(item[0], dtype=np.float32)
            query_mac = mac_vector(fmap)
            result = rerank.aml_rerank(
                query_mac,
                queries[q],
                ranks[:, q],
                store,
                descriptor_fn,
                top_n=top,
                query_aspect=query_boxes_aspect[q],
                qe_k=qe_k,
            )
            out[:, q] = result.indices
        del store
    return out
