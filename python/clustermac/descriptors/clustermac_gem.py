"""ClusterMAC-GeM (ours, issue 16): R-MAC's grid plus the bounding boxes of 20 activation
clusters, with GeM instead of the max inside every region, on the uncapped backbone head.

Per image: NCut on the C-dim PCA of the local features into 20 clusters (the paper's clustering,
no RGB clusters); regions = R-MAC's square grid (``rmac_levels``) + each cluster's bounding box;
per region GeM with exponent ``gem_p`` (:func:`clustermac.descriptors.regional_gem.box_gem`)
→ l2 → whiten → l2; sum → l2. The embedded backbone runs with ``head="relu"`` for it
(:attr:`ClusterMACGeM.backbone_head`). What each part adds is measured by ``benchmarks/quality.py``
and reported in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .. import _core
from .base import DescriptorMethod, cluster_boxes
from .clustermac import cluster_labels
from .regional_gem import box_gem

__all__ = ["ClusterMACGeM", "CLUSTERMAC_GEM_CLUSTERS"]

#: The one feature partition of ClusterMAC-GeM (no RGB partition): 20 clusters.
CLUSTERMAC_GEM_CLUSTERS = (20,)


class ClusterMACGeM(DescriptorMethod):
    """R-MAC grid + 20 cluster boxes, GeM inside each (the extractor's ``gem_p``, ``rmac_levels``
    and clustering settings ``pca_dim``, ``z_ratio``, ``normalization``, ``seed``)."""

    name = "clustermac-gem"
    regional = True
    backbone_head: ClassVar[str] = "relu"

    def settings(self) -> dict[str, Any]:
        ex = self.extractor
        return {
            "pca_dim": ex.pca_dim,
            "n_clusters": list(CLUSTERMAC_GEM_CLUSTERS),
            "rgb_clusters": 0,
            "z_ratio": ex.z_ratio,
            "spatial_weight": ex.spatial_weight,
            "normalization": ex.normalization,
            "clustering_pca": ex.clustering_pca,
            "seed": ex.seed,
            "rmac_levels": ex.rmac_levels,
            "gem_p": ex.gem_p,
        }

    def cluster_labels(self, fmap: np.ndarray) -> list[np.ndarray]:
        """The 20-cluster NCut partition of a feature map (one H×W label map in a list)."""
        return cluster_labels(self.extractor, fmap, None, n_clusters=CLUSTERMAC_GEM_CLUSTERS, rgb_clusters=0)

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        ex = self.extractor
        partitions = self.cluster_labels(fmap) if labels is None else labels
        boxes = [np.asarray(_core.rmac_regions(fmap.shape[1], fmap.shape[2], ex.rmac_levels))]
        boxes += [cluster_boxes(np.ascontiguousarray(p, dtype=np.int32)) for p in partitions]
        return box_gem(fmap, np.concatenate(boxes).astype(np.int64), ex.gem_p)
