"""clustermac: particular-object image retrieval with ClusterMAC and its baselines.

ClusterMAC (Chen, Wong, Kuang, Zhang, 2017) max-pools CNN activations over clusters found
by Normalized Cut instead of over R-MAC's fixed square grid.

The library: :mod:`clustermac.backbones` (image → feature map), :mod:`clustermac.descriptors`
(feature map → descriptor, one class per method), :mod:`clustermac.search` (index, query
expansion, re-ranking). The evaluation and demo tooling lives in :mod:`clustermac.bench`, which
``import clustermac`` does not load.
"""

from __future__ import annotations

from typing import Any

from . import _compat

__version__ = "0.1.0"

_compat.install()

# The public API: the C++ core's functions, then the library's classes (see __all__).
from ._core import (  # noqa: E402
    affinity,
    aggregate_region_groups,
    aggregate_regions,
    aml_localize,
    apply_whitening,
    cluster_feature_map,
    cluster_feature_maps,
    crow_pool,
    fit_pca_whitening,
    gem_pool,
    grid_mac,
    l2_normalize,
    ncut,
    ncut_embedding,
    pca_project,
    region_boxes,
    region_mac,
    rmac_regions,
    spoc_pool,
    topk_search,
)
from .backbones import Backbone, default_backbone  # noqa: E402
from .descriptors import METHODS, Extractor, extract_folder, load_descriptors  # noqa: E402
from .distributed import ShardedArray, extract_folder_ray  # noqa: E402
from .errors import CorruptFileError, MixedKernelsWarning, OutputLockedError  # noqa: E402
from .images import load_image  # noqa: E402
from .kernels import kernel_record  # noqa: E402
from .search import (  # noqa: E402
    ClusterMACInBox,
    FeatureMapStore,
    FeatureMapStoreWriter,
    Index,
    RerankResult,
    RMACInBox,
    alpha_query_expansion,
    aml_rerank,
    average_query_expansion,
    database_side_augmentation,
    quantize_feature_map,
)

__all__ = [
    "affinity",
    "cluster_feature_map",
    "cluster_feature_maps",
    "ncut",
    "ncut_embedding",
    "pca_project",
    "aggregate_regions",
    "aggregate_region_groups",
    "aml_localize",
    "apply_whitening",
    "crow_pool",
    "fit_pca_whitening",
    "gem_pool",
    "grid_mac",
    "l2_normalize",
    "region_boxes",
    "region_mac",
    "rmac_regions",
    "spoc_pool",
    "topk_search",
    "Index",
    "average_query_expansion",
    "alpha_query_expansion",
    "database_side_augmentation",
    "FeatureMapStore",
    "FeatureMapStoreWriter",
    "quantize_feature_map",
    "RerankResult",
    "aml_rerank",
    "RMACInBox",
    "ClusterMACInBox",
    "Backbone",
    "default_backbone",
    "load_image",
    "METHODS",
    "Extractor",
    "extract_folder",
    "load_descriptors",
    "extract_folder_ray",
    "ShardedArray",
    "CorruptFileError",
    "OutputLockedError",
    "MixedKernelsWarning",
    "kernel_record",
    "average_precision",
    "compute_map",
    "revisited_map",
]

# --- evaluation (clustermac.bench), loaded on first use ---
_BENCH_FUNCTIONS = {
    "average_precision": "clustermac.bench.evaluate",
    "compute_map": "clustermac.bench.evaluate",
    "revisited_map": "clustermac.bench.evaluate",
}


def __getattr__(name: str) -> Any:
    # The evaluation functions, and the old module paths (clustermac.rerank, …; they warn).
    if name in _BENCH_FUNCTIONS:
        import importlib

        value = getattr(importlib.import_module(_BENCH_FUNCTIONS[name]), name)
        globals()[name] = value
        return value
    return _compat.old_module(name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BENCH_FUNCTIONS) | {m.split(".")[1] for m in _compat.MOVED})
