"""ClusterMAC (the paper, section 3): MAC over the clusters of a Normalized Cut, not over a grid.

Per image: NCut on the C-dim PCA of the local features into 5 and into 20 clusters, plus NCut on
the RGB image resized to H×W into 5 (30 regions); per region MAC → l2 → whiten → l2; sum → l2.
Two variants of ours, off by default: ``cluster_pooling="box"`` pools each cluster over its
bounding box, ``add_grid_regions`` adds R-MAC's square regions to the clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _core
from .base import CodedMap, DescriptorMethod, FloatMap, cluster_boxes
from .rmac import RMACInBox, rmac_vectors

if TYPE_CHECKING:  # the extractor imports the methods, not the other way round
    from .extractor import Extractor

__all__ = [
    "ClusterMAC",
    "ClusterMACInBox",
    "CLUSTER_POOLINGS",
    "cluster_labels",
    "cluster_region_vectors",
    "default_pca_dim",
    "similarity_settings",
]

#: How a cluster is max-pooled: over its own cells (the paper's Eq. 4) or over their bounding box.
CLUSTER_POOLINGS = ("mask", "box")


def default_pca_dim(feature_dim: int) -> int:
    """The paper's PCA dimension for the clustering step: C = 4 for VGG16's 512 channels and
    C = 7 for ResNet101's 2048 (section 4.1). Wider maps (EfficientNet-Lite0, 1280) get 7,
    as good as or better than 4 on them (see the design notes)."""
    return 4 if feature_dim <= 512 else 7


def similarity_settings(extractor: Extractor) -> dict[str, Any]:
    """``{"similarity_precision": "bfloat16"}`` when the clustering stores its similarity in
    bfloat16 (which changes the partitions), else nothing: float32, the default, is not
    recorded, so the settings of files written before the option existed are unchanged."""
    if extractor.similarity_precision == "float32":
        return {}
    return {"similarity_precision": extractor.similarity_precision}


def cluster_labels(
    extractor: Extractor,
    fmap: np.ndarray,
    rgb: np.ndarray | None,
    *,
    n_clusters: Sequence[int] | None = None,
    rgb_clusters: int | None = None,
    spatial_weight: float | None = None,
) -> list[np.ndarray]:
    """The NCut partitions of one feature map with the extractor's clustering settings: one H×W
    label map per feature clustering, then one for the RGB clustering (when ``rgb`` is given and
    the RGB cluster count is > 0). ``n_clusters``, ``rgb_clusters`` and ``spatial_weight``
    override the extractor's (the figures use them)."""
    if extractor.clustering_pca == "dataset" and extractor.pca_basis is None:
        raise RuntimeError(
            "clustering_pca='dataset' needs a PCA learned on a dataset: call fit_whitening() or load_whitening() first"
        )
    rgb_clusters = extractor.rgb_clusters if rgb_clusters is None else int(rgb_clusters)
    use_rgb = rgb is not None and rgb_clusters > 0
    dataset_pca = extractor.clustering_pca == "dataset"
    return _core.cluster_feature_map(
        fmap,
        rgb=np.ascontiguousarray(rgb, dtype=np.float32) if use_rgb else None,
        n_clusters=extractor.n_clusters if n_clusters is None else tuple(int(k) for k in n_clusters),
        rgb_clusters=rgb_clusters,
        pca_dim=extractor.pca_dim,
        z_ratio=extractor.z_ratio,
        spatial_weight=extractor.spatial_weight if spatial_weight is None else float(spatial_weight),
        seed=extractor.seed,
        normalization=extractor.normalization,
        similarity_precision=extractor.similarity_precision,
        pca_mean=extractor.pca_mean if dataset_pca else None,
        pca_basis=extractor.pca_basis if dataset_pca else None,
    )


def cluster_region_vectors(
    feature_map: FloatMap | CodedMap, partitions: Sequence[np.ndarray], pooling: str, grid_levels: int | None = None
) -> np.ndarray:
    """The un-normalised regional vectors (R×D) of ClusterMAC: R-MAC's grid first when
    ``grid_levels`` is given, then every cluster of every partition (label maps of the whole
    map), pooled over its cells (``"mask"``) or their bounding box (``"box"``). Inside a box of
    codes, clusters with no cell in the box drop out."""
    blocks = [rmac_vectors(feature_map, grid_levels)] if grid_levels is not None else []
    for labels in partitions:
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if pooling == "box":
            blocks.append(feature_map.grid_mac(cluster_boxes(feature_map.crop(labels))))
        else:
            blocks.append(feature_map.region_mac(labels))
    return np.concatenate(blocks, axis=0)


class ClusterMAC(DescriptorMethod):
    """ClusterMAC with the extractor's clustering settings."""

    name = "clustermac"
    regional = True
    clustering = True

    def settings(self) -> dict[str, Any]:
        ex = self.extractor
        s: dict[str, Any] = {
            "pca_dim": ex.pca_dim,
            "n_clusters": list(ex.n_clusters),
            "rgb_clusters": ex.rgb_clusters,
            "z_ratio": ex.z_ratio,
            "spatial_weight": ex.spatial_weight,
            "normalization": ex.normalization,
            "clustering_pca": ex.clustering_pca,
            "seed": ex.seed,
            "add_grid_regions": ex.add_grid_regions,
            "cluster_pooling": ex.cluster_pooling,
        }
        if ex.add_grid_regions:
            s["rmac_levels"] = ex.rmac_levels
        s.update(similarity_settings(ex))
        return s

    def uses_rgb(self) -> bool:
        return self.extractor.rgb_clusters > 0

    def cluster_labels(self, fmap: np.ndarray, rgb: np.ndarray | None = None) -> list[np.ndarray]:
        """The paper's partitions (section 3.2): one per feature clustering, then the RGB one."""
        return cluster_labels(self.extractor, fmap, rgb)

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        ex = self.extractor
        partitions = self.cluster_labels(fmap, rgb) if labels is None else labels
        return cluster_region_vectors(FloatMap(fmap), partitions, ex.cluster_pooling, self._grid_levels())

    def box_descriptor(self) -> ClusterMACInBox:
        ex = self.extractor
        return ClusterMACInBox(
            ex.whitening_mean, ex.whitening_projection, ex.add_grid_regions, ex.rmac_levels, ex.cluster_pooling
        )

    def _grid_levels(self) -> int | None:
        return self.extractor.rmac_levels if self.extractor.add_grid_regions else None


class ClusterMACInBox:
    """The ClusterMAC descriptor inside a box of a stored feature map, for :func:`clustermac.aml_rerank`.

    The clusters are those of the whole database image, stored with its codes
    (``FeatureMapStoreWriter.add(fmap, name, labels=extractor.cluster_labels(fmap, rgb))``):
    each cluster's MAC over its cells inside the box (:func:`clustermac._core.region_mac_codes`,
    on the 8-bit codes; with ``cluster_pooling="box"`` over the bounding box of those cells),
    optionally with R-MAC's grid of the box first (``add_grid_regions``), then
    l2 → PCA-whitening → l2, sum, l2 as in :meth:`clustermac.Extractor.descriptor_from_feature_map`.
    Clusters with no cell in the box drop out.

    This is our choice for re-ranking, not the paper's text (which does not say how the
    descriptor inside the box is formed): re-clustering the activations inside every box, the
    other reading, costs a full Normalized Cut per candidate and leaves out the RGB clusters,
    whose image is not stored.
    """

    def __init__(
        self,
        whitening_mean: np.ndarray | None = None,
        whitening_projection: np.ndarray | None = None,
        add_grid_regions: bool = False,
        levels: int = 3,
        cluster_pooling: str = "mask",
    ) -> None:
        if cluster_pooling not in CLUSTER_POOLINGS:
            raise ValueError(f"cluster_pooling: expected one of {CLUSTER_POOLINGS}, got {cluster_pooling!r}")
        self._grid = RMACInBox(whitening_mean, whitening_projection, levels)  # checks the whitening and levels
        self.add_grid_regions = bool(add_grid_regions)
        self.cluster_pooling = cluster_pooling

    def from_store(self, store: Any, index: int, box: Sequence[int] | None) -> np.ndarray:
        """The descriptor of the box [x0, y0, x1, y1) (cells; None: the whole map) of map ``index``
        of a :class:`clustermac.FeatureMapStore` written with cluster labels."""
        labels = store.labels(index)
        if not labels:
            raise ValueError(
                f"{store.path}: map {index} ({store.names[index]!r}) has no cluster labels; write them "
                "with FeatureMapStoreWriter.add(fmap, name, labels=extractor.cluster_labels(fmap, rgb))"
            )
        feature_map = CodedMap(store.codes(index), box, store.scale(index))
        grid_levels = self._grid.levels if self.add_grid_regions else None
        vectors = cluster_region_vectors(feature_map, labels, self.cluster_pooling, grid_levels)
        return _core.aggregate_regions(vectors, self._grid.whitening_mean, self._grid.whitening_projection)
