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
- ``clustermac-box`` (ours, issue 16; the default, ``DEFAULT_METHOD``): R-MAC's grid + the
  bounding boxes of 20 NCut clusters; per region MAC → l2 → whiten → l2; sum → l2; on the embedded
  backbone's uncapped head (``head="relu"``). See the README for what it gains over R-MAC (about
  1 mAP at best).

Where each part lives: :mod:`.extractor` (the :class:`Extractor`: preparing images, the
backbone, method dispatch), :mod:`.registry` (name → method class), one module per family of
methods (:mod:`.global_pooling`, :mod:`.rmac`, :mod:`.clustermac`) on the interface of
:mod:`.base`, :mod:`.whitening` (learning, saving and loading the whitening), :mod:`.pipeline`
(threaded extraction of many images), :mod:`.multiscale` (the opt-in multi-scale extraction of
every method, ``Extractor(scales=...)``: the scale loop) and :mod:`.store` (descriptors of a folder
on disk).
"""

from __future__ import annotations

from .._typing import Box, ImageInput
from .base import DescriptorMethod, cluster_boxes
from .clustermac import CLUSTER_POOLINGS, ClusterMAC, ClusterMACInBox, default_pca_dim
from .extractor import (
    CROP_MODES,
    SIMILARITY_PRECISIONS,
    Extractor,
    PreparedImage,
    _activation_box,  # noqa: F401  (private; older code imported it from here)
    rgb_at_feature_resolution,
)
from .global_pooling import MAC, CroW, GeM, SPoC
from .registry import DEFAULT_METHOD, METHOD_CLASSES, METHODS, REGIONAL_METHODS
from .rmac import RMAC, RMACInBox
from .store import extract_folder, load_descriptors
from .whitening import (
    PCA_IMAGES,
    PCA_LOCATIONS_PER_IMAGE,
    SETTINGS_BEFORE_THEY_WERE_SAVED,
    WHITENING_FORMAT_VERSION,
)

__all__ = [
    "Extractor",
    "PreparedImage",
    "DEFAULT_METHOD",
    "METHODS",
    "METHOD_CLASSES",
    "REGIONAL_METHODS",
    "CROP_MODES",
    "CLUSTER_POOLINGS",
    "SIMILARITY_PRECISIONS",
    "SETTINGS_BEFORE_THEY_WERE_SAVED",
    "WHITENING_FORMAT_VERSION",
    "PCA_IMAGES",
    "PCA_LOCATIONS_PER_IMAGE",
    "DescriptorMethod",
    "MAC",
    "SPoC",
    "GeM",
    "CroW",
    "RMAC",
    "ClusterMAC",
    "RMACInBox",
    "ClusterMACInBox",
    "cluster_boxes",
    "default_pca_dim",
    "rgb_at_feature_resolution",
    "extract_folder",
    "load_descriptors",
    "ImageInput",
    "Box",
]
