"""Exact top-k search and the Index against a NumPy brute force (ties broken by index)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import clustermac as cm
from clustermac import Index


def brute_force(database, queries, k):
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(database.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def listing(folder):
    """The files in a folder, without the output locks (``.NAME.lock``) that writers leave."""
    return sorted(name for name in os.listdir(folder) if not name.endswith(".lock"))


def integer_vectors(rng, n, d):
    # Small integers: every dot product is exact in float32, and there are many ties.
    return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("n,q,d,k", [(1000, 13, 16, 50), (257, 7, 5, 257), (31, 1, 3, 1), (600, 20, 37, 10)])
@pytest.mark.parametrize("threads", [1, 3])
def test_topk_search_identical_to_brute_force_with_ties(n, q, d, k, threads):
    rng = np.random.default_rng(n + d)
    database, queries = integer_vectors(rng, n, d), integer_vectors(rng, q, d)
    scores, indices = cm.topk_search(database, queries, k, threads)
    ref_scores, ref_indices = brute_force(database, queries, k)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_topk_search_more_queries_than_one_chunk():
    # Queries are processed 4096 at a time; rows of later chunks must land in the right place.
    rng = np.random.default_rng(9)
    database, queries = integer_vectors(rng, 700, 6), integer_vectors(rng, 9000, 6)
    scores, indices = cm.topk_search(database, queries, 5, 2)
    ref_scores, ref_indices = brute_force(database, queries, 5)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_topk_search_real_valued_and_memmap(tmp_path):
    rng = np.random.default_rng(1)
    database = cm.l2_normalize(rng.standard_normal((3000, 24)).astype(np.float32))
    queries = cm.l2_normalize(rng.standard_normal((9, 24)).astype(np.float32))
    path = tmp_path / "db.npy"
    np.save(path, database)
    mapped = np.load(path, mmap_mode="r")
    scores, indices = cm.topk_search(mapped, queries, 20)
    ref_scores, ref_indices = brute_force(database, queries, 20)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # Real-valued scores: indices agree wherever the reference has no near-tie.
    gaps = np.abs(np.diff(ref_scores, axis=1)) > 1e-5
    np.testing.assert_array_equal(indices[:, :-1][gaps], ref_indices[:, :-1][gaps])


def test_topk_search_errors():
    database = np.zeros((10, 4), np.float32)
    queries = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= N = 10"):
        cm.topk_search(database, queries, 11)
    with pytest.raises(ValueError, match="k"):
        cm.topk_search(database, queries, 0)
    with pytest.raises(ValueError, match="queries.*columns"):
        cm.topk_search(database, np.zeros((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match="database.*float32"):
        cm.topk_search(database.astype(np.float64), queries, 3)
    bad = database.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="database: row 7"):
        cm.topk_search(bad, queries, 3)
    bad_queries = queries.copy()
    bad_queries[1, 0] = np.inf
    with pytest.raises(ValueError, match="queries: row 1"):
        cm.topk_search(database, bad_queries, 3)
    with pytest.raises(ValueError, match="at least one row"):
        cm.topk_search(np.zeros((0, 4), np.float32), queries, 1)


def names_for(start, count):
    return [f"image_{i:05d}.jpg" for i in range(start, start + count)]


def test_index_add_search_chunks_and_names():
    rng = np.random.default_rng(2)
    database = integer_vectors(rng, 700, 12)
    index = Index(12)
    index.add(database[:5], names_for(0, 5))
    index.add(database[5:400], names_for(5, 395))
    index.add(database[400], "image_00400.jpg")  # one vector
    index.add(database[401:].astype(np.float64), names_for(401, 299))
    # Force a multi-chunk index to exercise the merge across chunks.
    index._chunks = [database[:250].copy(), database[250:251].copy(), database[251:].copy()]
    assert len(index) == 700 and index.names[400] == "image_00400.jpg"
    queries = integer_vectors(rng, 6, 12)
    scores, indices = index.search(queries, k=40)
    ref_scores, ref_indices = brute_force(database, queries, 40)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    np.testing.assert_array_equal(index.vectors(indices[:, :3]), database[indices[:, :3]])
    # k larger than the index is capped; a single query vector works.
    scores, indices = index.search(queries[0], k=10_000)
    assert indices.shape == (1, 700)


def test_index_copies_added_vectors():
    vectors = np.ones((3, 4), np.float32)
    index = Index(4)
    index.add(vectors, ["a", "b", "c"])
    vectors[:] = -1.0
    np.testing.assert_array_equal(index.vectors([0, 1, 2]), 1.0)


def test_index_save_load_roundtrip_mmap_and_overwrite(tmp_path):
    rng = np.random.default_rng(3)
    database = cm.l2_normalize(rng.standard_normal((500, 16)).astype(np.float32))
    index = Index(16)
    index.add(database, names_for(0, 500))
    path = tmp_path / "index"
    index.save(path)
    assert listing(tmp_path) == ["index"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # a plain mkdir's permissions
    loaded = Index.load(path)  # mmap
    assert isinstance(loaded._chunks[0], np.memmap)
    assert loaded.names == index.names
    queries = database[:4]
    for a, b in zip(loaded.search(queries, 7), index.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    # Add to the mapped index and save over the same path (the old file is still mapped).
    extra = cm.l2_normalize(rng.standard_normal((3, 16)).astype(np.float32))
    loaded.add(extra, ["x", "y", "z"])
    loaded.save(path)
    reloaded = Index.load(path, mmap=False)
    assert len(reloaded) == 503 and reloaded.names[-1] == "z"
    np.testing.assert_array_equal(reloaded.vectors([500, 501, 502]), extra)
    assert listing(tmp_path) == ["index"]


def test_index_save_refuses_foreign_path_and_failed_save_leaves_old_index(tmp_path, monkeypatch):
    index = Index(4)
    index.add(np.eye(4, dtype=np.float32), list("abcd"))
    foreign = tmp_path / "notes.txt"
    foreign.write_text("keep me")
    with pytest.raises(ValueError, match="not a clustermac index"):
        index.save(foreign)
    assert foreign.read_text() == "keep me"
    path = tmp_path / "index"
    index.save(path)
    bigger = Index(4)
    bigger.add(np.ones((6, 4), np.float32), list("uvwxyz"))

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Index, "_write_vectors", broken_write)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    monkeypatch.undo()
    assert Index.load(path).names == list("abcd")
    assert listing(tmp_path) == ["index", "notes.txt"]
    assert sorted(os.listdir(path)) == ["CURRENT", (path / "CURRENT").read_text()]  # no staging folder left


def test_index_errors(tmp_path):
    with pytest.raises(ValueError, match="dim"):
        Index(0)
    with pytest.raises(ValueError, match="backend"):
        Index(4, backend="annoy")
    index = Index(4)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.add(np.zeros((2, 5), np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="expected 2 names"):
        index.add(np.zeros((2, 4), np.float32), ["a"])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 4), np.nan, np.float32), ["a"])
    with pytest.raises(ValueError, match="strings"):
        index.add(np.zeros((1, 4), np.float32), [3])
    index.add(np.eye(4, dtype=np.float32), list("abcd"))
    with pytest.raises(ValueError, match="k"):
        index.search(np.zeros(4, np.float32), k=0)
    with pytest.raises(ValueError, match="indices"):
        index.vectors([4])
    with pytest.raises(ValueError, match="not a clustermac index"):
        Index.load(tmp_path)


def test_faiss_backend_same_interface(tmp_path):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    database = cm.l2_normalize(rng.standard_normal((400, 16)).astype(np.float32))
    index = Index(16, backend="faiss", faiss_factory="Flat")
    index.add(database, names_for(0, 400))
    scores, indices = index.search(database[:5], k=3)
    ref_scores, ref_indices = brute_force(database, database[:5], 3)
    np.testing.assert_array_equal(indices[:, 0], np.arange(5))
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    compressed = Index(16, backend="faiss")  # SQ8, trained on the first batch
    compressed.add(database, names_for(0, 400))
    _, indices = compressed.search(database[:5], k=1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(5))
    compressed.save(tmp_path / "faiss_index")
    loaded = Index.load(tmp_path / "faiss_index")
    assert loaded.backend == "faiss" and len(loaded) == 400
    np.testing.assert_array_equal(loaded.search(database[:5], k=1)[1][:, 0], np.arange(5))
    # The saved index is FAISS's own file: FAISS reads it back with every vector, compressed.
    version = tmp_path / "faiss_index" / (tmp_path / "faiss_index" / "CURRENT").read_text()
    files = [p for p in version.iterdir() if p.name.endswith(".index")]
    assert len(files) == 1
    raw = faiss.read_index(str(files[0]))
    assert raw.ntotal == 400 and raw.d == 16
    approx, _ = compressed.search(database[:5], k=1)
    assert np.abs(approx[:, 0] - 1.0).max() > 0  # 8-bit codes: self-similarity not exactly 1
    np.testing.assert_allclose(approx[:, 0], 1.0, atol=0.05)


def test_faiss_backend_missing_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="pip install"):
        Index(8, backend="faiss")


def test_damaged_index_folders_are_refused_with_the_file_named(tmp_path):
    rng = np.random.default_rng(9)
    # The files of an index in the 0.1.0 layout (no checksums to catch the damage first).
    good = tmp_path / "good"
    good.mkdir()
    np.save(good / "vectors.npy", rng.standard_normal((3, 4)).astype(np.float32))
    (good / "names.json").write_text('["a", "b", "c"]')
    meta = {"format": "clustermac-index", "version": 1, "dim": 4, "count": 3, "backend": "exact"}
    (good / "meta.json").write_text(json.dumps(meta))

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    cases = [
        (lambda f: (f / "names.json").write_text("[not json"), "names.json: not readable JSON"),
        (lambda f: (f / "names.json").write_text('["a", "b"]'), r"names.json: expected a list of 3 names"),
        (
            lambda f: (f / "meta.json").write_text(
                json.dumps({**json.loads((f / "meta.json").read_text()), "version": 99})
            ),
            "not a clustermac index of version 1 or 2",
        ),
        (
            lambda f: np.save(f / "vectors.npy", np.zeros((3, 4), np.float64)),
            r"vectors.npy: expected C-contiguous float32",
        ),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            Index.load(damaged(f"bad{i}", change))
    assert Index.load(good).names == ["a", "b", "c"]


def test_faiss_backend_refusals(tmp_path):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(10)
    vectors = cm.l2_normalize(rng.standard_normal((20, 8)).astype(np.float32))
    index = Index(8, backend="faiss", faiss_factory="Flat")
    index.add(vectors, names_for(0, 20))
    # FAISS stores codes, not the vectors: the exact-only accessors say so.
    with pytest.raises(ValueError, match="faiss backend stores compressed codes"):
        index.vectors([0])
    with pytest.raises(ValueError, match="faiss backend stores compressed codes"):
        next(index.iter_chunks())
    # An IVF index trained on a first batch smaller than its number of lists.
    ivf = Index(8, backend="faiss", faiss_factory="IVF64,Flat")
    with pytest.raises(ValueError, match=r"must be trained on the first add\(\) batch.*20 vectors"):
        ivf.add(vectors, names_for(0, 20))
    # A faiss.index file that disagrees with names.json (checksums made consistent).
    index.save(tmp_path / "f")
    version = tmp_path / "f" / (tmp_path / "f" / "CURRENT").read_text()
    names = json.dumps(names_for(0, 20)[:-1]).encode()
    (version / "names.json").write_bytes(names)
    meta = json.loads((version / "meta.json").read_text())
    meta["files"]["names.json"] = {"size": len(names), "sha256": hashlib.sha256(names).hexdigest()}
    for compact in ("names.utf8", "names.offsets.npy"):  # as a format-2 index with JSON names
        del meta["files"][compact]
    (version / "meta.json").write_text(json.dumps({**meta, "count": 19, "version": 2}))
    with pytest.raises(ValueError, match="faiss.index: its header says 20 vectors of dimension 8; meta.json 19"):
        Index.load(tmp_path / "f")
    assert faiss.read_index(str(version / "faiss.index")).ntotal == 20
