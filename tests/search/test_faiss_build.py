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


# ---------------------------------------------------------------------------------- at scale
@pytest.fixture(scope="module")
def mapped(planted, tmp_path_factory):
    """The planted database as a memory-mapped .npy (as `load_descriptors` returns it), and an IVF-PQ index
    built from it by a seeded training sample and chunked adds."""
    database, queries, exact = planted
    file = tmp_path_factory.mktemp("mapped") / "database.npy"
    np.save(file, database)
    vectors = np.load(file, mmap_mode="r")
    index = Index(DIM, "faiss", faiss_factory=FACTORY, faiss_nprobe=16)
    assert index.add_trained_on_sample(vectors, [f"img{i:06d}.jpg" for i in range(N)], 5000, 0, 3000) == 5000
    index.attach_vectors(file)
    return file, index


def exact_top_k_of_candidates(database, queries, candidates, k):
    """Plain NumPy: float32 dot products of each query with its candidates, best k (ties: smaller row)."""
    scores = np.einsum("qrd,qd->qr", database[candidates], queries).astype(np.float32)
    order = np.lexsort((candidates, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def test_index_from_a_mapped_array_finds_the_planted_top1_and_round_trips_mapped(tmp_path, planted, mapped):
    database, queries, exact = planted
    file, index = mapped
    assert top1_recall(index, queries, exact) >= 0.95
    before = index.search(queries, 10)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")  # memory-mapped: IVF lists stay on disk
    assert loaded._faiss_mapped is not None
    for got, want in zip(loaded.search(queries, 10), before):
        np.testing.assert_array_equal(got, want)
    in_memory = Index.load(tmp_path / "idx", mmap=False)
    assert in_memory._faiss_mapped is None
    np.testing.assert_array_equal(in_memory.search(queries, 10)[1], before[1])
    assert loaded.names[:2] == ["img000000.jpg", "img000001.jpg"] and len(loaded.names) == N


def test_rescore_is_the_exact_top_k_of_the_candidates_and_survives_save(tmp_path, planted, mapped):
    database, queries, exact = planted
    file, index = mapped
    _, candidates = index.search(queries, 50)
    want_scores, want_rows = exact_top_k_of_candidates(database, queries, candidates, 10)
    scores, rows = index.search(queries, 10, rescore=50)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    assert (rows[:, 0] == exact).mean() >= 0.95
    # rescore < k: k candidates are re-scored.
    assert index.search(queries[:3], 5, rescore=2)[1].shape == (3, 5)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.search(queries, 10, rescore=50)[1], want_rows)


def test_rescore_source_missing_changed_or_absent_is_a_clear_error(tmp_path, planted):
    database = planted[0][:3000]
    np.save(tmp_path / "db.npy", database)
    index = Index(DIM, "faiss", faiss_factory="IVF16,Flat")
    index.add_trained_on_sample(np.load(tmp_path / "db.npy", mmap_mode="r"), [str(i) for i in range(3000)], 1000)
    with pytest.raises(ValueError, match="no float vectors recorded"):
        index.search(database[:2], 3, rescore=10)
    index.attach_vectors(tmp_path / "db.npy")
    index.save(tmp_path / "idx")
    np.save(tmp_path / "db.npy", database[::-1].copy())  # re-extracted in another order
    with pytest.raises(cm.CorruptFileError, match="db.npy.*changed since the index was built"):
        Index.load(tmp_path / "idx").search(database[:2], 3, rescore=10)
    (tmp_path / "db.npy").unlink()
    with pytest.raises(cm.CorruptFileError, match="db.npy.*missing"):
        Index.load(tmp_path / "idx").search(database[:2], 3, rescore=10)
    with pytest.raises(cm.CorruptFileError, match="db.npy.*missing"):
        index.attach_vectors(tmp_path / "db.npy")
    np.save(tmp_path / "small.npy", database[:10, :8])
    with pytest.raises(ValueError, match="small.npy: vectors of dimension 8"):
        index.attach_vectors(tmp_path / "small.npy")
    np.save(tmp_path / "big.npy", np.concatenate([database, database[:1]]))
    with pytest.raises(ValueError, match="big.npy: 3001 vectors from row 0 do not fit an index of 3000 rows"):
        index.attach_vectors(tmp_path / "big.npy")


@pytest.mark.parametrize("factory", ["IVF16,PQ8x4", "SQ8"])
def test_append_and_remove_then_save_and_load(tmp_path, planted, factory):
    database, queries, exact = planted
    first, more = database[:4000], database[4000:5000]
    np.save(tmp_path / "first.npy", first)
    np.save(tmp_path / "more.npy", more)
    index = Index(DIM, "faiss", faiss_factory=factory, faiss_nprobe=16)
    index.add_trained_on_sample(first, [f"a{i}" for i in range(4000)], 2000)
    index.attach_vectors(tmp_path / "first.npy")
    index.save(tmp_path / "idx")
    grown = Index.load(tmp_path / "idx")  # memory-mapped where FAISS can: changes read it into memory first
    grown.add(more, [f"b{i}" for i in range(1000)])
    grown.attach_vectors(tmp_path / "more.npy", first_row=4000)
    gone = [f"a{i}" for i in range(0, 4000, 3)] + ["b7"]
    assert grown.remove(gone) == len(gone)
    with pytest.raises(ValueError, match=r"1 not in the index: 'a0'"):
        grown.remove(["a0", "a1"])
    grown.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    kept = [f"a{i}" for i in range(4000) if i % 3] + [f"b{i}" for i in range(1000) if i != 7]
    assert loaded.names == kept
    vectors = np.concatenate([first[[i % 3 != 0 for i in range(4000)]], np.delete(more, 7, axis=0)])
    # Each kept vector finds itself (row numbers were renumbered 0 .. len-1), re-scored exactly.
    probe = np.arange(0, len(kept), 97)
    scores, rows = loaded.search(vectors[probe], 3, rescore=20)
    assert (rows[:, 0] == probe).mean() >= 0.95
    np.testing.assert_allclose(scores[:, 0][rows[:, 0] == probe], 1.0, atol=1e-5)
    # A removed vector no longer comes back.
    removed_rows = loaded.search(first[::3][:50], 5)[1]
    assert all(kept[r].startswith(("a", "b")) for r in removed_rows.ravel() if r >= 0)
    assert not any(r >= 0 and kept[r] in set(gone) for r in removed_rows.ravel())


def test_remove_from_hnsw_is_a_clear_error(planted):
    index = Index(DIM, "faiss", faiss_factory="HNSW8")
    index.add(planted[0][:200], [str(i) for i in range(200)])
    with pytest.raises(ValueError, match="'HNSW8' cannot remove vectors"):
        index.remove(["3"])
    assert len(index) == 200


def test_exact_backend_remove_and_dimension_mismatch(planted):
    database = planted[0][:50]
    index = Index(DIM)
    index.add(database, [str(i) for i in range(50)])
    assert index.remove(["0", "10"]) == 2 and len(index) == 48
    np.testing.assert_array_equal(index.vectors([0, 9]), database[[1, 11]])
    with pytest.raises(ValueError, match=rf"vectors: expected an array of shape \(n, {DIM}\)"):
        index.add(database[:, :5], ["x"])


def test_cli_append_remove_and_rescore(tmp_path, planted, capsys):
    database, queries, exact = planted
    write_descriptors(tmp_path / "desc.npy", database[:3000])
    out = tmp_path / "idx"
    argv = ["index", str(tmp_path / "desc.npy"), "--out", str(out), "--backend", "faiss"]
    assert main([*argv, "--factory", "IVF16,PQ8x4", "--train-size", "2000"]) == 0
    built = Index.load(out)
    np.testing.assert_array_equal(
        built.search(database[:20], 5, rescore=40)[1],
        exact_top_k_of_candidates(database, database[:20], built.search(database[:20], 40)[1], 5)[1],
    )
    (tmp_path / "more").mkdir()
    write_descriptors(tmp_path / "more" / "desc.npy", database[3000:3500])  # names img000000 ... again
    (tmp_path / "gone.txt").write_text("img000001.jpg\nimg000002.jpg\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["index", "--remove", str(tmp_path / "gone.txt"), "--out", str(out)]) == 0
    assert main(["index", str(tmp_path / "more" / "desc.npy"), "--append", "--out", str(out)]) == 0
    assert "0 images removed, 500 added, 3498 now" in capsys.readouterr().out
    index = Index.load(out)
    assert len(index) == 3498 and index.names[0] == "img000000.jpg" and index.names[1] == "img000003.jpg"
    assert index.names[2998] == "img000000.jpg"  # the first appended row
    _, rows = index.search(database[3000:3010], 1, rescore=30)
    np.testing.assert_array_equal(rows[:, 0], np.arange(2998, 3008))
    # Bad inputs: an unknown name, another dimension, no descriptors.
    (tmp_path / "unknown.txt").write_text("nope.jpg\n", encoding="utf-8")
    assert main(["index", "--remove", str(tmp_path / "unknown.txt"), "--out", str(out)]) != 0
    assert "unknown.txt" in capsys.readouterr().err
    (tmp_path / "narrow").mkdir()
    write_descriptors(tmp_path / "narrow" / "desc.npy", database[:10, :16])
    assert main(["index", str(tmp_path / "narrow" / "desc.npy"), "--append", "--out", str(out)]) != 0
    assert "desc.npy" in capsys.readouterr().err
    assert len(Index.load(out)) == 3498  # nothing changed
