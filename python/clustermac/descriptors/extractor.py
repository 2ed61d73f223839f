"""The extractor: from an image to a global descriptor, with one of the registered methods.

Every method starts from the backbone's feature map X (D×H×W) and ends with one l2-normalised
vector (see :mod:`clustermac.descriptors` for the list). The :class:`Extractor` prepares images
(load, resize, query box), runs the backbone, and hands the feature map to its method (one
class per method, :mod:`clustermac.descriptors.registry`); it then l2-normalises, whitens and
aggregates. Whitening is PCA-whitening learned on a *separate* image set
(:meth:`Extractor.fit_whitening`): on regional vectors for the regional methods, on global
vectors for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .. import _core
from .._typing import Box, ImageInput, PathLike
from ..backbones import Backbone, default_backbone
from ..images import crop_box, load_image, map_box, resize_max
from . import multiscale, pipeline, whitening
from .base import BoxDescriptor, DescriptorMethod
from .clustermac import CLUSTER_POOLINGS, default_pca_dim
from .registry import DEFAULT_METHOD, method_class

__all__ = ["Extractor", "PreparedImage", "CROP_MODES", "rgb_at_feature_resolution"]

#: How a query box is applied: crop the image (crop I) or the activations (crop X).
CROP_MODES = ("image", "activations")
_CLUSTERING_PCAS = ("image", "dataset")
_NORMALIZATIONS = ("sym", "shi")
#: How the clustering stores its N×N similarity: float32 (default, every CPU) or bfloat16 (asked for).
SIMILARITY_PRECISIONS = ("float32", "bfloat16")


def _integer(name: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    """``value`` as an int >= ``minimum``; a ValueError naming the setting otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a finite float (> 0 when ``positive``, else >= 0); a ValueError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


@dataclass
class PreparedImage:
    """An image after loading, resizing and (for crop I) cropping, ready for the backbone.

    ``activation_box`` is the query box in resized-image pixels when the query mode is crop X
    (the feature-map locations inside it are kept after extraction), else None.
    """

    image: Image.Image
    activation_box: tuple[float, float, float, float] | None


def _activation_box(box: Box, stride: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Feature-map cells covered by a box given in resized-image pixels (at least one cell)."""
    x0 = int(np.floor(box[0] / stride))
    y0 = int(np.floor(box[1] / stride))
    x1 = int(np.ceil(box[2] / stride))
    y1 = int(np.ceil(box[3] / stride))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    return x0, y0, x1, y1


def _check_finite(descriptor: np.ndarray, maps: Sequence[np.ndarray]) -> None:
    """Never a NaN or inf descriptor: it would rank arbitrarily and poison an index."""
    if not np.isfinite(descriptor).all():
        bad = sum(int(fmap.size - np.count_nonzero(np.isfinite(fmap))) for fmap in maps)
        raise ValueError(
            "the descriptor has non-finite values (NaN or inf)"
            + (f"; the backbone's feature map has {bad} non-finite values" if bad else "")
        )


def rgb_at_feature_resolution(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The image resized to the feature map's H×W, as float32 H×W×3 (for the RGB NCut)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() copies even an RGB image
    small = rgb.resize((width, height), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32)


class Extractor:
    """Turns images into global descriptors with one of :data:`METHODS`.

    Parameters
    ----------
    backbone:
        A :class:`~clustermac.Backbone`; ``None`` means the embedded EfficientNet-Lite0 with the
        method's head (``backbone_head`` of its class: ReLU6 as trained, the uncapped ReLU for
        ``"clustermac-box"``).
    method:
        ``"clustermac-box"`` (default: ours, R-MAC's grid + the boxes of 20 clusters on the
        uncapped head, the best descriptor we measured), ``"clustermac"`` (the paper's ClusterMAC,
        bit-identical to earlier versions), ``"rmac"``, ``"mac"``, ``"spoc"``, ``"gem"`` or ``"crow"``.
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
        The paper's ClusterMAC (``"clustermac"``) only: cluster counts on the features (default
        (5, 20)) and on the RGB image (default 5); ``"clustermac-box"`` always uses 20 and no RGB.
    z_ratio:
        The affinity scale: z = z_ratio · max d (Eq. 3; paper: 0.05).
    spatial_weight:
        Weight of a spatial-distance term in the affinity (0 in the paper; Fig. 6 ablation).
    normalization:
        NCut graph normalisation passed to :func:`clustermac.cluster_feature_map`: ``"sym"``
        (default; no self-loops, as scikit-learn) or ``"shi"`` (Shi's released Ncut code, which
        the paper ran).
    similarity_precision:
        How the clustering stores the N×N similarity for the NCut eigensolver: ``"float32"``
        (default, on every CPU) or ``"bfloat16"`` (only when asked for; needs a CPU with
        AVX512-BF16, else :func:`clustermac.cluster_feature_map` raises ``ValueError``). The two
        give different partitions, so the choice is a fixed setting, never the CPU's: bfloat16
        is recorded in :meth:`settings` (float32, the default, is not, so the settings of files
        written before the option existed are unchanged). See the README, "Similarity precision and clustering speed".
    clustering_pca:
        ``"image"`` (the paper: PCA per image) or ``"dataset"`` (learned by
        :meth:`fit_whitening` on the whitening images).
    rmac_levels:
        Number of scales of the R-MAC grid (Tolias et al.: 3).
    cluster_pooling:
        ClusterMAC only. ``"mask"`` (the paper's Eq. 4): each cluster's MAC over its own
        locations. ``"box"`` (our variant, not in the paper): over the bounding box of the cluster
        (:func:`clustermac.region_boxes`), so each region keeps the context around its cluster
        as R-MAC's rectangles do. The README reports what it changes.
    add_grid_regions:
        ClusterMAC only, not in the paper: add the R-MAC grid's square regions to the clusters
        before aggregation (off by default; the README reports what it changes).
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
    scales:
        Multi-scale extraction (opt-in; default ``(1.0,)``, single-scale, bit-identical to before).
        Scales must start with 1.0 and strictly decrease, each in (0, 1], e.g. ``(1.0, 0.7071, 0.5)``
        (cnnimageretrieval's 1, 1/√2, 1/2). At scale s the ORIGINAL image is resized (bicubic, as
        :func:`clustermac.resize_max`) so that its longer side is ``round(s · min(longer side,
        max_size))``: s relative to the max_size-resized image, the resize of
        ``benchmarks/quality.py --scales``. Every scale's regional vectors (a global method: its
        pooled vector, one "region" per scale) are aggregated together: each l2 → whitening → l2,
        all summed, l2 (:func:`clustermac.descriptors.multiscale.all_scale_vectors`); whitening is
        learned on the vectors of every scale. Crop I: each scale's resized image is cropped to the
        box; crop X: the box is mapped into each scale's feature map. A scale < 1 whose image (or
        crop) has a side shorter than the backbone's stride is skipped for that image (its feature
        map would be under one cell); scale 1.0 is always kept. Recorded in :meth:`settings` only
        when not ``(1.0,)``.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: str = DEFAULT_METHOD,
        crop: str = "image",
        *,
        max_size: int | None = None,
        pca_dim: int | None = None,
        n_clusters: Sequence[int] = (5, 20),
        rgb_clusters: int = 5,
        z_ratio: float = 0.05,
        spatial_weight: float = 0.0,
        normalization: str = "sym",
        similarity_precision: str = "float32",
        clustering_pca: str = "image",
        rmac_levels: int = 3,
        add_grid_regions: bool = False,
        cluster_pooling: str = "mask",
        gem_p: float = 3.0,
        whitening_dim: int | None = None,
        whitening_shrinkage: float = 1e-3,
        seed: int = 0,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        chosen = method_class(method)  # checks the name
        if crop not in CROP_MODES:
            raise ValueError(f"crop: expected one of {CROP_MODES}, got {crop!r}")
        if cluster_pooling not in CLUSTER_POOLINGS:
            raise ValueError(f"cluster_pooling: expected one of {CLUSTER_POOLINGS}, got {cluster_pooling!r}")
        if clustering_pca not in _CLUSTERING_PCAS:
            raise ValueError(f"clustering_pca: expected 'image' or 'dataset', got {clustering_pca!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization: expected one of {_NORMALIZATIONS}, got {normalization!r}")
        if similarity_precision not in SIMILARITY_PRECISIONS:
            raise ValueError(
                f"similarity_precision: expected one of {SIMILARITY_PRECISIONS}, got {similarity_precision!r}"
            )
        # Every setting is checked here, before a backbone is loaded or an image touched: a bad
        # global setting is one clear error, not a failure of every image.
        max_size = _integer("max_size", max_size, 1, optional=True)
        pca_dim = _integer("pca_dim", pca_dim, 1, optional=True)
        if isinstance(n_clusters, (str, bytes)) or not isinstance(n_clusters, Iterable):
            raise ValueError(f"n_clusters: expected a sequence of integers >= 1, got {n_clusters!r}")
        n_clusters = tuple(_integer("n_clusters", k, 1) for k in n_clusters)
        if not n_clusters:
            raise ValueError("n_clusters: expected at least one cluster count")
        rgb_clusters = _integer("rgb_clusters", rgb_clusters, 0)
        rmac_levels = _integer("rmac_levels", rmac_levels, 1)
        whitening_dim = _integer("whitening_dim", whitening_dim, 1, optional=True)
        seed = _integer("seed", seed, 0)
        scales = multiscale.check_scales(scales)
        z_ratio = _number("z_ratio", z_ratio, positive=True)
        spatial_weight = _number("spatial_weight", spatial_weight)
        gem_p = _number("gem_p", gem_p, positive=True)
        whitening_shrinkage = _number("whitening_shrinkage", whitening_shrinkage)
        self.backbone = backbone if backbone is not None else default_backbone(head=chosen.backbone_head)
        if pca_dim is not None and pca_dim > int(self.backbone.dim):
            raise ValueError(
                f"pca_dim: {pca_dim} is more than the backbone's {int(self.backbone.dim)} feature dimensions"
            )
        self.method = method
        self.crop = crop
        self.max_size = int(max_size) if max_size is not None else int(self.backbone.max_size)
        self.pca_dim = int(pca_dim) if pca_dim is not None else default_pca_dim(self.backbone.dim)
        self.n_clusters = n_clusters
        self.rgb_clusters = int(rgb_clusters)
        self.z_ratio = float(z_ratio)
        self.spatial_weight = float(spatial_weight)
        self.normalization = normalization
        self.similarity_precision = similarity_precision
        self.clustering_pca = clustering_pca
        self.rmac_levels = int(rmac_levels)
        self.add_grid_regions = bool(add_grid_regions)
        self.cluster_pooling = cluster_pooling
        self.gem_p = float(gem_p)
        self.whitening_dim = whitening_dim
        self.whitening_shrinkage = float(whitening_shrinkage)
        self.seed = int(seed)
        self.scales = scales
        # Learned state (fit_whitening / load_whitening).
        self.whitening_mean: np.ndarray | None = None
        self.whitening_projection: np.ndarray | None = None
        self.pca_mean: np.ndarray | None = None
        self.pca_basis: np.ndarray | None = None

    # ------------------------------------------------------------------ method
    @property
    def method(self) -> str:
        """The method's name, one of :data:`METHODS`."""
        return self._method.name

    @method.setter
    def method(self, name: str) -> None:
        self._method: DescriptorMethod = method_class(name)(self)

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
        # Recorded only when not float32, so float32 settings (and the fingerprints of files
        # written before int8 existed) are unchanged; the backbone name carries it too.
        precision = getattr(self.backbone, "precision", "float32")  # duck-typed backbones are float32
        if precision != "float32":
            s["backbone_precision"] = precision
        s.update(self._method.settings())
        if self.scales != (1.0,):  # recorded only when multi-scale: single-scale fingerprints unchanged
            s["scales"] = list(self.scales)
        s.update(whitening_shrinkage=self.whitening_shrinkage, whitening_dim=self.whitening_dim)
        return s

    @property
    def is_whitened(self) -> bool:
        """Whether a whitening has been learned or loaded."""
        return self.whitening_projection is not None

    @property
    def dim(self) -> int:
        """Length of the descriptors this extractor produces."""
        if self.whitening_projection is not None:
            return int(self.whitening_projection.shape[0])
        return int(self.backbone.dim)

    # ------------------------------------------------------------------ stages
    def prepare(self, image: ImageInput, box: Box | None = None, max_size: int | None = None) -> PreparedImage:
        """Load, resize to ``max_size`` (default: the extractor's; another for one scale of a
        multi-scale extraction) and apply the query box according to ``crop``."""
        pil = load_image(image)
        resized, scale = resize_max(pil, self.max_size if max_size is None else max_size)
        if box is None:
            return PreparedImage(resized, None)
        mapped = map_box(box, scale, pil.size)
        if self.crop == "image":
            return PreparedImage(crop_box(resized, mapped), None)
        return PreparedImage(resized, tuple(float(v) for v in mapped))

    def prepare_scales(self, image: ImageInput, box: Box | None = None) -> list[PreparedImage]:
        """The image prepared at each of :attr:`scales` (:func:`multiscale.prepare_scales`);
        ``[prepare(image, box)]`` when single-scale."""
        if self.scales == (1.0,):
            return [self.prepare(image, box)]
        return multiscale.prepare_scales(self, image, box)

    def feature_maps(
        self, prepared: Sequence[PreparedImage], side_by_side: bool = False, with_rgb: bool | None = None
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """:meth:`feature_map` of every scale's prepared image."""
        return [self.feature_map(p, side_by_side, with_rgb) for p in prepared]

    def feature_map(
        self, prepared: PreparedImage, side_by_side: bool = False, with_rgb: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the backbone; returns the D×H×W map (cropped for crop X) and the image resized to
        H×W×3 for the RGB clustering: by default only when the method uses it (:attr:`uses_rgb`),
        else None; ``with_rgb`` True or False decides instead. ``side_by_side``: on the backbone's
        session for images side by side (:meth:`Backbone.features`), for running several images at
        once; same values. Other backbone objects need only ``features(image)``."""
        image = prepared.image
        fmap = self.backbone.features(image, side_by_side=True) if side_by_side else self.backbone.features(image)
        _, height, width = fmap.shape
        with_rgb = self.uses_rgb if with_rgb is None else with_rgb
        rgb = rgb_at_feature_resolution(prepared.image, height, width) if with_rgb else None
        if prepared.activation_box is not None:
            x0, y0, x1, y1 = _activation_box(prepared.activation_box, int(self.backbone.stride), height, width)
            fmap = np.ascontiguousarray(fmap[:, y0:y1, x0:x1])
            rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1]) if rgb is not None else None
        return fmap, rgb

    @property
    def uses_rgb(self) -> bool:
        """Whether the method clusters the image's colours too (the paper's ClusterMAC with
        ``rgb_clusters`` > 0), so that :meth:`feature_map` must resize the image to H×W."""
        return bool(self._method.uses_rgb())

    @property
    def clusters(self) -> bool:
        """Whether the method's regions come from NCut partitions (``clustermac``, ``clustermac-box``):
        then :meth:`cluster_labels` gives them, and AML re-ranking needs them stored."""
        return bool(self._method.clustering)

    def cluster_labels(self, fmap: np.ndarray, rgb: np.ndarray | None) -> list[np.ndarray]:
        """The method's NCut partitions of one feature map, H×W label maps: for ``clustermac``
        the paper's (section 3.2; one per feature clustering, then the RGB one), for
        ``clustermac-box`` its 20 clusters. ValueError for a method that does not cluster."""
        return self._method.cluster_labels(fmap, rgb)

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """Un-normalised regional MAC vectors (R-MAC grid, clusters, or both), K×D. ClusterMAC
        uses ``labels`` (from :meth:`cluster_labels`) when given instead of clustering again."""
        return self._method.regional_vectors(fmap, rgb, labels)

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        """The un-normalised global vector of a global method (MAC, SPoC, GeM, CroW)."""
        return self._method.pooled_vector(fmap)

    def descriptor_from_feature_map(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """The descriptor of a feature map (D×H×W); ``rgb`` (H×W×3) is used by the RGB
        clustering of ClusterMAC only (None skips it); ClusterMAC's ``labels``, when given
        (:meth:`cluster_labels` of this map), are used instead of clustering again. Raises
        ``ValueError`` when the descriptor is not finite (NaN or inf)."""
        fmap = np.ascontiguousarray(fmap, dtype=np.float32)
        if self._method.regional:
            vectors = self.regional_vectors(fmap, rgb, labels)
            descriptor = _core.aggregate_regions(vectors, self.whitening_mean, self.whitening_projection)
        else:
            descriptor = _core.l2_normalize(self.pooled_vector(fmap))
            if self.whitening_projection is not None:
                whitened = _core.apply_whitening(descriptor[None, :], self.whitening_mean, self.whitening_projection)
                descriptor = _core.l2_normalize(whitened[0])
        _check_finite(descriptor, [fmap])
        return descriptor

    def descriptor_from_feature_maps(self, maps: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
        """The descriptor of one image from its (feature map, rgb) at every scale
        (:meth:`feature_maps`). One map: :meth:`descriptor_from_feature_map`, bit for bit. Several:
        the rows of every scale aggregated together (see :mod:`clustermac.descriptors.multiscale`)."""
        if len(maps) == 1:
            return self.descriptor_from_feature_map(*maps[0])
        vectors = multiscale.all_scale_vectors(self, maps)
        descriptor = _core.aggregate_regions(vectors, self.whitening_mean, self.whitening_projection)
        _check_finite(descriptor, [fmap for fmap, _ in maps])
        return descriptor

    def box_descriptor(self) -> BoxDescriptor:
        """The ``descriptor_fn`` for :func:`clustermac.aml_rerank`: the descriptor inside an
        AML box, computed on a :class:`clustermac.FeatureMapStore`'s 8-bit codes for R-MAC
        (:class:`clustermac.RMACInBox`) and ClusterMAC (:class:`clustermac.ClusterMACInBox`,
        which needs the database's cluster labels in the store: :meth:`cluster_labels`), else
        on the dequantised crop. Not available with multi-scale :attr:`scales` (the stored maps
        are of one scale): a ValueError."""
        if self.scales != (1.0,):
            raise ValueError(
                f"AML re-ranking describes boxes on single-scale feature maps; not available with scales={self.scales}"
            )
        return self._method.box_descriptor()

    # ------------------------------------------------------------------ public API
    def extract(self, image: ImageInput, box: Box | None = None) -> np.ndarray:
        """The descriptor of one image (a path, PIL image or H×W×3 uint8 array).

        ``box`` = (x1, y1, x2, y2) in the original image's pixels makes it a query, applied
        according to ``crop``. Returns a 1-D float32 unit vector of length :attr:`dim`.
        """
        return self.descriptor_from_feature_maps(self.feature_maps(self.prepare_scales(image, box)))

    def extract_many(
        self,
        images: Sequence[ImageInput],
        boxes: Sequence[Box | None] | None = None,
        progress: bool = True,
        description: str = "extract",
    ) -> np.ndarray:
        """Descriptors of many images, N×dim float32, several images at a time
        (:meth:`iter_extract`). Raises on the first bad image; use :meth:`iter_extract` to skip bad ones."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, result in self.iter_extract(images, boxes, progress=progress, description=description):
            if isinstance(result, Exception):
                raise result
            out[i] = result
        return out

    def iter_extract(
        self,
        images: Sequence[ImageInput],
        boxes: Sequence[Box | None] | None = None,
        progress: bool = True,
        description: str = "extract",
    ) -> Iterator[tuple[int, np.ndarray | Exception]]:
        """Yields ``(index, descriptor or exception)`` in input order.

        :attr:`Backbone.parallel_images` images are worked on at once, each decoded, run through
        the network on the backbone's side-by-side session and pooled on its own thread (same values
        as :meth:`extract`; :func:`clustermac.descriptors.pipeline.per_image_in_order`). An image
        that cannot be read yields its exception instead of a vector.
        """
        return pipeline.iter_descriptors(self, images, boxes, progress, description)

    # ------------------------------------------------------------------ whitening
    def fit_whitening(self, images: Sequence[ImageInput], progress: bool = True) -> Extractor:
        """Learn the PCA-whitening (and, with ``clustering_pca="dataset"``, the clustering PCA)
        from images that are NOT the ones to be searched (the paper learns it on Oxford5k to
        test on Paris6k and vice versa). Bad images are skipped with a warning."""
        if self.clustering_pca == "dataset":
            # The clustering PCA first, from the first images; the regional vectors depend on
            # it, so they come in a second pass.
            first = images[: whitening.PCA_IMAGES]
            scaled = pipeline.iter_feature_maps(self, first, progress, "clustering PCA")
            self.fit_clustering_pca(pair for maps in scaled for pair in maps)
        return self.fit_whitening_from_scaled_maps(pipeline.iter_feature_maps(self, images, progress, "whitening"))

    def fit_clustering_pca(self, maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> Extractor:
        """Learn the dataset PCA of the clustering step from (feature map, rgb) pairs."""
        features = whitening.sample_local_features(maps, self.seed)
        self.pca_mean, self.pca_basis = whitening.fit_pca(features, self.pca_dim)
        return self

    def fit_whitening_from_maps(self, maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> Extractor:
        """Learn the PCA-whitening from (feature map, rgb) pairs of a separate image set:
        on regional vectors for R-MAC/ClusterMAC, on global vectors for the others."""
        return self.fit_whitening_from_scaled_maps([pair] for pair in maps)

    def fit_whitening_from_scaled_maps(self, images: Iterable[Sequence[tuple[np.ndarray, np.ndarray]]]) -> Extractor:
        """:meth:`fit_whitening_from_maps` for multi-scale extraction: one sequence of (feature map,
        rgb) per image, one pair per scale (:meth:`feature_maps`); learned on the vectors of every scale."""
        self.whitening_mean = self.whitening_projection = None
        vectors = [np.concatenate([self.training_vectors(fmap, rgb) for fmap, rgb in maps]) for maps in images]
        self.whitening_mean, self.whitening_projection = whitening.fit_whitening_on_vectors(
            vectors, self.whitening_dim, self.whitening_shrinkage
        )
        return self

    def aggregation_rows(self, fmap: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
        """The un-normalised rows one feature map contributes to the descriptor and to the
        whitening: its regional vectors (K×D), or a global method's pooled vector (1×D)."""
        fmap = np.ascontiguousarray(fmap, dtype=np.float32)
        if self._method.regional:
            return self.regional_vectors(fmap, rgb)
        return self.pooled_vector(fmap)[None, :]

    def training_vectors(self, fmap: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
        """The l2-normalised vectors of one image that whitening is learned on."""
        return _core.l2_normalize(self.aggregation_rows(fmap, rgb))

    def save_whitening(self, path: PathLike) -> None:
        """Save the learned whitening with the settings it was learned for (atomic write)."""
        if self.whitening_projection is None:
            raise RuntimeError("save_whitening: nothing to save, call fit_whitening() first")
        arrays = {"mean": self.whitening_mean, "projection": self.whitening_projection}
        if self.pca_basis is not None:
            arrays.update(pca_mean=self.pca_mean, pca_basis=self.pca_basis)
        whitening.save_whitening_file(path, arrays, self._whitening_settings())

    def load_whitening(self, path: PathLike) -> Extractor:
        """Load a whitening saved by :meth:`save_whitening`. Refuses one learned with another
        backbone, method or setting that changes the regional vectors. An extractor made without
        ``whitening_dim`` takes the file's output dimension (``fit-whitening --dim 256``)."""
        settings, recorded = self._whitening_settings(), {}
        settings["scales"] = list(self.scales)  # checked both ways: a single-scale extractor refuses a multi-scale file
        if self._method.clustering:  # checked both ways too: a float32 extractor refuses a bfloat16 file
            settings["similarity_precision"] = self.similarity_precision
        if self.whitening_dim is None:  # no output dimension asked for: the file's (e.g. 256) is used
            del settings["whitening_dim"]
        arrays = whitening.load_whitening_file(path, settings, recorded)
        self.whitening_dim = recorded.get("whitening_dim")
        self.whitening_mean, self.whitening_projection = arrays["mean"], arrays["projection"]
        self.pca_mean, self.pca_basis = arrays.get("pca_mean"), arrays.get("pca_basis")
        return self

    def _whitening_settings(self) -> dict[str, Any]:
        # Everything that changes the vectors the whitening was learned on; the crop mode
        # does not (whitening is learned on whole images).
        s = self.settings()
        s.pop("crop", None)
        return s
