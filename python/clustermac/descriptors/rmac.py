"""R-MAC (Tolias, Sicre & Jégou, ICLR 2016): per square region of a 3-scale grid with ~40 %
overlap, MAC → l2 → PCA-whitening → l2; sum → l2."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core
from .base import CodedMap, DescriptorMethod, FloatMap

__all__ = ["RMAC", "RMACInBox", "rmac_vectors"]


def rmac_vectors(feature_map: FloatMap | CodedMap, levels: int) -> np.ndarray:
    """The un-normalised MAC vectors (R×D) of Tolias' grid with ``levels`` scales."""
    return feature_map.grid_mac(_core.rmac_regions(feature_map.height, feature_map.width, levels))


class RMAC(DescriptorMethod):
    """R-MAC with the extractor's ``rmac_levels``."""

    name = "rmac"
    regional = True

    def settings(self) -> dict[str, Any]:
        return {"rmac_levels": self.extractor.rmac_levels}

    def regional_vectors(
        self, fmap: np.ndarray, rgb: np.ndarray | None = None, labels: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        return rmac_vectors(FloatMap(fmap), self.extractor.rmac_levels)

    def box_descriptor(self) -> RMACInBox:
        ex = self.extractor
        return RMACInBox(ex.whitening_mean, ex.whitening_projection, ex.rmac_levels)


class RMACInBox:
    """The R-MAC descriptor of a feature map or of a box of one, for :func:`clustermac.aml_rerank`.

    Tolias' grid (:func:`clustermac.rmac_regions` with ``levels``) → regional MAC → l2 →
    PCA-whitening (when ``whitening_mean`` and ``whitening_projection`` from
    :func:`clustermac.fit_pca_whitening` are given) → l2 → sum → l2; the same as
    :meth:`clustermac.Extractor.descriptor_from_feature_map` with method ``"rmac"``.

    Call it on a float32 D×h×w crop (the generic ``descriptor_fn`` interface), or use
    :meth:`from_codes` (:meth:`from_store`, which :func:`clustermac.aml_rerank` calls) on a box of
    8-bit codes: the regional max is then taken on the codes themselves, which gives the same
    descriptor bit for bit without writing a dequantised crop.
    """

    def __init__(
        self, whitening_mean: np.ndarray | None = None, whitening_projection: np.ndarray | None = None, levels: int = 3
    ) -> None:
        if (whitening_mean is None) != (whitening_projection is None):
            raise ValueError(
                "whitening_mean and whitening_projection: give both (from fit_pca_whitening) or neither, "
                f"got only {'whitening_mean' if whitening_projection is None else 'whitening_projection'}"
            )
        if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels: expected an integer >= 1, got {levels!r}")
        self.whitening_mean = whitening_mean
        self.whitening_projection = whitening_projection
        self.levels = int(levels)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """The float32 descriptor of a float32 D×h×w feature map (or crop of one)."""
        crop = np.ascontiguousarray(crop, dtype=np.float32)
        if crop.ndim != 3:
            raise ValueError(f"crop: expected a D×h×w feature map, got shape {crop.shape}")
        return self._aggregate(rmac_vectors(FloatMap(crop), self.levels))

    def from_codes(self, codes: np.ndarray, box: Sequence[int] | None, scale: float) -> np.ndarray:
        """The descriptor of the box [x0, y0, x1, y1) (cells; None: the whole map) of uint8
        channel-last H×W×D codes with value = code · scale, e.g. ``store.codes(i)`` and
        ``store.scale(i)`` of a :class:`clustermac.FeatureMapStore`. Equal bit for bit to
        ``self(store.feature_map(i, box))``."""
        return self._aggregate(self.regional_vectors_from_codes(codes, box, scale))

    def regional_vectors_from_codes(self, codes: np.ndarray, box: Sequence[int] | None, scale: float) -> np.ndarray:
        """The un-normalised regional MAC vectors (R×D) of the grid of the box, from the codes."""
        return rmac_vectors(CodedMap(codes, box, scale), self.levels)

    def from_store(self, store: Any, index: int, box: Sequence[int] | None) -> np.ndarray:
        """The descriptor of the box of map ``index`` of a :class:`clustermac.FeatureMapStore`
        (what :func:`clustermac.aml_rerank` calls)."""
        return self.from_codes(store.codes(index), box, store.scale(index))

    def regional_vectors_from_store(self, store: Any, index: int, box: Sequence[int] | None) -> np.ndarray:
        """The regional MAC vectors (R×D) of the box of map ``index`` of a
        :class:`clustermac.FeatureMapStore`, for :meth:`aggregate_many`."""
        return self.regional_vectors_from_codes(store.codes(index), box, store.scale(index))

    def aggregate_many(self, regional_vectors: Sequence[np.ndarray]) -> np.ndarray:
        """The descriptors (N×D', one row per box) of N boxes' regional vectors, aggregated
        together: the regional vectors of all the boxes are whitened by one matrix product
        (:func:`clustermac.aggregate_region_groups`). Row i equals :meth:`from_store` of box i up
        to float rounding of the product (bit for bit on the benchmark of ``benchmarks/rerank.py``)."""
        if not regional_vectors:
            dim = self.whitening_projection.shape[0] if self.whitening_projection is not None else 0
            return np.zeros((0, dim), dtype=np.float32)
        sizes = np.array([len(v) for v in regional_vectors], dtype=np.int64)
        return _core.aggregate_region_groups(
            np.concatenate(regional_vectors), sizes, self.whitening_mean, self.whitening_projection
        )

    def _aggregate(self, vectors: np.ndarray) -> np.ndarray:
        return _core.aggregate_regions(vectors, self.whitening_mean, self.whitening_projection)
