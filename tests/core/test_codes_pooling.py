"""Max-pooling on 8-bit feature-map codes inside an AML box: region_mac_codes (ClusterMAC's
per-cluster MAC) and grid_mac_codes (R-MAC's regions).

Checked against plain NumPy references (dequantise code · scale in float32, crop to the box,
max per label or region) and, bit for bit, against region_mac on dequantize_codes' crop.
"""

import numpy as np
import pytest

import clustermac as cm
from clustermac import _core


def region_mac_codes_reference(codes, labels, box, scale):
    """Dequantise, crop codes and labels to the box, max per label; K from the whole label map."""
    n_labels = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    values = codes.astype(np.float32) * np.float32(scale)  # H × W × D
    x0, y0, x1, y1 = box if box is not None else (0, 0, codes.shape[1], codes.shape[0])
    values, crop_labels = values[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    out = np.zeros((n_labels, codes.shape[2]), np.float32)
    for k in range(n_labels):
        cells = values[crop_labels == k]  # (cells in cluster k ∩ box) × D
        if len(cells):
            out[k] = cells.max(axis=0)
    return out


def region_mac_of_dequantised_crop(codes, labels, box, scale, n_labels):
    """The float path: region_mac on dequantize_codes' crop, padded with zero rows to n_labels."""
    x0, y0, x1, y1 = box if box is not None else (0, 0, codes.shape[1], codes.shape[0])
    crop = _core.dequantize_codes(codes, box, scale)
    rows = cm.region_mac(crop, np.ascontiguousarray(labels[y0:y1, x0:x1]))
    padded = np.zeros((n_labels, codes.shape[2]), np.float32)
    padded[: len(rows)] = rows
    return padded


def check_against_references(codes, labels, box, scale):
    got = _core.region_mac_codes(codes, labels, box, scale)
    expected = region_mac_codes_reference(codes, labels, box, scale)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, region_mac_of_dequantised_crop(codes, labels, box, scale, len(expected)))
    return got


@pytest.mark.parametrize("channels", [1, 37, 512])
def test_region_mac_codes_equals_numpy_reference(channels, random_codes):
    rng = np.random.default_rng(channels)
    height, width = 11, 14
    codes = random_codes(rng, height, width, channels)
    scale = 0.0371
    label_maps = {
        "random with masked cells": rng.integers(-1, 6, (height, width)).astype(np.int32),
        # Blocky clusters (neighbours share a label, as NCut clusters do) with an unused label 3.
        "blocks with a gap": np.kron(rng.choice([0, 1, 2, 4, 5], (4, 5)), np.ones((3, 3), np.int32))[
            :height, :width
        ].astype(np.int32),
        "one cluster": np.zeros((height, width), np.int32),
        "more clusters than cells in small boxes": rng.permutation(height * width)
        .reshape(height, width)
        .astype(np.int32),
    }
    boxes = [None, (0, 0, width, height), (3, 2, 12, 9), (5, 4, 6, 5), (0, 8, 14, 11), (13, 10, 14, 11), (0, 0, 1, 11)]
    for name, labels in label_maps.items():
        for box in boxes:
            got = check_against_references(codes, labels, box, scale)
            assert len(got) == labels.max() + 1, name  # K from the whole map, whatever the box


def test_cluster_outside_the_box_gives_a_zero_row(random_codes):
    rng = np.random.default_rng(5)
    codes = np.full((6, 8, 9), 200, np.uint8)  # no zero code anywhere: a zero row can only mean "no cell"
    labels = np.zeros((6, 8), np.int32)
    labels[:, 6:] = 2  # cluster 2 only in the two right columns; cluster 1 nowhere (a gap)
    labels[0, 0] = -1
    got = check_against_references(codes, labels, (0, 0, 6, 6), 0.5)
    assert got.shape == (3, 9)
    np.testing.assert_array_equal(got[0], np.full(9, 100.0, np.float32))
    np.testing.assert_array_equal(got[1], np.zeros(9))  # unused label
    np.testing.assert_array_equal(got[2], np.zeros(9))  # present, but only outside the box
    # The same box plus one column of cluster 2 brings its row back.
    got = check_against_references(codes, labels, (0, 0, 7, 6), 0.5)
    np.testing.assert_array_equal(got[2], np.full(9, 100.0, np.float32))
    # Masked cells are ignored even when they hold the largest codes.
    codes = random_codes(rng, 6, 8, 9)
    codes[labels < 0] = 255
    check_against_references(codes, labels, None, 0.25)


def test_all_masked_and_one_location(random_codes):
    rng = np.random.default_rng(7)
    codes = random_codes(rng, 4, 5, 37)
    # Every label negative: K = 0, an empty 0 × D result (as region_mac gives).
    masked = np.full((4, 5), -1, np.int32)
    masked[1, 2] = -7
    got = _core.region_mac_codes(codes, masked, None, 1.0)
    assert got.shape == (0, 37) and got.dtype == np.float32
    assert _core.region_mac_codes(codes, masked, (1, 1, 3, 3), 1.0).shape == (0, 37)
    # Every cell of the box masked but a cluster elsewhere: that cluster's row is zero.
    labels = masked.copy()
    labels[3, 4] = 1
    got = check_against_references(codes, labels, (0, 0, 3, 3), 1.0)
    np.testing.assert_array_equal(got, np.zeros((2, 37)))
    # A map of one location.
    one = rng.integers(1, 256, (1, 1, 7), dtype=np.uint8)
    got = check_against_references(one, np.array([[2]], np.int32), None, 2.5)
    np.testing.assert_array_equal(got[2], one[0, 0].astype(np.float32) * np.float32(2.5))
    np.testing.assert_array_equal(got[:2], np.zeros((2, 7)))
    got = _core.region_mac_codes(one, np.array([[-1]], np.int32), np.array([0, 0, 1, 1], np.int64), 2.5)
    assert got.shape == (0, 7)


def test_region_mac_codes_edge_values(random_codes):
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 5, 4, 33)
    labels = rng.integers(0, 3, (5, 4)).astype(np.int32)
    # Zero scale (an all-zero map is stored with scale 0): every row is +0.
    got = _core.region_mac_codes(codes, labels, None, 0.0)
    np.testing.assert_array_equal(got, np.zeros((3, 33)))
    assert not np.signbit(got).any()
    # All codes 255 and a scale that is not exactly representable: the float of the dequantised map.
    full = np.full((5, 4, 33), 255, np.uint8)
    got = check_against_references(full, labels, (1, 1, 3, 4), 0.1)
    present = np.unique(labels[1:4, 1:3])
    np.testing.assert_array_equal(got[present], np.full((len(present), 33), np.float32(255) * np.float32(0.1)))
    # Constant codes: every present cluster gives the constant.
    constant = np.full((6, 6, 5), 9, np.uint8)
    got = check_against_references(constant, np.arange(36, dtype=np.int32).reshape(6, 6) % 4, None, 1.0)
    np.testing.assert_array_equal(got, np.full((4, 5), 9.0, np.float32))
    # A scale near the float32 limit that keeps 255·scale finite.
    check_against_references(codes, labels, None, 1e36)
    # Read-only views (what FeatureMapStore returns from a memory map) are accepted.
    readonly_codes, readonly_labels = codes.copy(), labels.copy()
    readonly_codes.setflags(write=False)
    readonly_labels.setflags(write=False)
    np.testing.assert_array_equal(
        _core.region_mac_codes(readonly_codes, readonly_labels, None, 0.5),
        region_mac_codes_reference(codes, labels, None, 0.5),
    )


def test_region_mac_codes_on_a_vgg16_sized_map(random_codes):
    """A 48 × 64 × 512 map with 20 blocky clusters, as in re-ranking, against both references."""
    rng = np.random.default_rng(20)
    codes = random_codes(rng, 48, 64, 512)
    labels = np.kron(rng.integers(0, 20, (6, 8)), np.ones((8, 8), np.int32)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.05] = -1
    for box in [None, (7, 5, 40, 31), (60, 0, 64, 48)]:
        check_against_references(codes, labels, box, 0.0123)


def test_region_mac_codes_errors():
    codes = np.zeros((6, 8, 4), np.uint8)
    labels = np.zeros((6, 8), np.int32)
    cases = [
        ((codes, labels, (0, 0, 9, 6), 1.0), r"box.*0 <= x0 < x1 <= 8.*got \[0, 0, 9, 6\)"),  # outside the map
        ((codes, labels, (-1, 0, 2, 2), 1.0), r"box.*got \[-1, 0, 2, 2\)"),
        ((codes, labels, (0, 0, 8, 7), 1.0), r"box.*0 <= y0 < y1 <= 6"),
        ((codes, labels, (3, 1, 3, 4), 1.0), r"box.*x0 < x1"),  # empty
        ((codes, labels, (0, 2, 4, 2), 1.0), r"box.*y0 < y1"),
        ((codes, labels, (0, 0, 4), 1.0), r"box: expected 4 values.*got 3"),
        ((codes, labels, (0.0, 0.5, 4.0, 4.0), 1.0), r"box: expected 4 integers"),
        ((codes, labels, "0044", 1.0), r"box: expected 4 integers.*'0044'"),
        ((codes, labels, (0, 0, 2**70, 4), 1.0), r"box: expected 4 integers"),
        ((codes, labels.astype(np.int64), None, 1.0), r"labels: expected dtype int32.*int64"),
        ((codes, labels.astype(np.float32), None, 1.0), r"labels: expected dtype int32.*float32"),
        ((codes, labels.tolist(), None, 1.0), r"labels: expected a NumPy array.*list"),
        ((codes, labels.ravel(), None, 1.0), r"labels: expected a 2-D array.*\(48,\)"),
        ((codes, labels[:5], None, 1.0), r"labels: expected shape \(6, 8\).*got .*\(5, 8\)"),
        ((codes, labels.T.copy(), None, 1.0), r"labels: expected shape \(6, 8\).*\(8, 6\)"),
        ((codes, np.zeros((6, 16), np.int32)[:, ::2], None, 1.0), r"labels: expected a C-contiguous"),
        ((codes, np.full((6, 8), 1 << 20, np.int32), None, 1.0), r"labels: the largest label is 1048576.*K <= 1048576"),
        ((codes, np.full((6, 8), 2**31 - 1, np.int32), (0, 0, 1, 1), 1.0), r"labels: the largest label is 2147483647"),
        ((codes.astype(np.uint16), labels, None, 1.0), r"codes: expected dtype uint8.*uint16"),
        ((codes.astype(np.float32), labels, None, 1.0), r"codes: expected dtype uint8.*float32"),
        ((codes.tolist(), labels, None, 1.0), r"codes: expected a uint8 NumPy array.*list"),
        ((np.zeros((6, 8), np.uint8), labels, None, 1.0), r"codes: expected a 3-D array.*\(6, 8\)"),
        ((np.zeros((6, 16, 4), np.uint8)[:, ::2], labels, None, 1.0), r"codes: expected a C-contiguous"),
        ((np.zeros((0, 8, 4), np.uint8), np.zeros((0, 8), np.int32), None, 1.0), r"codes: expected a non-empty"),
        ((np.zeros((6, 8, 0), np.uint8), labels, None, 1.0), r"codes: expected a non-empty.*\(6, 8, 0\)"),
        ((codes, labels, None, -1.0), r"scale: expected a finite number >= 0, got -1"),
        ((codes, labels, None, float("nan")), r"scale: expected a finite number >= 0"),
        ((codes, labels, None, float("inf")), r"scale: expected a finite number >= 0"),
        ((codes, labels, None, 1e38), r"scale: .*255·scale finite"),  # 255 · scale overflows float32
        ((codes, labels, None, 1e300), r"scale: .*255·scale finite"),  # finite as a double, not as a float
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            _core.region_mac_codes(*arguments)
    with pytest.raises(TypeError):  # scale must be a number
        _core.region_mac_codes(codes, labels, None, "1.0")


# --- R-MAC inside a box straight from the 8-bit codes ------------------------------------------


def grid_mac_codes_reference(codes, box, regions, scale):
    """Dequantise (code · scale in float32), go to D×H×W, crop to the box, max per region."""
    fmap = (codes.astype(np.float32) * np.float32(scale)).transpose(2, 0, 1)
    if box is not None:
        x0, y0, x1, y1 = box
        fmap = fmap[:, y0:y1, x0:x1]
    out = np.zeros((len(regions), codes.shape[2]), np.float32)
    for r, (x0, y0, x1, y1) in enumerate(regions):
        out[r] = fmap[:, y0:y1, x0:x1].max(axis=(1, 2))
    return out


def random_regions_sharing_columns(rng, height, width, count=12):
    """Regions in random order over a few column ranges, with disjoint, overlapping and nested rows
    (the kernel takes the rows' maxima once per column range)."""
    columns = []
    for _ in range(3):
        x0 = int(rng.integers(0, width))
        columns.append((x0, int(rng.integers(x0 + 1, width + 1))))
    regions = []
    for _ in range(count):
        x0, x1 = columns[int(rng.integers(0, len(columns)))]
        y0 = int(rng.integers(0, height))
        regions.append((x0, y0, x1, int(rng.integers(y0 + 1, height + 1))))
    return np.array(regions, np.int32)


@pytest.mark.parametrize("channels", [1, 37, 64, 100])
def test_grid_mac_codes_equals_numpy_reference(channels, random_codes):
    rng = np.random.default_rng(channels)
    height, width = 13, 17
    codes = random_codes(rng, height, width, channels)
    scale = 0.0371
    boxes = [None, (0, 0, width, height), (3, 2, 15, 11), (6, 4, 7, 5), (0, 9, 17, 13), (16, 12, 17, 13)]
    for box in boxes:
        x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
        h, w = y1 - y0, x1 - x0
        region_sets = [
            _core.rmac_regions(h, w),
            _core.rmac_regions(h, w, 1),
            np.array([[0, 0, 1, 1]], np.int32),  # one cell
            np.array([[0, 0, w, h]], np.int32),  # the whole box
            np.array([[w - 1, h - 1, w, h], [0, h - 1, w, h]], np.int32),
            np.zeros((0, 4), np.int32),  # no region at all
            random_regions_sharing_columns(rng, h, w),
        ]
        for regions in region_sets:
            got = _core.grid_mac_codes(codes, box, regions, scale)
            assert got.dtype == np.float32 and got.shape == (len(regions), channels)
            np.testing.assert_array_equal(got, grid_mac_codes_reference(codes, box, regions, scale))
            if len(regions):
                # Bit for bit the float path: grid_mac on dequantize_codes' crop.
                crop = _core.dequantize_codes(codes, box, scale)
                np.testing.assert_array_equal(got, _core.grid_mac(crop, regions))


def test_grid_mac_codes_edge_values(random_codes):
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 5, 4, 33)
    regions = _core.rmac_regions(5, 4)
    # Zero scale (an all-zero map is stored with scale 0): everything is 0.
    np.testing.assert_array_equal(_core.grid_mac_codes(codes, None, regions, 0.0), np.zeros((len(regions), 33)))
    # All codes 255 and a scale that is not exactly representable: the same float as the dequantised map.
    full = np.full((5, 4, 33), 255, np.uint8)
    got = _core.grid_mac_codes(full, (1, 1, 3, 4), np.array([[0, 0, 2, 3]], np.int32), 0.1)
    np.testing.assert_array_equal(got, np.full((1, 33), np.float32(255) * np.float32(0.1)))
    # A map of one location, and integer-like box values from NumPy.
    one = rng.integers(0, 256, (1, 1, 7), dtype=np.uint8)
    box = np.array([0, 0, 1, 1], np.int32)
    got = _core.grid_mac_codes(one, box, np.array([[0, 0, 1, 1]], np.int32), 2.5)
    np.testing.assert_array_equal(got[0], one[0, 0].astype(np.float32) * np.float32(2.5))
    # Constant codes: every region gives the constant.
    constant = np.full((6, 6, 5), 9, np.uint8)
    np.testing.assert_array_equal(
        _core.grid_mac_codes(constant, None, _core.rmac_regions(6, 6), 1.0),
        np.full((len(_core.rmac_regions(6, 6)), 5), 9.0, np.float32),
    )
    # A read-only memory-mapped-like view (what FeatureMapStore.codes returns) is accepted.
    readonly = codes.copy()
    readonly.setflags(write=False)
    np.testing.assert_array_equal(
        _core.grid_mac_codes(readonly, None, regions, 0.5), grid_mac_codes_reference(codes, None, regions, 0.5)
    )


def test_grid_mac_codes_errors():
    codes = np.zeros((6, 8, 4), np.uint8)
    regions = np.array([[0, 0, 2, 2]], np.int32)
    cases = [
        ((codes, (0, 0, 9, 6), regions, 1.0), r"box.*0 <= x0 < x1 <= 8"),  # outside the map
        ((codes, (-1, 0, 2, 2), regions, 1.0), r"box.*got \[-1, 0, 2, 2\)"),
        ((codes, (0, 0, 8, 7), regions, 1.0), r"box.*0 <= y0 < y1 <= 6"),
        ((codes, (3, 1, 3, 4), regions, 1.0), r"box.*x0 < x1"),  # empty
        ((codes, (0, 2, 4, 2), regions, 1.0), r"box.*y0 < y1"),
        ((codes, (0, 0, 4), regions, 1.0), r"box: expected 4 values"),
        ((codes, (0.0, 0.5, 4.0, 4.0), regions, 1.0), r"box: expected 4 integers"),
        ((codes, "0044", regions, 1.0), r"box"),
        (
            (codes, (0, 0, 2, 2), np.array([[0, 0, 3, 2]], np.int32), 1.0),
            r"regions: row 0 = \[0, 0, 3, 2\).*outside the box",
        ),
        ((codes, (0, 0, 2, 2), np.array([[0, 0, 2, 2], [1, 1, 1, 2]], np.int32), 1.0), r"regions: row 1.*empty"),
        ((codes, None, np.array([[0, -1, 2, 2]], np.int32), 1.0), r"regions: row 0"),
        ((codes, None, regions.astype(np.int64), 1.0), r"regions: expected dtype int32"),
        ((codes, None, np.array([0, 0, 2, 2], np.int32), 1.0), r"regions: expected a 2-D array"),
        ((codes, None, np.zeros((1, 3), np.int32), 1.0), r"regions: expected shape \(R, 4\)"),
        ((codes.astype(np.uint16), None, regions, 1.0), r"codes: expected dtype uint8.*uint16"),
        ((codes.astype(np.float32), None, regions, 1.0), r"codes: expected dtype uint8.*float32"),
        ((codes.tolist(), None, regions, 1.0), r"codes: expected a uint8 NumPy array.*list"),
        ((np.zeros((6, 8), np.uint8), None, regions, 1.0), r"codes: expected a 3-D array.*\(6, 8\)"),
        ((np.zeros((6, 16, 4), np.uint8)[:, ::2], None, regions, 1.0), r"codes: expected a C-contiguous"),
        ((np.zeros((0, 8, 4), np.uint8), None, regions, 1.0), r"codes: expected a non-empty"),
        ((codes, None, regions, -1.0), r"scale: expected a finite number >= 0, got -1"),
        ((codes, None, regions, float("nan")), r"scale: expected a finite number >= 0"),
        ((codes, None, regions, float("inf")), r"scale: expected a finite number >= 0"),
        ((codes, None, regions, 1e38), r"scale: .*255·scale finite"),  # 255 · scale overflows float32
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            _core.grid_mac_codes(*arguments)
