"""The feature-map store (.cmfm): forged or damaged files are CorruptFileError at open, never an
out-of-bounds read later; one writer per file; a killed writer leaves the previous store."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clustermac import CorruptFileError, FeatureMapStore, FeatureMapStoreWriter, OutputLockedError

TIMEOUT = 120
ROW = 36  # bytes per table row of format 2: offset u8, channels/height/width u4, scale f4, labels u8, partitions u4


def write_store(path: Path, n: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with FeatureMapStoreWriter(path) as writer:
        for i in range(n):
            fmap = rng.random((4, 3, 5)).astype(np.float32)
            writer.add(fmap, f"img{i}", labels=[rng.integers(-1, 3, size=(3, 5))])


def table_offset(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 8)[0]


def patched(path: Path, position: int, value: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[position : position + len(value)] = value
    out = path.with_name(f"bad-{position}-{value.hex()[:16]}.cmfm")
    out.write_bytes(bytes(data))
    return out


def test_forged_and_damaged_stores_are_corrupt_file_errors(tmp_path):
    path = tmp_path / "maps.cmfm"
    write_store(path)
    data = path.read_bytes()
    table = table_offset(data)
    names_at = table + 3 * ROW
    cases = [
        # 0.1.0: "cannot reshape array of size 0" on access; now refused at open.
        (patched(path, table, struct.pack("<Q", 2**64 - 16)), "map 0 lies outside the payload"),
        # 0.1.0: UnicodeDecodeError from a forged count.
        (patched(path, 16, struct.pack("<Q", 2)), "the names take"),
        (patched(path, 16, struct.pack("<Q", 2**62)), "declares 4611686018427387904 maps"),
        (patched(path, 8, struct.pack("<Q", 2**63)), "table offset"),
        (patched(path, names_at + 10, b"\xff\xfe"), "unreadable names"),
        (patched(path, names_at, struct.pack("<Q", 2**63)), "the names take"),
        (patched(path, table + 8, struct.pack("<I", 2**31)), "map 0 lies outside|channels"),
        (patched(path, table + ROW + 12, struct.pack("<I", 0)), "map 1 has an empty shape"),
        (patched(path, table + 2 * ROW + 20, struct.pack("<f", float("nan"))), "map 2 has the scale nan"),
        (patched(path, table + 24, struct.pack("<Q", 2**64 - 2)), "map 0 lies outside the payload"),
        (patched(path, table + 32, struct.pack("<I", 2**32 - 1)), "map 0 lies outside the payload"),
        (patched(path, 0, b"CMACFM09"), "not a clustermac feature-map store"),
    ]
    truncated = tmp_path / "truncated.cmfm"
    truncated.write_bytes(data[: len(data) - 5])
    cases.append((truncated, "the names take"))
    short = tmp_path / "short.cmfm"
    short.write_bytes(data[:40])
    cases.append((short, "too short"))
    for file, problem in cases:
        with pytest.raises(CorruptFileError, match=problem) as error:
            FeatureMapStore(file)
        assert error.value.path == file
    assert FeatureMapStore(path).names == ["img0", "img1", "img2"]


def test_a_label_below_minus_one_is_reported_when_read(tmp_path):
    path = tmp_path / "maps.cmfm"
    write_store(path, n=1)
    store = FeatureMapStore(path)
    labels_at = int(store._table["labels_offset"][0])
    del store
    bad = patched(path, labels_at, struct.pack("<h", -7))
    with pytest.raises(CorruptFileError, match="label below -1"):
        FeatureMapStore(bad).labels(0)


def test_kill_while_writing_keeps_the_previous_store_and_the_next_writer_cleans_up(tmp_path, run_python):
    path = tmp_path / "maps.cmfm"
    write_store(path, n=2, seed=1)
    before = path.read_bytes()
    result = run_python(
        f"""
        import numpy as np
        from clustermac import FeatureMapStoreWriter
        with FeatureMapStoreWriter({str(path)!r}) as writer:
            writer.add(np.ones((4, 3, 5), np.float32), "new")
        """,
        {"CLUSTERMAC_CRASH_AT": "feature_map_store_close:1"},
    )
    assert result.returncode == -9, result.stderr
    assert path.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the killed writer's temporary file
    write_store(path, n=1, seed=2)
    assert len(FeatureMapStore(path)) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_second_writer_gets_output_locked_error(tmp_path):
    path = tmp_path / "maps.cmfm"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom clustermac import FeatureMapStoreWriter\n"
            f"with FeatureMapStoreWriter({str(path)!r}):\n"
            "    print('open', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OutputLockedError) as error:
            FeatureMapStoreWriter(path)
        assert error.value.holder["pid"] == holder.pid
    finally:
        holder.communicate("\n", timeout=TIMEOUT)
    assert holder.returncode == 0
    assert len(FeatureMapStore(path)) == 0  # the holder's (empty) store
    write_store(path)
    assert len(FeatureMapStore(path)) == 3


def test_aml_rerank_refuses_a_nan_descriptor_naming_the_candidate(tmp_path):
    from clustermac import aml_rerank

    path = tmp_path / "maps.cmfm"
    write_store(path, n=3)
    store = FeatureMapStore(path)
    query_descriptor = np.ones(4, np.float32) / 2

    def descriptor_fn(crop):
        # Dequantised crops are finite; a damaged whitening (say) can still make NaN.
        return np.full(4, np.nan if crop.sum() == store.feature_map(1).sum() else 0.5, np.float32)

    def whole_map_descriptor(crop):
        return np.full(4, 0.5, np.float32)

    # 0.1.0 returned NaN scores here; now a clear error names the candidate.
    with pytest.raises(ValueError, match=r"descriptor_fn: returned NaN or Inf for candidate 1 \(position 2"):
        aml_rerank(
            np.ones(4, np.float32), query_descriptor, [2, 0, 1], store, _Whole(store, descriptor_fn), n_threads=1
        )
    result = aml_rerank(np.ones(4, np.float32), query_descriptor, [2, 0, 1], store, whole_map_descriptor, qe_k=0)
    assert np.isfinite(result.scores).all()


class _Whole:
    """A descriptor function that sees the whole map of each candidate (from_store)."""

    def __init__(self, store, fn):
        self.store, self.fn = store, fn

    def __call__(self, crop):
        return self.fn(crop)

    def from_store(self, store, index, box):
        return self.fn(store.feature_map(index))
