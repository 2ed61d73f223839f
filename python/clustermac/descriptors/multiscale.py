"""Multi-scale extraction (``Extractor(scales=...)``): the scale loop, in one place.

At scale s the original image is resized so that its longer side is ``round(s · min(longer side,
max_size))`` (s relative to the max_size-resized image; one bicubic resize from the original, as
``benchmarks/quality.py --scales`` does), then prepared exactly as at scale 1 (crop I: cropped to
the box; crop X: the box mapped into that scale's feature map). The descriptor aggregates the
vectors of every scale together, as the harness does: each regional vector (a global method's
pooled vector counts as one region per scale) l2 → PCA-whitening → l2, all summed, then l2
(``_core.aggregate_regions`` on the rows of all scales). The whitening is learned on the
l2-normalised vectors of every scale. With ``scales=(1.0,)`` none of this runs: the single-scale
path is the one of every earlier version, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._typing import Box, ImageInput
from ..images import load_image

if TYPE_CHECKING:  # the extractor imports this module, not the other way round
    from .extractor import Extractor, PreparedImage

__all__ = ["check_scales", "scaled_size", "prepare_scales", "all_scale_vectors"]

FeatureMapPair = tuple[np.ndarray, np.ndarray]


def check_scales(scales: Any) -> tuple[float, ...]:
    """``scales`` as a tuple of floats: non-empty, starting with 1.0, strictly decreasing, each in
    (0, 1]. A ValueError naming the setting and the problem otherwise."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ValueError(f"scales: expected a sequence of numbers in (0, 1] starting with 1.0, got {scales!r}")
    values = []
    for value in scales:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"scales: expected numbers in (0, 1], got {value!r}")
        value = float(value)
        if not (np.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError(f"scales: every scale must be in (0, 1], got {value}")
        values.append(value)
    if not values:
        raise ValueError("scales: expected at least one scale, e.g. (1.0,) or (1.0, 0.7071, 0.5)")
    if values[0] != 1.0:
        raise ValueError(f"scales: the first scale must be 1.0 (the image itself), got {tuple(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"scales: expected strictly decreasing scales (no repeats), got {tuple(values)}")
    return tuple(values)


def scaled_size(longer_side: int, max_size: int, scale: float) -> int:
    """The longer side of the image fed to the network at ``scale`` (at least 1 pixel)."""
    return max(1, int(round(scale * min(longer_side, max_size))))


def prepare_scales(extractor: Extractor, image: ImageInput, box: Box | None = None) -> list[PreparedImage]:
    """The image prepared at every scale of ``extractor.scales`` (decoded once). A scale below 1
    whose prepared image (the crop, for crop I) has a side shorter than the backbone's stride is
    left out; scale 1.0 is always there."""
    pil = load_image(image)
    stride = int(extractor.backbone.stride)
    prepared = [extractor.prepare(pil, box)]
    for scale in extractor.scales[1:]:
        at_scale = extractor.prepare(pil, box, max_size=scaled_size(max(pil.size), extractor.max_size, scale))
        if min(at_scale.image.size) >= stride:
            prepared.append(at_scale)
    return prepared


def all_scale_vectors(extractor: Extractor, maps: Sequence[FeatureMapPair]) -> np.ndarray:
    """The rows of every scale (:meth:`Extractor.aggregation_rows`), stacked (scale 1 first)."""
    rows = [extractor.aggregation_rows(fmap, rgb) for fmap, rgb in maps]
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
