"""Regional GeM: the generalised mean (Radenović et al. 2018) inside each region instead of the max.

SuperGlobal (Shao et al., ICCV 2023) reports that GeM inside regions beats max inside them; here
the regions are R-MAC's boxes and the boxes or cells of ClusterMAC's clusters. Per region and
channel: (mean over the region's cells of max(x, 1e-6)^p)^(1/p), the clamp of
:func:`clustermac.gem_pool`. Box sums come from an integral image of x^p, so R boxes cost one
pass over the map plus O(R·D).
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_gem", "label_gem", "GEM_CLAMP"]

#: Activations are clamped below at this value before the power, as in :func:`clustermac.gem_pool`.
GEM_CLAMP = 1e-6


def _check(fmap: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    fmap = np.asarray(fmap)
    if fmap.ndim != 3 or 0 in fmap.shape:
        raise ValueError(f"fmap: expected a non-empty D×H×W feature map, got shape {fmap.shape}")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not np.isfinite(p) or p <= 0:
        raise ValueError(f"p: expected a finite number > 0, got {p!r}")
    return fmap, float(p)


def _powered(fmap: np.ndarray, p: float) -> np.ndarray:
    return np.maximum(fmap.astype(np.float64), GEM_CLAMP) ** p


def box_gem(fmap: np.ndarray, boxes: np.ndarray, p: float = 3.0) -> np.ndarray:
    """GeM of each box [x0, y0, x1, y1) (half-open, in cells) of a D×H×W map: float32 R×D."""
    fmap, p = _check(fmap, p)
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.integer):
        raise ValueError(f"boxes: expected an integer R×4 array of [x0, y0, x1, y1), got {boxes.dtype} {boxes.shape}")
    _, height, width = fmap.shape
    x0, y0, x1, y1 = (boxes[:, i].astype(np.int64) for i in range(4))
    bad = (x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height) | (x1 <= x0) | (y1 <= y0)
    if bad.any():
        raise ValueError(f"boxes: box {boxes[np.argmax(bad)].tolist()} is empty or outside the {height}×{width} map")
    integral = np.zeros((fmap.shape[0], height + 1, width + 1))
    integral[:, 1:, 1:] = _powered(fmap, p).cumsum(axis=1).cumsum(axis=2)
    sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
    means = np.maximum(sums.T / ((x1 - x0) * (y1 - y0))[:, None], 0.0)  # cancellation can dip below 0
    return (means ** (1.0 / p)).astype(np.float32)


def label_gem(fmap: np.ndarray, labels: np.ndarray, p: float = 3.0) -> np.ndarray:
    """GeM of each region of an int H×W label map (ids 0..K-1; negative ids ignored) of a D×H×W
    map: float32 K×D with K = labels.max() + 1; an id with no cell gives a zero row (which the
    aggregation skips, as for :func:`clustermac.region_mac`)."""
    fmap, p = _check(fmap, p)
    labels = np.asarray(labels)
    if labels.shape != fmap.shape[1:] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected an integer array of shape {fmap.shape[1:]}, got {labels.dtype} {labels.shape}"
        )
    flat = labels.reshape(-1).astype(np.int64)
    n_regions = int(flat.max()) + 1 if flat.size and flat.max() >= 0 else 0
    keep = flat >= 0
    one_hot = np.zeros((n_regions, flat.size))
    one_hot[flat[keep], np.flatnonzero(keep)] = 1.0
    counts = one_hot.sum(axis=1)
    sums = one_hot @ _powered(fmap, p).reshape(fmap.shape[0], -1).T
    out = np.zeros((n_regions, fmap.shape[0]), np.float32)
    present = counts > 0
    out[present] = (sums[present] / counts[present, None]) ** (1.0 / p)
    return out
