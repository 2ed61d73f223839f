"""A compressed FAISS index trained on a seeded sample: built by `Index.train` / `clustermac index
--backend faiss`, searched with a per-call nprobe, checked against our exact top-k on planted data."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import clustermac as cm
from clustermac import Index
from clustermac.cli import build_parser, main

faiss = pytest.importorskip("faiss")

N, DIM, N_QUERIES = 20000, 64, 200
# 4-bit PQ codes: FAISS 1.15 trains 8-bit sub-quantizers in about 1 s each here, too slow for a test.
FACTORY = "IVF256,PQ32x4"


def _normalised(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    """20,000 unit vectors in 20 broad clusters, and 200 queries that are noisy copies of database rows."""
    rng = np.random.default_rng(13)
    centres = rng.standard_normal((20, DIM))
    database = _normalised(centres[rng.integers(0, 20, N)] + 1.5 * rng.standard_normal((N, DIM)))
    planted_rows = rng.choice(N, size=N_QUERIES, replace=False)
    queries = _normalised(database[planted_rows] + 0.03 * rng.standard_normal((N_QUERIES, DIM)))
    _, exact = cm.topk_search(database, queries, 1, 0)
    assert (exact[:, 0] == planted_rows).all()  # each query's true nearest neighbour is its original
    return database, queries, exact[:, 0]


def write_descriptors(out, vectors):
    """A `load_descriptors`-valid pair (format 2): desc.npy, then desc.json with its size and SHA-256."""
    np.save(out, vectors)
    data = out.read_bytes()
    manifest = {
        "format": "clustermac.descriptors",
        "version": 2,
        "images": [f"img{i:06d}.jpg" for i in range(vectors.shape[0])],
        "failed": {},
        "settings": {"method": "rmac", "dim": vectors.shape[1], "whitened": False},
        "fingerprint": "0" * 64,
        "data": {
            "dtype": "<f4",
            "rows": vectors.shape[0],
            "dim": vectors.shape[1],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }
    out.with_suffix(".json").write_text(json.dumps(manifest))
    vectors_back, _ = cm.load_descriptors(out)
    assert vectors_back.shape == vectors.shape


def faiss_bytes(folder):
    return (folder / (folder / "CURRENT").read_text().strip() / "faiss.index").read_bytes()


def top1_recall(index, queries, exact, **options):
    _, found = index.search(queries, 1, **options)
    return float(np.mean(found[:, 0] == exact))


def test_cli_ivfpq_finds_the_exact_top1_and_records_its_training(tmp_path, planted, capsys):
    database, queries, exact = planted
    write_descriptors(tmp_path / "desc.npy", database)
    out = tmp_path / "idx"
    argv = ["index", str(tmp_path / "desc.npy"), "--out", str(out), "--backend", "faiss", "--factory", FACTORY]
    assert main([*argv, "--train-size", "10000", "--nprobe", "16", "--seed", "0"]) == 0
    assert "FAISS IVF256,PQ32x4 index of 20000 images" in capsys.readouterr().out
    index = Index.load(out)
    assert index.backend == "faiss" and len(index) == N and index.names[5] == "img000005.jpg"
    assert index.info["faiss"] == {"factory": FACTORY, "nprobe": 16, "train_size": 10000, "train_seed": 0}
    assert index.info["settings"]["method"] == "rmac"
    assert top1_recall(index, queries, exact) >= 0.95  # the stored nprobe 16
    # The per-call override reaches the IVF lists: one list finds fewer than many.
    few, many = top1_recall(index, queries, exact, nprobe=1), top1_recall(index, queries, exact, nprobe=64)
    assert many >= 0.95 and few < many - 0.05, (few, many)
    assert top1_recall(index, queries, exact) == top1_recall(index, queries, exact, nprobe=16)


def test_cli_training_sample_is_seeded(tmp_path, planted):
    database = planted[0][:4000]
    write_descriptors(tmp_path / "desc.npy", database)

    def build(name, seed):
        argv = ["index", str(tmp_path / "desc.npy"), "--out", str(tmp_path / name), "--backend", "faiss"]
        assert main([*argv, "--factory", "IVF16,PQ8x4", "--train-size", "1000", "--seed", str(seed)]) == 0
        return faiss_bytes(tmp_path / name)

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first == again
    assert first != other


def test_cli_adds_in_chunks_after_training_on_the_sample(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    vectors = _normalised(rng.standard_normal((70000, 4)))
    write_descriptors(tmp_path / "desc.npy", vectors)
    trained, added = [], []
    real_train, real_add = Index.train, Index.add
    monkeypatch.setattr(
        Index, "train", lambda self, sample: (trained.append(np.array(sample)), real_train(self, sample))
    )
    monkeypatch.setattr(Index, "add", lambda self, v, names: (added.append(len(v)), real_add(self, v, names)))
    argv = ["index", str(tmp_path / "desc.npy"), "--out", str(tmp_path / "idx"), "--backend", "faiss"]
    assert main([*argv, "--factory", "IVF8,Flat", "--train-size", "3000", "--seed", "5"]) == 0
    assert added == [65536, 70000 - 65536]
    expected_rows = np.sort(np.random.default_rng(5).choice(70000, size=3000, replace=False))
    assert len(trained) == 1
    np.testing.assert_array_equal(trained[0], vectors[expected_rows])
    assert Index.load(tmp_path / "idx").info["faiss"]["train_size"] == 3000


def test_cli_bad_factory_and_too_few_training_vectors_are_one_line_errors(tmp_path, planted, capsys):
    write_descriptors(tmp_path / "desc.npy", planted[0][:500])
    argv = ["index", str(tmp_path / "desc.npy"), "--out", str(tmp_path / "idx"), "--backend", "faiss"]
    assert main([*argv, "--factory", "IVF256,Bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'IVF256,Bogus'" in err and "Traceback" not in err
    assert main([*argv, "--factory", "IVF1024,PQ16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # FAISS may print a warning first
    assert err.startswith("clustermac: error:") and "'IVF1024,PQ16'" in err and "1024" in err and "500" in err
    assert not (tmp_path / "idx" / "CURRENT").exists()


def test_cli_options_parse():
    parser = build_parser()
    args = parser.parse_args(["index", "d.npy", "--out", "x"])
    assert (args.backend, args.train_size, args.nprobe, args.seed) == ("exact", 100000, 16, 0)
    args = parser.parse_args(["search", "q.jpg", "--index", "x", "--nprobe", "4", "--efsearch", "128"])
    assert (args.nprobe, args.efsearch) == (4, 128)
    assert parser.parse_args(["search", "q.jpg", "--index", "x"]).nprobe is None
    for bad in (
        ["search", "q.jpg", "--index", "x", "--nprobe", "0"],
        ["index", "d.npy", "--out", "x", "--train-size", "0"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_train_then_add_round_trips_and_search_parameters(tmp_path, planted):
    database, queries, exact = planted
    names = [str(i) for i in range(N)]
    # A composite factory (a rotation before the IVF-PQ, an IndexPreTransform like OPQ's; OPQ itself
    # trains 8-bit sub-quantizers, seconds each here).
    index = Index(DIM, "faiss", faiss_factory="PCAR64," + FACTORY, faiss_nprobe=8)
    assert not index.is_trained
    index.train(database[::4])
    assert index.is_trained and len(index) == 0
    for start in range(0, N, 6000):
        index.add(database[start : start + 6000], names[start : start + 6000])
    with pytest.raises(ValueError, match="already holds"):
        index.train(database[:1000])
    # nprobe reaches the IVF inside the pre-transform.
    assert top1_recall(index, queries, exact, nprobe=64) >= 0.95
    assert top1_recall(index, queries, exact, nprobe=1) < top1_recall(index, queries, exact, nprobe=64) - 0.05
    before = index.search(queries, 10, nprobe=32)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    after = loaded.search(queries, 10, nprobe=32)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(index.search(queries, 5)[1], loaded.search(queries, 5)[1])  # stored nprobe 8


def test_train_validates_and_add_without_train_still_trains(planted):
    database = planted[0][:3000]
    index = Index(DIM, "faiss", faiss_factory="IVF16,Flat")
    with pytest.raises(ValueError, match="sample"):
        index.train(np.where(np.arange(DIM) == 3, np.nan, database[:100]))
    with pytest.raises(ValueError, match="shape"):
        index.train(database[:, :10])
    with pytest.raises(ValueError, match="needs at least 16 training vectors.*got 10"):
        index.train(database[:10])
    index.add(database, [str(i) for i in range(3000)])  # the first batch trains, as before
    assert index.is_trained and len(index) == 3000
    with pytest.raises(ValueError, match="nprobe"):
        index.search(database[:2], 3, nprobe=0)
    # The exact backend: train() validates and does nothing; nprobe / efsearch are ignored.
    exact = Index(DIM)
    exact.train(database)
    assert exact.is_trained and len(exact) == 0
    with pytest.raises(ValueError, match="sample"):
        exact.train(np.full((2, DIM), np.inf))
    exact.add(database, [str(i) for i in range(3000)])
    np.testing.assert_array_equal(
        exact.search(database[:5], 3)[1], exact.search(database[:5], 3, nprobe=1, efsearch=1)[1]
    )


def test_efsearch_reaches_hnsw(planted):
    database, queries, exact = planted
    index = Index(DIM, "faiss", faiss_factory="HNSW16")
    index.add(database[:5000], [str(i) for i in range(5000)])
    index.search(queries[:3], 1, efsearch=7)
    assert faiss.downcast_index(index._faiss_index).hnsw.efSearch == 7
    ivf_hnsw = Index(DIM, "faiss", faiss_factory="IVF64_HNSW8,Flat")
    ivf_hnsw.add(database[:5000], [str(i) for i in range(5000)])
    ivf_hnsw.search(queries[:3], 1, nprobe=3, efsearch=9)
    ivf = faiss.extract_index_ivf(ivf_hnsw._faiss_index)
    assert ivf.nprobe == 3 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 9
