"""From an image to a global descriptor: ClusterMAC and the baselines it is measured against.

Every method starts from the backbone's feature map X (D×H×W) and ends with one l2-normalised
vector:

- ``mac``:    max over all locations (Eq. 4 with one region) → l2 → [whiten → l2].
- ``spoc``:   sum-pooling with a Gaussian centre prior → l2 → [whiten → l2].
- ``gem``:    generalised mean, p = 3 → l2 → [whiten → l2].
- ``crow``:   cross-dimensional spatial and channel weighting → l2 → [whiten → l2].
- ``rmac``:   Tolias' square grid; per region MAC → l2 → whiten → l2; sum → l2.
- ``clustermac`` (the paper, section 3): NCut on C-dim PCA features into 5 and 20 clusters
  plus NCut on the RGB image resized to H×W into 5; per region MAC → l2 → whiten → l2;
  sum → l2.

Whitening is PCA-whitening learned on a *separate* image set (:meth:`Extractor.fit_whitening`);
for the regional methods it is learned on regional vectors, for the global ones on global
vectors.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import _core
from .backbone import Backbone, default_backbone
from .files import atomic_write_bytes
from .images import crop_box, load_image, map_box, resize_max

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
Box = Sequence[float]

METHODS = ("mac", "spoc", "gem", "crow", "rmac", "clustermac")
REGIONAL_METHODS = ("rmac", "clustermac")
CROP_MODES = ("image", "activations")
CLUSTER_POOLINGS = ("mask", "box")
# Settings added after whitening files were first written, with the value older files imply.
SETTINGS_BEFORE_THEY_WERE_SAVED = {"cluster_pooling": "mask"}
WHITENING_FORMAT_VERSION = 1
# Dataset-learned clustering PCA: how many images and local features per image it sees.
PCA_IMAGES = 100
PCA_LOCATIONS_PER_IMAGE = 200


def default_pca_dim(feature_dim: int) -> int:
    """The paper's PCA dimension for the clustering step: C = 4 for VGG16's 512 channels and
    C = 7 for ResNet101's 2048 (section 4.1). Wider maps (EfficientNet-Lite0, 1280) get 7:
    on them C = 7 was as good as or better than C = 4 (DESIGN findings)."""
    return 4 if feature_dim <= 512 else 7


@dataclass
class PreparedImage:
    """An image after loading, resizing and (for crop I) cropping, ready for the backbone.

    ``activation_box`` is the query box in resized-image pixels when the query mode is crop X
    (the feature-map locations inside it are kept after extraction), else None.
    """

    image: Image.Image
    activation_box: Optional[tuple[float, float, float, float]]


def _activation_box(box: Box, stride: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Feature-map cells covered by a box given in resized-image pixels (at least one cell)."""
    x0 = int(np.floor(box[0] / stride))
    y0 = int(np.floor(box[1] / stride))
    x1 = int(np.ceil(box[2] / stride))
    y1 = int(np.ceil(box[3] / stride))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    return x0, y0, x1, y1


def rgb_at_feature_resolution(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The image resized to the feature map's H×W, as float32 H×W×3 (for the RGB NCut)."""
    small = image.convert("RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32)


class Extractor:
    """Turns images into global descriptors with one of :data:`METHODS`.

    Parameters
    ----------
    backbone:
        A :class:`~clustermac.Backbone`; ``None`` means the embedded EfficientNet-Lite0.
    method:
        ``"clustermac"`` (default), ``"rmac"``, ``"mac"``, ``"spoc"``, ``"gem"`` or ``"crow"``.
    crop:
        How a query box is applied: ``"image"`` (the paper's *crop I*: crop the image to the
        box, then extract) or ``"activations"`` (*crop X*: extract on the whole image, keep
        the feature-map locations inside the box).
    max_size:
        Longest image side fed to the network; images are never upsampled. Default: the
        backbone's (1024).
    pca_dim:
        C, the PCA dimension for the clustering step (default: :func:`default_pca_dim`).
    n_clusters, rgb_clusters:
        Cluster counts on the features (default (5, 20)) and on the RGB image (default 5).
    z_ratio:
        The affinity scale: z = z_ratio · max d (Eq. 3; paper: 0.05).
    spatial_weight:
        Weight of a spatial-distance term in the affinity (0 in the paper; Fig. 6 ablation).
    normalization:
        NCut graph normalisation passed to :func:`clustermac.cluster_feature_map`: ``"sym"``
        (default; no self-loops, as scikit-learn) or ``"shi"`` (Shi's released Ncut code, which
        the paper ran). See the C++ core's ncut.hpp for the measurements behind the default.
    clustering_pca:
        ``"image"`` (the paper: PCA per image) or ``"dataset"`` (learned by
        :meth:`fit_whitening` on the whitening images).
    rmac_levels:
        Number of scales of the R-MAC grid (Tolias et al.: 3).
    cluster_pooling:
        ClusterMAC only. ``"mask"`` (the paper's Eq. 4): each cluster's MAC over its own
        locations. ``"box"`` (our variant, not in the paper): over the bounding box of the cluster
        (:func:`clustermac.region_boxes`), so each region keeps the context around its cluster
        as R-MAC's rectangles do. See the README for what it measures.
    add_grid_regions:
        ClusterMAC only, not in the paper: add the R-MAC grid's square regions to the clusters
        before aggregation (off by default). On our real-photo benchmark (benchmarks/retrieval.py)
        it lifted ClusterMAC to R-MAC's mAP with a higher Hard score; see the README.
    gem_p:
        GeM exponent (3).
    whitening_dim:
        Output dimension of the whitening (default: the feature dimension, capped by the
        number of training vectors).
    whitening_shrinkage:
        Regularisation of the PCA-whitening: r·λmax is added to every eigenvalue before
        inverting. See :func:`clustermac.fit_pca_whitening`.
    seed:
        Seed of the NCut discretisation.
    """

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        method: str = "clustermac",
        crop: str = "image",
        *,
        max_size: Optional[int] = None,
        pca_dim: Optional[int] = None,
        n_clusters: Sequence[int] = (5, 20),
        rgb_clusters: int = 5,
        z_ratio: float = 0.05,
        spatial_weight: float = 0.0,
        normalization: str = "sym",
        clustering_pca: str = "image",
        rmac_levels: int = 3,
        add_grid_regions: bool = False,
        cluster_pooling: str = "mask",
        gem_p: float = 3.0,
        whitening_dim: Optional[int] = None,
        whitening_shrinkage: float = 1e-3,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop: expected one of {CROP_MODES}, got {crop!r}")
        if cluster_pooling not in CLUSTER_POOLINGS:
            raise ValueError(f"cluster_pooling: expected one of {CLUSTER_POOLINGS}, got {cluster_pooling!r}")
        if clustering_pca not in ("image", "dataset"):
            raise ValueError(f"clustering_pca: expected 'image' or 'dataset', got {clustering_pca!r}")
        n_clusters = tuple(int(k) for k in n_clusters)
        if any(k < 1 for k in n_clusters) or rgb_clusters < 0:
            raise ValueError(f"cluster counts must be >= 1, got n_clusters={n_clusters}, rgb_clusters={rgb_clusters}")
        if not z_ratio > 0:
            raise ValueError(f"z_ratio: expected a positive number, got {z_ratio}")
        self.backbone = backbone if backbone is not None else default_backbone()
        self.method = method
        self.crop = crop
        self.max_size = int(max_size) if max_size is not None else int(self.backbone.max_size)
        self.pca_dim = int(pca_dim) if pca_dim is not None else default_pca_dim(self.backbone.dim)
        self.n_clusters = n_clusters
        self.rgb_clusters = int(rgb_clusters)
        self.z_ratio = float(z_ratio)
        self.spatial_weight = float(spatial_weight)
        self.normalization = normalization
        self.clustering_pca = clustering_pca
        self.rmac_levels = int(rmac_levels)
        self.add_grid_regions = bool(add_grid_regions)
        self.cluster_pooling = cluster_pooling
        self.gem_p = float(gem_p)
        self.whitening_dim = whitening_dim
        self.whitening_shrinkage = float(whitening_shrinkage)
        self.seed = int(seed)
        # Learned state (fit_whitening / load_whitening).
        self.whitening_mean: Optional[np.ndarray] = None
        self.whitening_projection: Optional[np.ndarray] = None
        self.pca_mean: Optional[np.ndarray] = None
        self.pca_basis: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """Everything that determines the descriptor (saved with whitening and descriptors)."""
        s: dict[str, Any] = {
            "backbone": self.backbone.name,
            "feature_dim": int(self.backbone.dim),
            "method": self.method,
            "crop": self.crop,
            "max_size": self.max_size,
        }
        if self.method == "clustermac":
            s.update(
                pca_dim=self.pca_dim,
                n_clusters=list(self.n_clusters),
                rgb_clusters=self.rgb_clusters,
                z_ratio=self.z_ratio,
                spatial_weight=self.spatial_weight,
                normalization=self.normalization,
                clustering_pca=self.clustering_pca,
                seed=self.seed,
                add_grid_regions=self.add_grid_regions,
                cluster_pooling=self.cluster_pooling,
            )
            if self.add_grid_regions:
                s.update(rmac_levels=self.rmac_levels)
        elif self.method == "rmac":
            s.update(rmac_levels=self.rmac_levels)
        elif self.method == "gem":
            s.update(gem_p=self.gem_p)
        s.update(whitening_shrinkage=self.whitening_shrinkage, whitening_dim=self.whitening_dim)
        return s

    @property
    def is_whitened(self) -> bool:
        return self.whitening_projection is not None

    @property
    def dim(self) -> int:
        """Length of the descriptors this extractor produces."""
        if self.whitening_projection is not None:
            return int(self.whitening_projection.shape[0])
        return int(self.backbone.dim)

    # ------------------------------------------------------------------ stages
    def prepare(self, image: ImageInput, box: Optional[Box] = None) -> PreparedImage:
        """Load, resize to ``max_size`` and apply the query box according to ``crop``."""
        pil = load_image(image)
        resized, scale = resize_max(pil, self.max_size)
        if box is None:
            return PreparedImage(resized, None)
        mapped = map_box(box, scale, pil.size)
        if self.crop == "image":
            return PreparedImage(crop_box(resized, mapped), None)
        return PreparedImage(resized, tuple(float(v) for v in mapped))

    def feature_map(self, prepared: PreparedImage) -> tuple[np.ndarray, np.ndarray]:
        """Run the backbone; returns the D×H×W map (cropped for crop X) and the H×W×3 RGB."""
        fmap = self.backbone.features(prepared.image)
        _, height, width = fmap.shape
        rgb = rgb_at_feature_resolution(prepared.image, height, width)
        if prepared.activation_box is not None:
            x0, y0, x1, y1 = _activation_box(prepared.activation_box, int(self.backbone.stride), height, width)
            fmap = np.ascontiguousarray(fmap[:, y0:y1, x0:x1])
            rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        return fmap, rgb

    def cluster_labels(self, fmap: np.ndarray, rgb: Optional[np.ndarray]) -> list[np.ndarray]:
        """The paper's partitions of one feature map (section 3.2): one H×W label map per
        feature clustering, then one for the RGB clustering."""
        if self.clustering_pca == "dataset" and self.pca_basis is None:
            raise RuntimeError(
                "clustering_pca='dataset' needs a PCA learned on a dataset: call fit_whitening() "
                "or load_whitening() first"
            )
        use_rgb = rgb is not None and self.rgb_clusters > 0
        return _core.cluster_feature_map(
            fmap,
            rgb=np.ascontiguousarray(rgb, dtype=np.float32) if use_rgb else None,
            n_clusters=self.n_clusters,
            rgb_clusters=self.rgb_clusters,
            pca_dim=self.pca_dim,
            z_ratio=self.z_ratio,
            spatial_weight=self.spatial_weight,
            seed=self.seed,
            normalization=self.normalization,
            pca_mean=self.pca_mean if self.clustering_pca == "dataset" else None,
            pca_basis=self.pca_basis if self.clustering_pca == "dataset" else None,
        )

    def regional_vectors(self, fmap: np.ndarray, rgb: Optional[np.ndarray],
                         labels: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """Un-normalised regional MAC vectors (R-MAC grid, clusters, or both), K×D. ClusterMAC
        uses ``labels`` (from :meth:`cluster_labels`) when given instead of clustering again."""
        blocks = []
        if self.method == "rmac" or self.add_grid_regions:
            regions = _core.rmac_regions(fmap.shape[1], fmap.shape[2], self.rmac_levels)
            blocks.append(_core.grid_mac(fmap, regions))
        if self.method == "clustermac":
            partitions = self.cluster_labels(fmap, rgb) if labels is None else labels
            for lab in partitions:
                lab = np.ascontiguousarray(lab, dtype=np.int32)
                if self.cluster_pooling == "box":
                    blocks.append(_core.grid_mac(fmap, cluster_boxes(lab)))
                else:
                    blocks.append(_core.region_mac(fmap, lab))
        return np.concatenate(blocks, axis=0)

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        """The un-normalised global vector of a global method (MAC, SPoC, GeM, CroW)."""
        if self.method == "mac":
            return _core.region_mac(fmap, np.zeros(fmap.shape[1:], dtype=np.int32))[0]
        if self.method == "spoc":
            return _core.spoc_pool(fmap)
        if self.method == "gem":
            return _core.gem_pool(fmap, self.gem_p)
        return _core.crow_pool(fmap)

    def descriptor_from_feature_map(self, fmap: np.ndarray, rgb: Optional[np.ndarray] = None,
                                    labels: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """The descriptor of a feature map (D×H×W); ``rgb`` (H×W×3) is used by the RGB
        clustering of ClusterMAC only (None skips it); ClusterMAC's ``labels``, when given
        (:meth:`cluster_labels` of this map), are used instead of clustering again."""
        fmap = np.ascontiguousarray(fmap, dtype=np.float32)
        if self.method in REGIONAL_METHODS:
            vectors = self.regional_vectors(fmap, rgb, labels)
            return _core.aggregate_regions(vectors, self.whitening_mean, self.whitening_projection)
        vector = _core.l2_normalize(self.pooled_vector(fmap))
        if self.whitening_projection is None:
            return vector
        whitened = _core.apply_whitening(vector[None, :], self.whitening_mean, self.whitening_projection)
        return _core.l2_normalize(whitened[0])

    def box_descriptor(self) -> Any:
        """The ``descriptor_fn`` for :func:`clustermac.aml_rerank`: the descriptor inside an
        AML box, computed on a :class:`clustermac.FeatureMapStore`'s 8-bit codes for R-MAC
        (:class:`clustermac.RMACInBox`) and ClusterMAC (:class:`clustermac.ClusterMACInBox`,
        which needs the database's cluster labels in the store: :meth:`cluster_labels`), else
        on the dequantised crop."""
        from .rerank import ClusterMACInBox, RMACInBox

        if self.method == "rmac":
            return RMACInBox(self.whitening_mean, self.whitening_projection, self.rmac_levels)
        if self.method == "clustermac":
            return ClusterMACInBox(self.whitening_mean, self.whitening_projection, self.add_grid_regions, self.rmac_levels,
                                   self.cluster_pooling)
        return self.descriptor_from_feature_map

    # ------------------------------------------------------------------ public API
    def extract(self, image: ImageInput, box: Optional[Box] = None) -> np.ndarray:
        """The descriptor of one image (a path, PIL image or H×W×3 uint8 array).

        ``box`` = (x1, y1, x2, y2) in the original image's pixels makes it a query, applied
        according to ``crop``. Returns a 1-D float32 unit vector of length :attr:`dim`.
        """
        fmap, rgb = self.feature_map(self.prepare(image, box))
        return self.descriptor_from_feature_map(fmap, rgb)

    def extract_many(
        self,
        images: Sequence[ImageInput],
        boxes: Optional[Sequence[Optional[Box]]] = None,
        progress: bool = True,
        description: str = "extract",
    ) -> np.ndarray:
        """Descriptors of many images, N×dim float32. Decoding, the backbone and the
        clustering of successive images overlap on threads. Raises on the first bad image;
        use :meth:`iter_extract` to skip bad ones."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, result in self.iter_extract(images, boxes, progress=progress, description=description):
            if isinstance(result, Exception):
                raise result
            out[i] = result
        return out

    def iter_extract(
        self,
        images: Sequence[ImageInput],
        boxes: Optional[Sequence[Optional[Box]]] = None,
        progress: bool = True,
        description: str = "extract",
    ) -> Iterator[tuple[int, Union[np.ndarray, Exception]]]:
        """Yields ``(index, descriptor or exception)`` in input order.

        Three stages overlap: image decoding (one thread, a few images ahead), the backbone
        (ONNX Runtime's own threads) and the pooling/clustering of the previous image (C++,
        GIL released). An image that cannot be read yields its exception instead of a vector.
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"boxes: expected one box (or None) per image, got {len(boxes)} boxes for {len(images)} images")
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        bar = _progress(len(images), description, progress)

        def prepare(i: int) -> Union[PreparedImage, Exception]:
            try:
                return self.prepare(images[i], boxes[i])
            except Exception as error:  # reported to the caller, per image
                return _named_error(images[i], error)

        def pool(fmap: np.ndarray, rgb: np.ndarray) -> np.ndarray:
            return self.descriptor_from_feature_map(fmap, rgb)

        lookahead = 4
        with ThreadPoolExecutor(max_workers=1) as decoder, ThreadPoolExecutor(max_workers=1) as pooler:
            pending = {i: decoder.submit(prepare, i) for i in range(min(lookahead, len(images)))}
            pooled: Optional[tuple[int, Any]] = None
            for i in range(len(images)):
                prepared = pending.pop(i).result()
                if i + lookahead < len(images):
                    pending[i + lookahead] = decoder.submit(prepare, i + lookahead)
                current: tuple[int, Any]
                if isinstance(prepared, Exception):
                    current = (i, prepared)
                else:
                    try:
                        fmap, rgb = self.feature_map(prepared)
                        current = (i, pooler.submit(pool, fmap, rgb))
                    except Exception as error:
                        current = (i, _named_error(images[i], error))
                if pooled is not None:
                    yield _resolve(pooled)
                    bar.update(1)
                pooled = current
            if pooled is not None:
                yield _resolve(pooled)
                bar.update(1)
        bar.close()

    # ------------------------------------------------------------------ whitening
    def fit_whitening(self, images: Sequence[ImageInput], progress: bool = True) -> "Extractor":
        """Learn the PCA-whitening (and, with ``clustering_pca="dataset"``, the clustering PCA)
        from images that are NOT the ones to be searched (the paper learns it on Oxford5k to
        test on Paris6k and vice versa). Bad images are skipped with a warning."""
        if self.clustering_pca == "dataset":
            # The clustering PCA first, from the first images; the regional vectors depend on
            # it, so they come in a second pass.
            self.fit_clustering_pca(self._iter_feature_maps(images[:PCA_IMAGES], progress, "clustering PCA"))
        return self.fit_whitening_from_maps(self._iter_feature_maps(images, progress, "whitening"))

    def fit_clustering_pca(self, maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> "Extractor":
        """Learn the dataset PCA of the clustering step from (feature map, rgb) pairs."""
        rng = np.random.default_rng(self.seed)
        local_features = []
        for fmap, _ in maps:
            local = fmap.reshape(fmap.shape[0], -1).T
            take = rng.choice(local.shape[0], size=min(PCA_LOCATIONS_PER_IMAGE, local.shape[0]), replace=False)
            local_features.append(np.asarray(local[np.sort(take)], dtype=np.float32))
        if not local_features:
            raise ValueError("fit_clustering_pca: no feature maps (none of the images could be read)")
        self.pca_mean, self.pca_basis = _fit_pca(np.concatenate(local_features), self.pca_dim)
        return self

    def fit_whitening_from_maps(self, maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> "Extractor":
        """Learn the PCA-whitening from (feature map, rgb) pairs of a separate image set:
        on regional vectors for R-MAC/ClusterMAC, on global vectors for the others."""
        self.whitening_mean = self.whitening_projection = None
        vectors = [self.training_vectors(fmap, rgb) for fmap, rgb in maps]
        if not vectors:
            raise ValueError("fit_whitening: no feature maps (none of the images could be read)")
        stacked = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
        stacked = stacked[np.linalg.norm(stacked, axis=1) > 0]  # empty regions carry nothing
        dim = self.whitening_dim or min(stacked.shape[1], stacked.shape[0] - 1)
        if dim < 1:
            raise ValueError(f"fit_whitening: need at least 2 non-zero training vectors, got {stacked.shape[0]}")
        self.whitening_mean, self.whitening_projection = _core.fit_pca_whitening(stacked, dim, self.whitening_shrinkage)
        return self

    def training_vectors(self, fmap: np.ndarray, rgb: Optional[np.ndarray]) -> np.ndarray:
        """The l2-normalised vectors of one image that whitening is learned on."""
        fmap = np.ascontiguousarray(fmap, dtype=np.float32)
        if self.method in REGIONAL_METHODS:
            return _core.l2_normalize(self.regional_vectors(fmap, rgb))
        return _core.l2_normalize(self.pooled_vector(fmap))[None, :]

    def _iter_feature_maps(self, images: Sequence[ImageInput], progress: bool, description: str):
        """(feature map, rgb) of each readable image; unreadable ones are skipped with a warning."""
        bar = _progress(len(images), description, progress)
        for image in images:
            try:
                yield self.feature_map(self.prepare(image))
            except (ValueError, OSError) as error:
                warnings.warn(f"skipping {_name_of(image)}: {error}")
            finally:
                bar.update(1)
        bar.close()

    def save_whitening(self, path: Union[str, os.PathLike]) -> None:
        """Save the learned whitening with the settings it was learned for (atomic write)."""
        if self.whitening_projection is None:
            raise RuntimeError("save_whitening: nothing to save, call fit_whitening() first")
        arrays = {"mean": self.whitening_mean, "projection": self.whitening_projection}
        if self.pca_basis is not None:
            arrays.update(pca_mean=self.pca_mean, pca_basis=self.pca_basis)
        meta = {"format_version": WHITENING_FORMAT_VERSION, "settings": self._whitening_settings()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_whitening(self, path: Union[str, os.PathLike]) -> "Extractor":
        """Load a whitening saved by :meth:`save_whitening`. Refuses one learned with another
        backbone, method or setting that changes the regional vectors."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {k: np.ascontiguousarray(data[k]) for k in data.files if k != "meta"}
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a clustermac whitening file ({error})") from error
        saved = {**SETTINGS_BEFORE_THEY_WERE_SAVED, **meta.get("settings", {})}
        mine = self._whitening_settings()
        different = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if different:
            detail = ", ".join(f"{k}: file has {a!r}, extractor has {b!r}" for k, (a, b) in different.items())
            raise ValueError(f"{path}: whitening was learned for other settings ({detail}); learn a new one with fit_whitening()")
        self.whitening_mean, self.whitening_projection = arrays["mean"], arrays["projection"]
        self.pca_mean, self.pca_basis = arrays.get("pca_mean"), arrays.get("pca_basis")
        return self

    def _whitening_settings(self) -> dict[str, Any]:
        # Everything that changes the vectors the whitening was learned on; the crop mode
        # does not (whitening is learned on whole images).
        s = self.settings()
        s.pop("crop", None)
        return s


# ---------------------------------------------------------------------- helpers
def cluster_boxes(labels: np.ndarray) -> np.ndarray:
    """int32 R×4 bounding boxes [x0, y0, x1, y1) of the regions present in an int32 label map
    (:func:`clustermac.region_boxes` without the empty boxes of absent labels)."""
    boxes = _core.region_boxes(labels)
    return np.ascontiguousarray(boxes[boxes[:, 2] > boxes[:, 0]])


def _fit_pca(features: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and D×C basis of the top principal components (dataset-learned clustering PCA)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    mean = features.mean(axis=0)
    centred = features - mean
    covariance = centred.T.astype(np.float64) @ centred / max(1, len(features) - 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:n_components]
    return mean.astype(np.float32), np.ascontiguousarray(vectors[:, order], dtype=np.float32)


def _name_of(image: Any) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"


def _named_error(image: Any, error: Exception) -> Exception:
    if isinstance(image, (str, os.PathLike)) and str(image) in str(error):
        return error
    return type(error)(f"{_name_of(image)}: {error}") if isinstance(error, (ValueError, OSError)) else error


def _resolve(item: tuple[int, Any]) -> tuple[int, Union[np.ndarray, Exception]]:
    i, value = item
    if isinstance(value, Exception):
        return i, value
    try:
        return i, value.result()
    except Exception as error:
        return i, error


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="img", dynamic_ncols=True, leave=False)
