"""The interface of a descriptor method, and the two kinds of feature map it pools.

A method (MAC, SPoC, GeM, CroW, R-MAC, ClusterMAC) is a small class bound to an
:class:`~clustermac.Extractor`, whose attributes hold its parameters. It knows:

- its settings (the keys it adds to :meth:`Extractor.settings`, saved with whitening files);
- how to pool a feature map: one global vector (:meth:`DescriptorMethod.pooled_vector`), or
  regional vectors that are whitened and summed (:meth:`DescriptorMethod.regional_vectors`);
- its descriptor inside an AML box (:meth:`DescriptorMethod.box_descriptor`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Union

import numpy as np

from .. import _core

if TYPE_CHECKING:  # the extractor imports the methods, not the other way round
    from .extractor import Extractor

__all__ = ["DescriptorMethod", "FloatMap", "CodedMap", "cluster_boxes"]

#: What :meth:`DescriptorMethod.box_descriptor` returns: a callable on a float32 D×h×w crop, or an
#: object with ``from_store(store, index, box)`` that works on the stored 8-bit codes.
BoxDescriptor = Union[Callable[[np.ndarray], np.ndarray], Any]


class DescriptorMethod:
    """One way of turning a feature map into a descriptor; subclasses set :attr:`name` and
    :attr:`regional` and implement :meth:`pooled_vector` or :meth:`regional_vectors`."""

    #: The name in :data:`clustermac.descriptors.METHODS`.
    name: ClassVar[str]
    #: True: regional vectors → l2 → whiten → l2 → sum → l2; False: one pooled vector → l2 → whiten → l2.
    regional: ClassVar[bool] = False
    #: True for the methods whose regions come from the NCut clustering (their settings carry the
    #: clustering's, e.g. ``similarity_precision``).
    clustering: ClassVar[bool] = False
    #: The head activation of the embedded backbone this method uses when the extractor is given
    #: no backbone (:func:`clustermac.backbones.default_backbone`'s ``head``).
    backbone_head: ClassVar[str] = "relu6"

    def __init__(self, extractor: Extractor) -> None:
        # A weak proxy: the extractor owns its method, and no reference cycle keeps it alive.
        self.extractor: Extractor = weakref.proxy(extractor)

    def settings(self) -> dict[str, Any]:
        """The settings of this method beyond the extractor's common ones, in a fixed order."""
        return {}

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        """The un-normalised global vector (D) of a global method."""
        raise ValueError(f"method {self.name!r} pools regions: use regional_vectors()")

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """The un-normalised regional vectors (R×D) of a regional method."""
        raise ValueError(f"method {self.name!r} pools one global vector: use pooled_vector()")

    def uses_rgb(self) -> bool:
        """Whether the method needs the image resized to the feature map's H×W (RGB clustering)."""
        return False

    def cluster_labels(self, fmap: np.ndarray, rgb: np.ndarray | None = None) -> list[np.ndarray]:
        """The NCut partitions (H×W label maps) the regions of a :attr:`clustering` method come from."""
        raise ValueError(f"method {self.name!r} does not cluster the feature map")

    def box_descriptor(self) -> BoxDescriptor:
        """The descriptor inside an AML box: by default the method run on the dequantised crop."""
        return self.extractor.descriptor_from_feature_map


class FloatMap:
    """A float32 D×H×W feature map, pooled over boxes or label maps."""

    def __init__(self, fmap: np.ndarray) -> None:
        self.fmap = fmap
        self.height, self.width = int(fmap.shape[1]), int(fmap.shape[2])

    def grid_mac(self, boxes: np.ndarray) -> np.ndarray:
        """MAC vector of each box [x0, y0, x1, y1) in cells, R×D."""
        return _core.grid_mac(self.fmap, boxes)

    def region_mac(self, labels: np.ndarray) -> np.ndarray:
        """MAC vector of each label of an int32 H×W label map, R×D."""
        return _core.region_mac(self.fmap, labels)

    def crop(self, labels: np.ndarray) -> np.ndarray:
        """A label map of the whole map, restricted to this one (the whole map: unchanged)."""
        return labels


class CodedMap:
    """A box [x0, y0, x1, y1) (cells; None: everything) of 8-bit channel-last H×W×D codes whose
    values are code · scale, pooled straight from the codes (no dequantised copy; same bits)."""

    def __init__(self, codes: np.ndarray, box: Sequence[int] | None, scale: float) -> None:
        if box is None:
            shape = np.shape(codes)
            if len(shape) != 3:
                raise ValueError(f"codes: expected a uint8 array of shape (H, W, D), got shape {shape}")
            self.height, self.width = int(shape[0]), int(shape[1])
        else:
            corners = [int(v) for v in box]
            if len(corners) != 4 or corners[2] <= corners[0] or corners[3] <= corners[1]:
                raise ValueError(f"box: expected [x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {corners}")
            self.height, self.width = corners[3] - corners[1], corners[2] - corners[0]
        self.codes, self.box, self.scale = codes, box, scale

    def grid_mac(self, boxes: np.ndarray) -> np.ndarray:
        """MAC vector of each box, given in cells of this box, R×D."""
        return _core.grid_mac_codes(self.codes, self.box, boxes, self.scale)

    def region_mac(self, labels: np.ndarray) -> np.ndarray:
        """MAC vector of each label of an H×W label map of the whole map, over its cells in this box."""
        return _core.region_mac_codes(self.codes, labels, self.box, self.scale)

    def crop(self, labels: np.ndarray) -> np.ndarray:
        """A label map of the whole map, restricted to this box."""
        if self.box is None:
            return labels
        x0, y0, x1, y1 = (int(v) for v in self.box)
        return np.ascontiguousarray(labels[y0:y1, x0:x1])


def cluster_boxes(labels: np.ndarray) -> np.ndarray:
    """int32 R×4 bounding boxes [x0, y0, x1, y1) of the regions present in an int32 label map
    (:func:`clustermac.region_boxes` without the empty boxes of absent labels)."""
    boxes = _core.region_boxes(labels)
    return np.ascontiguousarray(boxes[boxes[:, 2] > boxes[:, 0]])
