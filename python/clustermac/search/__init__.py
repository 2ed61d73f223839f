"""Search: an index of descriptors, query expansion, and spatial re-ranking.

:mod:`~clustermac.search.index` (exact or FAISS top-k), :mod:`~clustermac.search.query_expansion`
(AQE, αQE, DBA), :mod:`~clustermac.search.feature_map_store` (the ``.cmfm`` file of 8-bit feature
maps) and :mod:`~clustermac.search.rerank` (AML re-ranking). The descriptors inside an AML box,
:class:`RMACInBox` and :class:`ClusterMACInBox`, belong to their methods in
:mod:`clustermac.descriptors` and are re-exported here.
"""

from __future__ import annotations

from ..descriptors.clustermac import ClusterMACInBox
from ..descriptors.rmac import RMACInBox
from .feature_map_store import FeatureMapStore, FeatureMapStoreWriter, quantize_feature_map
from .index import Index
from .query_expansion import (
    alpha_query_expansion,
    average_of_neighbours,
    average_query_expansion,
    database_side_augmentation,
)
from .rerank import RerankResult, aml_rerank

__all__ = [
    "Index",
    "average_query_expansion",
    "average_of_neighbours",
    "alpha_query_expansion",
    "database_side_augmentation",
    "quantize_feature_map",
    "FeatureMapStore",
    "FeatureMapStoreWriter",
    "RerankResult",
    "aml_rerank",
    "RMACInBox",
    "ClusterMACInBox",
]
