"""Pooling kernels of the C++ core against plain NumPy references on generated feature maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

import clustermac as cm


def random_map(rng, channels=6, height=5, width=7, sparse=True):
    fmap = rng.standard_normal((channels, height, width)).astype(np.float32)
    return np.maximum(fmap, 0.0) if sparse else fmap


# --- region MAC (Eq. 4) -------------------------------------------------------------------------


def reference_region_mac(fmap, labels):
    k = labels.max() + 1 if labels.size else 0
    out = np.zeros((max(k, 0), fmap.shape[0]), dtype=np.float32)
    for region in range(max(k, 0)):
        mask = labels == region
        if mask.any():
            out[region] = fmap[:, mask].max(axis=1)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_region_mac_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    fmap = random_map(rng, sparse=False)
    labels = rng.integers(-1, 4, size=(5, 7)).astype(np.int32)
    np.testing.assert_array_equal(cm.region_mac(fmap, labels), reference_region_mac(fmap, labels))


def test_region_mac_empty_region_is_zero_and_negative_labels_are_ignored():
    fmap = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) - 20.0  # all negative
    labels = np.array([[0, 0, -1], [3, 3, -5]], dtype=np.int32)  # regions 1 and 2 empty
    out = cm.region_mac(fmap, labels)
    assert out.shape == (4, 2)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(out[0], fmap[:, 0, :2].max(axis=1))  # negative maxima kept
    np.testing.assert_array_equal(out[3], fmap[:, 1, :2].max(axis=1))


def test_region_mac_more_regions_than_locations_and_one_location():
    fmap = np.array([[[2.0]], [[-1.0]]], dtype=np.float32)  # D=2, one location
    out = cm.region_mac(fmap, np.array([[4]], dtype=np.int32))
    assert out.shape == (5, 2)
    np.testing.assert_array_equal(out[4], [2.0, -1.0])
    np.testing.assert_array_equal(out[:4], 0.0)
    assert cm.region_mac(fmap, np.array([[-1]], dtype=np.int32)).shape == (0, 2)


def first_maximum_region_mac(fmap, labels):
    """region_mac's rule spelled out: locations in order, a value replaces a region's best only when
    strictly greater (so the first of equal values, +0 or -0, stays); empty regions give +0 rows."""
    d = fmap.shape[0]
    flat, flat_labels = fmap.reshape(d, -1), labels.ravel()
    k = int(flat_labels.max()) + 1
    best = np.full((k, d), -np.inf, dtype=np.float32)
    for i, label in enumerate(flat_labels):
        if label >= 0:
            best[label] = np.where(flat[:, i] > best[label], flat[:, i], best[label])
    best[np.isneginf(best).all(axis=1)] = 0.0
    return best


@pytest.mark.parametrize("channels", [1, 7, 8, 9, 16, 17, 33, 48])
def test_region_mac_keeps_the_first_of_equal_maxima_bit_for_bit(channels):
    """Ties between +0 and -0 (and equal values) resolve as in the scalar loop, on every channel
    block of the SIMD paths and the channels left over after them."""
    rng = np.random.default_rng(channels)
    fmap = rng.choice(np.array([-0.0, 0.0, 1.5, -2.0], dtype=np.float32), size=(channels, 6, 9))
    labels = np.repeat(rng.integers(-1, 5, size=(6, 3)), 3, axis=1).astype(np.int32)  # runs of equal labels
    labels[0, 0] = 6  # region 5 stays empty
    out = cm.region_mac(fmap, labels)
    np.testing.assert_array_equal(out.view(np.uint32), first_maximum_region_mac(fmap, labels).view(np.uint32))


def test_region_mac_errors():
    fmap = np.zeros((2, 3, 4), dtype=np.float32)
    labels = np.zeros((3, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="labels.*shape"):
        cm.region_mac(fmap, np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="labels.*int32"):
        cm.region_mac(fmap, labels.astype(np.int64))
    with pytest.raises(ValueError, match="feature_map.*float32"):
        cm.region_mac(fmap.astype(np.float64), labels)
    with pytest.raises(ValueError, match="feature_map.*3-D"):
        cm.region_mac(fmap[0], labels)
    with pytest.raises(ValueError, match="C-contiguous"):
        cm.region_mac(np.zeros((2, 4, 3), dtype=np.float32).transpose(0, 2, 1), labels)
    bad = fmap.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cm.region_mac(bad, labels)
    with pytest.raises(ValueError, match="largest label"):
        cm.region_mac(fmap, np.full((3, 4), 2**30, dtype=np.int32))
    with pytest.raises(ValueError, match="non-empty"):
        cm.region_mac(np.zeros((0, 3, 4), dtype=np.float32), labels)


# --- bounding boxes of regions (ClusterMAC's "box" pooling) --------------------------------------


def reference_region_boxes(labels):
    boxes = np.zeros((labels.max() + 1 if labels.size and labels.max() >= 0 else 0, 4), np.int32)
    for k in range(len(boxes)):
        ys, xs = np.nonzero(labels == k)
        if len(ys):
            boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


@pytest.mark.parametrize("seed", range(5))
def test_region_boxes_match_numpy(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 12, size=2)
    labels = rng.integers(-1, 6, size=(height, width)).astype(np.int32)
    np.testing.assert_array_equal(cm.region_boxes(labels), reference_region_boxes(labels))


def test_region_boxes_edge_cases():
    # Absent label 1 and the masked-out cells; one location; every label negative.
    labels = np.array([[0, 0, -1], [2, -1, -1]], np.int32)
    np.testing.assert_array_equal(cm.region_boxes(labels), [[0, 0, 2, 1], [0, 0, 0, 0], [0, 1, 1, 2]])
    np.testing.assert_array_equal(cm.region_boxes(np.zeros((1, 1), np.int32)), [[0, 0, 1, 1]])
    assert cm.region_boxes(np.full((2, 3), -1, np.int32)).shape == (0, 4)
    with pytest.raises(ValueError, match="labels.*int32"):
        cm.region_boxes(labels.astype(np.int64))
    with pytest.raises(ValueError, match="labels.*2-D"):
        cm.region_boxes(labels[0])
    with pytest.raises(ValueError, match="largest label"):
        cm.region_boxes(np.full((2, 2), 2**30, np.int32))


def test_box_pooling_is_the_mac_of_each_cluster_bounding_box():
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    fmap = random_map(rng, channels=5, height=6, width=8)
    labels = [rng.integers(0, 4, size=(6, 8)).astype(np.int32), np.array([[0] * 8] * 5 + [[2] * 8], np.int32)]
    backbone = SimpleNamespace(max_size=1024, dim=5)
    box = cm.Extractor(backbone, "clustermac", cluster_pooling="box").regional_vectors(fmap, None, labels)
    expected = [
        fmap[:, y0:y1, x0:x1].max(axis=(1, 2))
        for lab in labels
        for x0, y0, x1, y1 in reference_region_boxes(lab)
        if x1 > x0
    ]  # label 1 of the second map is absent: no region
    np.testing.assert_array_equal(box, np.array(expected))
    mask = cm.Extractor(backbone, "clustermac").regional_vectors(fmap, None, labels)
    np.testing.assert_array_equal(mask[:4], cm.region_mac(fmap, labels[0]))  # the paper's pooling stays the default
    with pytest.raises(ValueError, match="cluster_pooling"):
        cm.Extractor(backbone, "clustermac", cluster_pooling="bbox")


# --- R-MAC grid (Tolias et al. ICLR 2016) -------------------------------------------------------


def reference_rmac_regions(height, width, levels=3):
    """Tolias' rmac_regions.m, transcribed literally with NumPy (1-based step index)."""
    overlap = 0.4
    steps = np.array([2, 3, 4, 5, 6, 7], dtype=np.float64)
    w = min(height, width)
    b = (max(height, width) - w) / (steps - 1)
    idx = int(np.argmin(np.abs(((w**2 - w * b) / w**2) - overlap))) + 1
    wd = idx if height < width else 0
    hd = idx if height > width else 0
    regions = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = (width - wl) / (level + wd - 1) if level + wd - 1 > 0 else 0
        cen_w = np.floor(wl2 + np.arange(level - 1 + wd + 1) * bw) - wl2
        bh = (height - wl) / (level + hd - 1) if level + hd - 1 > 0 else 0
        cen_h = np.floor(wl2 + np.arange(level - 1 + hd + 1) * bh) - wl2
        if wl == 0:
            continue
        for y0 in cen_h:
            for x0 in cen_w:
                regions.append([int(x0), int(y0), int(x0) + wl, int(y0) + wl])
    return np.array(regions, dtype=np.int32).reshape(-1, 4)


@pytest.mark.parametrize(
    "height,width,levels",
    [(48, 64, 3), (64, 48, 3), (32, 32, 3), (24, 32, 3), (30, 40, 4), (7, 30, 3), (1, 1, 3), (2, 9, 3), (3, 100, 2)],
)
def test_rmac_regions_match_tolias_formula(height, width, levels):
    regions = cm.rmac_regions(height, width, levels)
    assert regions.dtype == np.int32
    np.testing.assert_array_equal(regions, reference_rmac_regions(height, width, levels))
    assert (regions[:, 0] >= 0).all() and (regions[:, 1] >= 0).all()
    assert (regions[:, 2] <= width).all() and (regions[:, 3] <= height).all()
    sides = regions[:, 2] - regions[:, 0]
    np.testing.assert_array_equal(sides, regions[:, 3] - regions[:, 1])  # square


def test_rmac_regions_vgg_map_has_twenty_regions():
    # 1024×768 image through VGG16 (stride 16): Tolias' ~20 regions over 3 levels.
    assert cm.rmac_regions(48, 64).shape == (20, 4)


def test_rmac_regions_errors():
    with pytest.raises(ValueError, match="height and width"):
        cm.rmac_regions(0, 5)
    with pytest.raises(ValueError, match="levels"):
        cm.rmac_regions(5, 5, 0)


def first_maximum_grid_mac(fmap, regions):
    """grid_mac's rule spelled out: each box's columns are maxed down the rows, then across, a value
    replacing the maximum only when strictly greater (the first of equal values, +0 or -0, stays)."""
    out = np.zeros((len(regions), fmap.shape[0]), dtype=np.float32)
    for r, (x0, y0, x1, y1) in enumerate(regions):
        column = fmap[:, y0, x0:x1].copy()
        for y in range(y0 + 1, y1):
            column = np.where(fmap[:, y, x0:x1] > column, fmap[:, y, x0:x1], column)
        best = column[:, 0].copy()
        for x in range(1, x1 - x0):
            best = np.where(column[:, x] > best, column[:, x], best)
        out[r] = best
    return out


@pytest.mark.parametrize("channels", [1, 7, 8, 9, 16, 17, 33, 48])
def test_grid_mac_keeps_the_first_of_equal_maxima_bit_for_bit(channels):
    """Ties between +0 and -0 resolve as in the scalar loop, on the 8-channel blocks of the AVX2
    path and the channels left over; boxes of one cell, one row, one column and the whole map."""
    rng = np.random.default_rng(100 + channels)
    fmap = rng.choice(np.array([-0.0, 0.0, 1.5, -2.0], dtype=np.float32), size=(channels, 7, 11))
    regions = [[0, 0, 11, 7], [3, 2, 4, 3], [0, 5, 11, 6], [10, 0, 11, 7]]
    for _ in range(12):
        x0, y0 = rng.integers(0, 11), rng.integers(0, 7)
        regions.append([x0, y0, rng.integers(x0 + 1, 12), rng.integers(y0 + 1, 8)])
    regions = np.array(regions, dtype=np.int32)
    out = cm.grid_mac(fmap, regions)
    np.testing.assert_array_equal(out.view(np.uint32), first_maximum_grid_mac(fmap, regions).view(np.uint32))


def test_grid_mac_matches_numpy_and_rejects_bad_regions():
    rng = np.random.default_rng(4)
    fmap = random_map(rng, channels=5, height=9, width=12, sparse=False)
    regions = cm.rmac_regions(9, 12)
    expected = np.stack([fmap[:, y0:y1, x0:x1].max(axis=(1, 2)) for x0, y0, x1, y1 in regions])
    np.testing.assert_array_equal(cm.grid_mac(fmap, regions), expected)
    for bad in ([0, 0, 13, 5], [-1, 0, 3, 3], [4, 0, 4, 3], [0, 5, 3, 10]):
        with pytest.raises(ValueError, match="outside the feature map"):
            cm.grid_mac(fmap, np.array([bad], dtype=np.int32))
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        cm.grid_mac(fmap, np.zeros((2, 3), dtype=np.int32))


# --- global pooling baselines ---------------------------------------------------------------------


def reference_spoc(fmap):
    _, h, w = fmap.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sigma = min(h, w) / 6.0
    weight = np.exp(-((ys - h / 2) ** 2 + (xs - w / 2) ** 2) / (2 * sigma**2))
    return (fmap.astype(np.float64) * weight).sum(axis=(1, 2))


def reference_gem(fmap, p):
    x = np.maximum(fmap.astype(np.float64), 1e-6)
    return (x**p).mean(axis=(1, 2)) ** (1.0 / p)


def reference_crow(fmap):
    x = fmap.astype(np.float64)
    s = np.maximum(x.sum(axis=0), 0)
    z = np.sqrt((s**2).sum())
    alpha = np.sqrt(s / z) if z > 0 else np.zeros_like(s)
    q = (x != 0).mean(axis=(1, 2))
    beta = np.log(q.sum() / (1e-6 + q)) if q.sum() > 0 else np.zeros_like(q)
    return beta * (x * alpha).sum(axis=(1, 2))


@pytest.mark.parametrize("shape", [(6, 5, 7), (3, 1, 1), (4, 2, 9)])
def test_global_pooling_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    fmap = random_map(rng, *shape)
    fmap[0] = 0.0  # an all-zero channel
    np.testing.assert_allclose(cm.spoc_pool(fmap), reference_spoc(fmap), rtol=1e-5, atol=1e-6)
    for p in (1.0, 3.0, 12.5):
        np.testing.assert_allclose(cm.gem_pool(fmap, p), reference_gem(fmap, p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cm.crow_pool(fmap), reference_crow(fmap), rtol=1e-5, atol=1e-6)


def test_global_pooling_constant_and_zero_maps():
    constant = np.full((3, 4, 5), 2.5, dtype=np.float32)
    np.testing.assert_allclose(cm.gem_pool(constant, 3.0), 2.5, rtol=1e-6)
    np.testing.assert_allclose(cm.gem_pool(constant * 1e4, 200.0), 2.5e4, rtol=1e-5)  # no overflow
    zeros = np.zeros((3, 4, 5), dtype=np.float32)
    np.testing.assert_array_equal(cm.crow_pool(zeros), 0.0)
    np.testing.assert_array_equal(cm.spoc_pool(zeros), 0.0)
    assert np.isfinite(cm.gem_pool(zeros)).all()


def test_gem_pool_rejects_bad_p():
    fmap = np.ones((2, 2, 2), dtype=np.float32)
    for p in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must be"):
            cm.gem_pool(fmap, p)


# --- aggregation (R-MAC / ClusterMAC) -------------------------------------------------------------


def reference_aggregate(regions, mean=None, projection=None):
    total = np.zeros(projection.shape[0] if projection is not None else regions.shape[1])
    for row in regions.astype(np.float64):
        norm = np.linalg.norm(row)
        if norm == 0:
            continue
        v = row / norm
        if projection is not None:
            v = (v - mean) @ projection.T.astype(np.float64)
            v = v / np.linalg.norm(v)
        total += v
    norm = np.linalg.norm(total)
    return total / norm if norm > 0 else total


def test_aggregate_regions_matches_numpy_and_skips_empty_regions():
    rng = np.random.default_rng(7)
    regions = np.abs(rng.standard_normal((6, 8))).astype(np.float32)
    regions[2] = 0.0  # an empty region
    mean, projection = cm.fit_pca_whitening(np.abs(rng.standard_normal((40, 8))).astype(np.float32), 5)
    np.testing.assert_allclose(cm.aggregate_regions(regions), reference_aggregate(regions), atol=1e-6)
    with_whitening = cm.aggregate_regions(regions, mean, projection)
    assert with_whitening.shape == (5,)
    np.testing.assert_allclose(with_whitening, reference_aggregate(regions, mean, projection), atol=1e-5)
    # The empty row must be skipped, not whitened into −mean·Pᵀ.
    np.testing.assert_allclose(
        cm.aggregate_regions(np.delete(regions, 2, axis=0), mean, projection), with_whitening, atol=1e-6
    )
    np.testing.assert_array_equal(cm.aggregate_regions(np.zeros((3, 8), dtype=np.float32)), 0.0)


def test_aggregate_region_groups_matches_numpy_per_group():
    rng = np.random.default_rng(8)
    sizes = np.array([3, 0, 20, 1, 2, 7], dtype=np.int64)  # an empty group too
    regions = np.abs(rng.standard_normal((int(sizes.sum()), 24))).astype(np.float32)
    regions[[0, 5, 23]] = 0.0  # empty regions
    regions[24:26] = 0.0  # group 4: every region empty -> a zero row
    mean, projection = cm.fit_pca_whitening(np.abs(rng.standard_normal((80, 24))).astype(np.float32), 16)
    groups = np.split(regions, np.cumsum(sizes)[:-1])
    for whitening in ((None, None), (mean, projection)):
        got = cm.aggregate_region_groups(regions, sizes, *whitening)
        assert got.shape == (len(sizes), 16 if whitening[0] is not None else 24) and got.dtype == np.float32
        for g, rows in enumerate(groups):
            np.testing.assert_allclose(got[g], reference_aggregate(rows, *whitening), atol=1e-5, err_msg=str(g))
            np.testing.assert_allclose(got[g], cm.aggregate_regions(rows, *whitening), atol=1e-6, err_msg=str(g))
        np.testing.assert_array_equal(got[1], 0.0)
        np.testing.assert_array_equal(got[4], 0.0)
    assert cm.aggregate_region_groups(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)).shape == (0, 4)


def test_aggregate_region_groups_errors():
    regions = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="group_sizes: expected counts adding up to the 4 rows"):
        cm.aggregate_region_groups(regions, np.array([1, 2]))
    with pytest.raises(ValueError, match="group_sizes: expected counts >= 0"):
        cm.aggregate_region_groups(regions, np.array([5, -1]))
    with pytest.raises(ValueError, match="group_sizes: expected a 1-D array"):
        cm.aggregate_region_groups(regions, np.array([[4]]))
    with pytest.raises(ValueError, match="NaN"):
        cm.aggregate_region_groups(np.full((2, 3), np.nan, dtype=np.float32), np.array([2]))


def test_aggregate_regions_errors():
    regions = np.ones((2, 4), dtype=np.float32)
    mean, projection = np.zeros(4, np.float32), np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="both"):
        cm.aggregate_regions(regions, mean, None)
    with pytest.raises(ValueError, match="mean"):
        cm.aggregate_regions(regions, np.zeros(3, np.float32), projection)
    with pytest.raises(ValueError, match="projection"):
        cm.aggregate_regions(regions, mean, np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cm.aggregate_regions(np.full((2, 4), np.nan, dtype=np.float32))
