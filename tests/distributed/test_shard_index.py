"""`clustermac index` on a shard folder with the FAISS backend: trained on a sample and filled shard
by shard from the memory-mapped shards; planted queries find their row; save/load round-trips."""

import numpy as np
import pytest

import clustermac
from clustermac.cli import main
from clustermac.descriptors.store import settings_fingerprint
from clustermac.distributed.shards import ShardWriter

pytest.importorskip("faiss", reason="faiss-cpu is not installed")


def _write_shards(folder, vectors, names, shard_size):
    settings = {"method": "planted", "whitened": False, "dim": vectors.shape[1]}
    writer = ShardWriter(folder, names, settings, shard_size, settings_fingerprint(settings, names, shard_size))
    for number, chunk in enumerate(writer.shards):
        start = number * shard_size
        writer.write_shard(number, vectors[start : start + len(chunk)], {})
    return writer.publish()


def test_faiss_index_from_shards_finds_planted_queries(tmp_path):
    rng = np.random.default_rng(11)
    count, dim = 3000, 48
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"img{i:05d}.jpg" for i in range(count)]
    folder = tmp_path / "shards"
    manifest = _write_shards(folder, vectors, names, shard_size=700)
    assert [s["rows"] for s in manifest["shards"]] == [700, 700, 700, 700, 200]

    out = tmp_path / "index"
    args = ["index", str(folder), "--out", str(out), "--backend", "faiss", "--factory", "IVF32,SQ8"]
    assert main([*args, "--nprobe", "8", "--train-size", "1500"]) == 0
    planted = rng.choice(count, size=200, replace=False)
    queries = vectors[planted] + 0.02 * rng.standard_normal((200, dim)).astype(np.float32)
    index = clustermac.Index.load(out)
    assert len(index) == count and index.names == names
    _, found = index.search(queries, k=1)
    assert np.mean(found[:, 0] == planted) >= 0.95
    again = clustermac.Index.load(out)  # a second load answers identically
    np.testing.assert_array_equal(again.search(queries, k=5)[1], index.search(queries, k=5)[1])
