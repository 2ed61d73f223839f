"""ClusterMAC-box (ours, issue 16): R-MAC's grid plus the bounding boxes of 20 activation
clusters, max-pooled, on the uncapped backbone head.

Per image: NCut on the C-dim PCA of the local features into 20 clusters (the paper's clustering,
section 3.2, without the 5-cluster and RGB partitions); regions = R-MAC's square grid
(``rmac_levels``) + each cluster's bounding box; per region MAC → l2 → whiten → l2; sum → l2.
The same regions as ``Extractor(method="clustermac", cluster_pooling="box", n_clusters=(20,),
rgb_clusters=0, add_grid_regions=True)``, but the embedded backbone runs with ``head="relu"``
(:attr:`ClusterMACBox.backbone_head`). Chosen among the variants of ``benchmarks/quality.py``;
the README reports what it gains over R-MAC (about 1 mAP, not significant on every benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .base import DescriptorMethod, FloatMap
from .clustermac import ClusterMACInBox, cluster_labels, cluster_region_vectors, similarity_settings

__all__ = ["ClusterMACBox", "CLUSTERMAC_BOX_CLUSTERS"]

#: The one feature partition of ClusterMAC-box (no RGB partition): 20 clusters.
CLUSTERMAC_BOX_CLUSTERS = (20,)


class ClusterMACBox(DescriptorMethod):
    """R-MAC grid + the boxes of 20 clusters, max inside each (the extractor's ``rmac_levels``
    and clustering settings ``pca_dim``, ``z_ratio``, ``spatial_weight``, ``normalization``,
    ``clustering_pca``, ``seed``, ``similarity_precision``; its ``n_clusters``, ``rgb_clusters``,
    ``cluster_pooling`` and ``add_grid_regions`` are the paper's method's and do not apply)."""

    name = "clustermac-box"
    regional = True
    clustering = True
    backbone_head: ClassVar[str] = "relu"

    def settings(self) -> dict[str, Any]:
        ex = self.extractor
        return {
            "pca_dim": ex.pca_dim,
            "n_clusters": list(CLUSTERMAC_BOX_CLUSTERS),
            "rgb_clusters": 0,
            "z_ratio": ex.z_ratio,
            "spatial_weight": ex.spatial_weight,
            "normalization": ex.normalization,
            "clustering_pca": ex.clustering_pca,
            "seed": ex.seed,
            "cluster_pooling": "box",
            "rmac_levels": ex.rmac_levels,
            **similarity_settings(ex),
        }

    def cluster_labels(self, fmap: np.ndarray, rgb: np.ndarray | None = None) -> list[np.ndarray]:
        """The 20-cluster NCut partition of a feature map (one H×W label map in a list; no RGB
        partition, so ``rgb`` is not used)."""
        return cluster_labels(self.extractor, fmap, None, n_clusters=CLUSTERMAC_BOX_CLUSTERS, rgb_clusters=0)

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """Grid MACs, then each cluster's bounding-box MAC; ``labels`` (from :meth:`cluster_labels`)
        are used instead of clustering again when given."""
        partitions = self.cluster_labels(fmap) if labels is None else labels
        return cluster_region_vectors(FloatMap(fmap), partitions, "box", self.extractor.rmac_levels)

    def box_descriptor(self) -> ClusterMACInBox:
        """Inside an AML box: the box's grid and the boxes of the stored clusters' cells in it."""
        ex = self.extractor
        return ClusterMACInBox(ex.whitening_mean, ex.whitening_projection, True, ex.rmac_levels, "box")
