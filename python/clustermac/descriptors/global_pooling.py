"""The global methods: one vector pooled over the whole feature map → l2 → [whiten → l2].

- MAC: max over all locations (the paper's Eq. 4 with one region).
- SPoC: sum-pooling with a Gaussian centre prior (Babenko & Lempitsky 2015).
- GeM: generalised mean with exponent p (Radenović et al. 2018).
- CroW: cross-dimensional spatial and channel weighting (Kalantidis et al. 2016).

Inside an AML box they run on the dequantised crop (the default of :class:`DescriptorMethod`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .base import DescriptorMethod

__all__ = ["MAC", "SPoC", "GeM", "CroW", "mac_vector"]


def mac_vector(fmap: np.ndarray) -> np.ndarray:
    """The MAC vector of a whole D×H×W float32 feature map (max over all locations), length D;
    also the query side of AML re-ranking."""
    return _core.region_mac(fmap, np.zeros(fmap.shape[1:], dtype=np.int32))[0]


class MAC(DescriptorMethod):
    """Max over all locations."""

    name = "mac"

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        return mac_vector(fmap)


class SPoC(DescriptorMethod):
    """Sum-pooling with a Gaussian centre prior."""

    name = "spoc"

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        return _core.spoc_pool(fmap)


class GeM(DescriptorMethod):
    """Generalised mean with the extractor's ``gem_p``."""

    name = "gem"

    def settings(self) -> dict[str, Any]:
        return {"gem_p": self.extractor.gem_p}

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        return _core.gem_pool(fmap, self.extractor.gem_p)


class CroW(DescriptorMethod):
    """Cross-dimensional weighting."""

    name = "crow"

    def pooled_vector(self, fmap: np.ndarray) -> np.ndarray:
        return _core.crow_pool(fmap)
