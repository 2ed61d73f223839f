"""clustermac: particular-object image retrieval with ClusterMAC and its baselines.

ClusterMAC (Chen, Wong, Kuang, Zhang, 2017) max-pools CNN activations over clusters found
by Normalized Cut instead of over R-MAC's fixed square grid.
"""
from __future__ import annotations

from . import _core

__version__ = "0.1.0"

# Each section re-exports one part of the package; names are part of the public API.

# --- clustering core ---
from ._core import (  # noqa: E402
    affinity,
    cluster_feature_map,
    cluster_feature_maps,
    ncut,
    ncut_embedding,
    pca_project,
)

# --- pooling, whitening, search ---
from ._core import (  # noqa: E402
    aggregate_regions,
    aml_localize,
    apply_whitening,
    crow_pool,
    fit_pca_whitening,
    gem_pool,
    grid_mac,
    l2_normalize,
    region_boxes,
    region_mac,
    rmac_regions,
    spoc_pool,
    topk_search,
)
from .index import Index  # noqa: E402
from .query_expansion import (  # noqa: E402
    alpha_query_expansion,
    average_query_expansion,
    database_side_augmentation,
)
from .rerank import (  # noqa: E402
    ClusterMACInBox,
    FeatureMapStore,
    FeatureMapStoreWriter,
    RerankResult,
    RMACInBox,
    aml_rerank,
    quantize_feature_map,
)

# --- backbones ---
from .backbone import Backbone, default_backbone  # noqa: E402
from .images import load_image  # noqa: E402

# --- descriptors ---
from .descriptors import METHODS, Extractor  # noqa: E402
from .descriptor_store import extract_folder, load_descriptors  # noqa: E402

# --- datasets and evaluation ---
from . import datasets, evaluate
from .evaluate import average_precision, compute_map, revisited_map

# --- photo benchmark ---
from . import photo_benchmark
