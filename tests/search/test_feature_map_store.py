"""The 8-bit feature-map store (.cmfm): quantisation, the atomic writer, cluster labels, version 1 files."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import clustermac as cm

# --- 8-bit feature-map store ----------------------------------------------------------------------


def test_quantize_feature_map():
    rng = np.random.default_rng(40)
    fmap = np.maximum(rng.standard_normal((6, 4, 5)), 0).astype(np.float32)
    codes, scale = cm.quantize_feature_map(fmap)
    assert codes.dtype == np.uint8 and codes.max() == 255
    assert np.abs(codes * scale - fmap).max() <= scale / 2 + 1e-6
    codes, scale = cm.quantize_feature_map(np.zeros((2, 2, 2), np.float32))
    assert scale == 0.0 and codes.max() == 0
    with pytest.raises(ValueError, match="D×H×W"):
        cm.quantize_feature_map(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="finite"):
        cm.quantize_feature_map(np.full((1, 1, 1), np.nan, np.float32))


def test_store_roundtrip_and_atomic_writer(tmp_path):
    rng = np.random.default_rng(41)
    maps = [np.maximum(rng.standard_normal((8, 3 + i, 4 + 2 * i)), 0).astype(np.float32) for i in range(4)]
    path = tmp_path / "maps.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        for i, fmap in enumerate(maps):
            writer.add(fmap, f"image_{i}")
    store = cm.FeatureMapStore(path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a plain open's permissions
    assert len(store) == 4 and store.names == [f"image_{i}" for i in range(4)]
    for i, fmap in enumerate(maps):
        assert store.codes(i).shape == fmap.shape[1:] + (8,)
        np.testing.assert_allclose(store.feature_map(i), fmap, atol=store.scale(i) / 2 + 1e-6)
    np.testing.assert_allclose(store.feature_map(3, (1, 2, 5, 4)), maps[3][:, 2:4, 1:5], atol=store.scale(3) / 2 + 1e-6)
    with pytest.raises(ValueError, match="box"):
        store.feature_map(0, (0, 0, 99, 1))
    with pytest.raises(IndexError):
        store.codes(4)
    # An exception inside the writer leaves neither the target nor a temporary behind.
    with pytest.raises(RuntimeError):
        with cm.FeatureMapStoreWriter(tmp_path / "broken.cmfm") as writer:
            writer.add(maps[0], "a")
            raise RuntimeError("interrupted")
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock")) == ["maps.cmfm"]
    with cm.FeatureMapStoreWriter(tmp_path / "other.cmfm") as writer:
        writer.add(maps[0], "a")
        with pytest.raises(ValueError, match="8 channels"):
            writer.add(np.zeros((3, 2, 2), np.float32), "b")
    # Corrupt files are refused with a clear error.
    (tmp_path / "junk.cmfm").write_bytes(b"not a store" * 10)
    with pytest.raises(ValueError, match="not a clustermac feature-map store"):
        cm.FeatureMapStore(tmp_path / "junk.cmfm")
    truncated = path.read_bytes()[:200]
    (tmp_path / "truncated.cmfm").write_bytes(truncated)
    with pytest.raises(ValueError, match="truncated"):
        cm.FeatureMapStore(tmp_path / "truncated.cmfm")


def test_store_keeps_cluster_labels_and_reads_version_1_files(tmp_path):
    rng = np.random.default_rng(42)
    maps = [np.maximum(rng.standard_normal((5, 4, 6)), 0).astype(np.float32) for _ in range(3)]
    labels = [rng.integers(-1, 20, (4, 6)), rng.integers(0, 5, (4, 6)).astype(np.int8)]
    path = tmp_path / "labelled.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        writer.add(maps[0], "with", labels=labels)
        writer.add(maps[1], "without")
        writer.add(maps[2], "one", labels=[np.full((4, 6), 32767)])
    store = cm.FeatureMapStore(path)
    got = store.labels(0)
    assert len(got) == 2 and all(g.dtype == np.int32 and g.flags.c_contiguous for g in got)
    for g, expected in zip(got, labels):
        np.testing.assert_array_equal(g, expected)
    assert store.labels(1) == []
    np.testing.assert_array_equal(store.labels(2)[0], np.full((4, 6), 32767))
    for i, fmap in enumerate(maps):  # codes unaffected by the labels around them
        np.testing.assert_allclose(store.feature_map(i), fmap, atol=store.scale(i) / 2 + 1e-6)
    with cm.FeatureMapStoreWriter(tmp_path / "bad.cmfm") as writer:
        for bad, message in (
            ([np.zeros((4, 5), np.int32)], "shape"),
            ([np.zeros((4, 6), np.float32)], "integer"),
            ([np.full((4, 6), -2)], r"\[-1, 32767\]"),
            ([np.full((4, 6), 40000)], r"\[-1, 32767\]"),
        ):
            with pytest.raises(ValueError, match=message):
                writer.add(maps[0], "x", labels=bad)
    # A version-1 file (no labels: magic CMACFM01, 24-byte table rows) is still read.
    codes, scale = cm.quantize_feature_map(maps[0])
    payload = np.ascontiguousarray(codes.transpose(1, 2, 0)).tobytes()
    table = np.array(
        [(64, 5, 4, 6, scale)],
        dtype=[("offset", "<u8"), ("channels", "<u4"), ("height", "<u4"), ("width", "<u4"), ("scale", "<f4")],
    )
    names = json.dumps(["old"]).encode()
    table_offset = 64 + len(payload)
    blob = (
        struct.pack("<8sQQ", b"CMACFM01", table_offset, 1).ljust(64, b"\0")
        + payload
        + table.tobytes()
        + struct.pack("<Q", len(names))
        + names
    )
    (tmp_path / "v1.cmfm").write_bytes(blob)
    old = cm.FeatureMapStore(tmp_path / "v1.cmfm")
    assert old.names == ["old"] and old.labels(0) == []
    np.testing.assert_array_equal(old.codes(0), store.codes(0))
