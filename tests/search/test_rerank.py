"""AML localisation against exhaustive search, AML re-ranking, and R-MAC / ClusterMAC inside a box."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac as cm
from clustermac import _core

# --- reference: score every box exactly --------------------------------------------------------


def all_box_scores(fmap, query, p=10.0):
    """Cosine of the query with (sum x^p)^(1/p) for every box [x0, y0, x1, y1), in float64.

    Each box is summed directly: an integral image's four-corner difference leaves a residue of
    ~1e-16 of a channel's total where the channel is 0 in the box, which the 1/p-th root lifts to
    a few hundredths of the channel and which moved these cosines by ~1e-4."""
    d, h, w = fmap.shape
    v = (fmap.astype(np.float64) / fmap.max()) ** p
    q = query.astype(np.float64) / np.linalg.norm(query)
    scores = {}
    for x0 in range(w):
        for x1 in range(x0 + 1, w + 1):
            columns = v[:, :, x0:x1].sum(axis=2)
            for y0 in range(h):
                for y1 in range(y0 + 1, h + 1):
                    f = columns[:, y0:y1].sum(axis=1) ** (1.0 / p)
                    norm = np.linalg.norm(f)
                    scores[(x0, y0, x1, y1)] = f @ q / norm if norm > 0 else 0.0
    return scores


def aspect_ok(box, query_aspect, tolerance):
    x0, y0, x1, y1 = box
    ratio = (x1 - x0) / (y1 - y0)
    return query_aspect / tolerance <= ratio <= query_aspect * tolerance


def to_codes(fmap):
    codes, _ = cm.quantize_feature_map(fmap)
    return np.ascontiguousarray(codes.transpose(1, 2, 0))


# --- AML box search ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_aml_step_one_equals_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    fmap = (rng.random((19, 6, 8)) ** 3).astype(np.float32)
    query = fmap[:, 1:4, 2:6].max(axis=(1, 2)) + 0.05 * rng.random(19).astype(np.float32)
    scores = all_box_scores(fmap, query)
    best = max(scores, key=scores.get)
    box, score = cm.aml_localize(fmap, query, step=1, refine_iterations=0)
    assert scores[tuple(box)] >= scores[best] - 1e-5
    assert score == pytest.approx(scores[best], abs=1e-4)


@pytest.mark.parametrize("query_aspect", [1.0, 0.5, 1.6])
def test_aml_aspect_constraint_equals_constrained_exhaustive_search(query_aspect):
    rng = np.random.default_rng(10)
    fmap = (rng.random((16, 7, 9)) ** 4).astype(np.float32)
    query = fmap[:, 0:5, 3:8].max(axis=(1, 2))
    scores = all_box_scores(fmap, query)
    allowed = {b: s for b, s in scores.items() if aspect_ok(b, query_aspect, 1.1)}
    best = max(allowed, key=allowed.get)
    box, score = cm.aml_localize(fmap, query, step=1, query_aspect=query_aspect, aspect_tolerance=1.1)
    assert aspect_ok(tuple(box), query_aspect, 1.1)
    assert allowed[tuple(box)] >= allowed[best] - 1e-5
    assert score == pytest.approx(allowed[best], abs=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_aml_grid_search_then_refinement(seed, planted_object_map):
    rng = np.random.default_rng(20 + seed)
    fmap, query = planted_object_map(rng)
    scores = all_box_scores(fmap, query)
    # Grid corners: multiples of 3 and the far borders (W = 13, H = 11).
    grid = {
        b: s
        for b, s in scores.items()
        if b[0] % 3 == 0 and b[1] % 3 == 0 and (b[2] % 3 == 0 or b[2] == 13) and (b[3] % 3 == 0 or b[3] == 11)
    }
    grid_best = max(grid.values())
    box, score = cm.aml_localize(fmap, query, step=3, refine_iterations=0)
    assert score == pytest.approx(grid_best, abs=1e-4)
    refined_box, refined = cm.aml_localize(fmap, query, step=3, refine_iterations=5)
    assert refined >= score - 1e-9
    assert refined <= max(scores.values()) + 1e-4
    assert scores[tuple(refined_box)] == pytest.approx(refined, abs=1e-4)
    # The planted object (off the 3-cell grid) is found exactly by the refinement.
    np.testing.assert_array_equal(refined_box, [3, 2, 9, 7])
    assert tuple(box) != (3, 2, 9, 7)


def test_aml_codes_agree_with_float_map(planted_object_map):
    rng = np.random.default_rng(30)
    fmap, query = planted_object_map(rng, channels=40, height=12, width=16)
    codes = to_codes(fmap)
    dequantised = np.ascontiguousarray(codes.transpose(2, 0, 1), dtype=np.float32)
    for kwargs in ({}, {"query_aspect": 1.2}, {"p": 3.5, "step": 2}, {"p": 7.0}):
        box_f, score_f = cm.aml_localize(dequantised, query, **kwargs)
        box_c, score_c = _core.aml_localize_codes(codes, query, **kwargs)
        np.testing.assert_array_equal(box_f, box_c)
        # Sums that should be 0 come out of double integral images as ±1e-14·total, which the
        # 1/p-th root (p = 10) lifts to a few hundredths: cosines agree to ~1e-4, not better.
        assert score_f == pytest.approx(score_c, abs=2e-4)


def test_aml_channel_absent_from_the_box_counts_exactly_zero():
    # Channel 0 fires hard only in the left columns; the best box lies to their right. Its sum
    # there must be exactly 0 (a rounding residue of subtracted sums would be lifted by the
    # 10th root to a few percent of the channel's maximum and change the score).
    rng = np.random.default_rng(40)
    fmap = np.zeros((8, 9, 12), np.float32)
    fmap[0, :, :3] = 40.0 + 10.0 * rng.random((9, 3)).astype(np.float32)
    fmap[1:, 3:9, 6:12] = rng.random((7, 6, 6)).astype(np.float32) + 0.5
    query = np.concatenate([[0.0], fmap[1:, 3:9, 6:12].max(axis=(1, 2))]).astype(np.float32)
    scores = all_box_scores(fmap, query)
    box, score = cm.aml_localize(fmap, query, step=3, refine_iterations=0)
    assert box[0] >= 3  # channel 0 stays out
    assert score == pytest.approx(scores[tuple(box)], abs=2e-6)
    box_c, score_c = _core.aml_localize_codes(to_codes(fmap), query, step=3, refine_iterations=0)
    np.testing.assert_array_equal(box_c, box)


def test_aml_tenth_root_path_agrees_with_the_general_root(planted_object_map):
    # p = 10 takes the dedicated 10th root; p = 10.0001 the general exp2(log2(S)/p).
    rng = np.random.default_rng(41)
    fmap, query = planted_object_map(rng, channels=48, height=14, width=17)
    codes = to_codes(fmap)
    for kwargs in ({}, {"query_aspect": 1.2}, {"step": 2, "refine_iterations": 0}):
        box_ten, score_ten = _core.aml_localize_codes(codes, query, p=10.0, **kwargs)
        box_general, score_general = _core.aml_localize_codes(codes, query, p=10.0001, **kwargs)
        np.testing.assert_array_equal(box_ten, box_general)
        assert score_ten == pytest.approx(score_general, abs=1e-4)


def test_aml_edge_cases():
    one = np.ones((5, 1, 1), np.float32)
    box, score = cm.aml_localize(one, np.ones(5, np.float32))
    np.testing.assert_array_equal(box, [0, 0, 1, 1])
    assert score == pytest.approx(1.0, abs=1e-5)
    zeros = np.zeros((3, 4, 4), np.float32)
    box, score = cm.aml_localize(zeros, np.ones(3, np.float32))
    assert score == 0.0 and box[2] > box[0] and box[3] > box[1]
    # No grid box meets an extreme aspect constraint: the whole map is the start.
    box, _ = cm.aml_localize(
        np.ones((2, 3, 3), np.float32), np.ones(2, np.float32), query_aspect=20.0, refine_iterations=0
    )
    np.testing.assert_array_equal(box, [0, 0, 3, 3])


def test_aml_errors():
    fmap = np.ones((3, 4, 5), np.float32)
    query = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="query_vector: expected length D = 3"):
        cm.aml_localize(fmap, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="all zeros"):
        cm.aml_localize(fmap, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="negative"):
        cm.aml_localize(-fmap, query)
    bad = fmap.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cm.aml_localize(bad, query)
    for kwargs, message in (
        ({"p": 0}, "p:"),
        ({"step": 0}, "step"),
        ({"aspect_tolerance": 0.9}, "aspect_tolerance"),
        ({"refine_iterations": -1}, "refine_iterations"),
        ({"query_aspect": -2.0}, "query_aspect"),
    ):
        with pytest.raises(ValueError, match=message):
            cm.aml_localize(fmap, query, **kwargs)
    with pytest.raises(ValueError, match="uint8"):
        _core.aml_localize_codes(fmap, query)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.aml_localize_codes(np.ones((5, 4, 3), np.uint8).transpose(1, 0, 2), query)


# --- re-ranking -------------------------------------------------------------------------------------


def mac_descriptor(crop):
    return cm.l2_normalize(np.ascontiguousarray(crop.max(axis=(1, 2)), dtype=np.float32))


def test_aml_rerank_promotes_images_containing_the_query_object(tmp_path):
    rng = np.random.default_rng(50)
    channels = 32
    object_pattern = np.maximum(rng.standard_normal((channels, 4, 5)), 0).astype(np.float32) * 3.0
    maps, relevant = [], []
    for i in range(12):
        fmap = np.maximum(rng.standard_normal((channels, 10, 14)), 0).astype(np.float32)  # clutter
        if i % 3 == 0:  # the object, pasted at a random place
            y, x = rng.integers(0, 6), rng.integers(0, 9)
            fmap[:, y : y + 4, x : x + 5] = np.maximum(fmap[:, y : y + 4, x : x + 5], object_pattern)
            relevant.append(i)
        maps.append(fmap)
    path = tmp_path / "db.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        for i, fmap in enumerate(maps):
            writer.add(fmap, f"im{i}")
    store = cm.FeatureMapStore(path)
    query_mac = object_pattern.max(axis=(1, 2))
    query_descriptor = mac_descriptor(object_pattern)
    initial = np.arange(12)[::-1].copy()  # a poor initial ranking
    result = cm.aml_rerank(
        query_mac, query_descriptor, initial, store, mac_descriptor, top_n=10, qe_k=0, query_aspect=5 / 4
    )
    # Only the top 10 are re-ranked; the last two keep their order.
    np.testing.assert_array_equal(result.indices[10:], initial[10:])
    assert sorted(result.indices[:10]) == sorted(initial[:10])
    head_relevant = [i for i in relevant if i in initial[:10]]
    assert set(result.indices[: len(head_relevant)]) == set(head_relevant)
    # Scores are the query descriptor against the descriptor inside each box, sorted.
    for index, box, score in zip(result.indices, result.boxes, result.scores):
        expected = mac_descriptor(store.feature_map(int(index), box)) @ query_descriptor
        assert score == pytest.approx(expected, abs=1e-5)
    assert (np.diff(result.scores) <= 1e-7).all()
    # With QE, the expanded query is the l2-normalised sum of the query and the top-2 descriptors.
    with_qe = cm.aml_rerank(
        query_mac, query_descriptor, initial, store, mac_descriptor, top_n=10, qe_k=2, query_aspect=5 / 4
    )
    top_two = [mac_descriptor(store.feature_map(int(i), b)) for i, b in zip(result.indices[:2], result.boxes[:2])]
    expected_query = query_descriptor + top_two[0] + top_two[1]
    np.testing.assert_allclose(with_qe.expanded_query, expected_query / np.linalg.norm(expected_query), atol=1e-5)
    assert set(with_qe.indices[: len(head_relevant)]) == set(head_relevant)
    # Candidates on threads: the same result as one thread.
    for n_threads in (1, 3, 0):
        threaded = cm.aml_rerank(
            query_mac,
            query_descriptor,
            initial,
            store,
            mac_descriptor,
            top_n=10,
            qe_k=2,
            query_aspect=5 / 4,
            n_threads=n_threads,
        )
        np.testing.assert_array_equal(threaded.indices, with_qe.indices)
        np.testing.assert_array_equal(threaded.boxes, with_qe.boxes)
        np.testing.assert_array_equal(threaded.scores, with_qe.scores)


def test_aml_rerank_errors(tmp_path):
    path = tmp_path / "db.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        writer.add(np.ones((4, 3, 3), np.float32), "a")
    store = cm.FeatureMapStore(path)
    q = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="candidates"):
        cm.aml_rerank(q, q / 2, [1], store, mac_descriptor)
    with pytest.raises(ValueError, match="descriptor_fn"):
        cm.aml_rerank(q, np.ones(3, np.float32), [0], store, mac_descriptor)
    with pytest.raises(ValueError, match="top_n"):
        cm.aml_rerank(q, q / 2, [0], store, mac_descriptor, top_n=0)
    with pytest.raises(ValueError, match="query_vector"):
        cm.aml_rerank(np.ones(5, np.float32), q / 2, [0], store, mac_descriptor)
    with pytest.raises(ValueError, match="n_threads"):
        cm.aml_rerank(q, q / 2, [0], store, mac_descriptor, n_threads="all")


def test_rmac_in_box_from_codes_equals_float_crop(random_codes):
    rng = np.random.default_rng(11)
    channels = 48
    codes = random_codes(rng, 20, 15, channels)
    scale = 0.013
    mean, projection = cm.fit_pca_whitening(
        np.abs(rng.standard_normal((200, channels))).astype(np.float32), dim=32, shrinkage=1e-2
    )
    for rmac in [cm.RMACInBox(), cm.RMACInBox(mean, projection), cm.RMACInBox(mean, projection, levels=1)]:
        for box in [None, (2, 3, 13, 19), (4, 4, 5, 5), (0, 0, 15, 20), (0, 10, 15, 11)]:
            crop = _core.dequantize_codes(codes, box, scale)
            expected = rmac(crop)
            got = rmac.from_codes(codes, box, scale)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
            # The generic path is R-MAC: grid regions → MAC → aggregate (l2, whiten, l2, sum, l2).
            regions = _core.rmac_regions(crop.shape[1], crop.shape[2], rmac.levels)
            x0, y0, x1, y1 = box if box is not None else (0, 0, codes.shape[1], codes.shape[0])
            numpy_crop = (codes.astype(np.float32) * np.float32(scale)).transpose(2, 0, 1)[:, y0:y1, x0:x1]
            regional = np.stack([numpy_crop[:, b:d, a:c].max(axis=(1, 2)) for a, b, c, d in regions])
            np.testing.assert_array_equal(
                expected, cm.aggregate_regions(regional, rmac.whitening_mean, rmac.whitening_projection)
            )
    # The Extractor's R-MAC (the descriptor the index holds) is the same function.
    from types import SimpleNamespace

    extractor = cm.Extractor(SimpleNamespace(max_size=1024, dim=channels), "rmac", rmac_levels=2)
    extractor.whitening_mean, extractor.whitening_projection = mean, projection
    rmac = cm.RMACInBox(extractor.whitening_mean, extractor.whitening_projection, extractor.rmac_levels)
    np.testing.assert_array_equal(
        rmac.from_codes(codes, (1, 2, 12, 17), scale),
        extractor.descriptor_from_feature_map(_core.dequantize_codes(codes, (1, 2, 12, 17), scale)),
    )
    # An all-zero map (scale 0) gives a zero descriptor either way.
    zeros = np.zeros((4, 4, channels), np.uint8)
    np.testing.assert_array_equal(cm.RMACInBox().from_codes(zeros, None, 0.0), np.zeros(channels, np.float32))


def test_rmac_in_box_errors():
    codes = np.zeros((6, 8, 4), np.uint8)
    with pytest.raises(ValueError, match="whitening_mean and whitening_projection"):
        cm.RMACInBox(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="levels"):
        cm.RMACInBox(levels=0)
    with pytest.raises(ValueError, match=r"box: expected \[x0, y0, x1, y1\) with x0 < x1"):
        cm.RMACInBox().from_codes(codes, (3, 0, 3, 4), 1.0)
    with pytest.raises(ValueError, match="box: expected 0 <= x0 < x1 <= 8"):
        cm.RMACInBox().from_codes(codes, (0, 0, 9, 4), 1.0)
    with pytest.raises(ValueError, match="codes: expected a uint8 array of shape"):
        cm.RMACInBox().from_codes(np.zeros((6, 8), np.uint8), None, 1.0)
    with pytest.raises(ValueError, match="scale"):
        cm.RMACInBox().from_codes(codes, None, float("nan"))
    with pytest.raises(ValueError, match="crop"):
        cm.RMACInBox()(np.zeros((6, 8), np.float32))


def test_aml_rerank_with_rmac_in_box_equals_float_crop_path(tmp_path):
    rng = np.random.default_rng(21)
    channels = 40
    pattern = np.maximum(rng.standard_normal((channels, 4, 5)), 0).astype(np.float32) * 3.0
    path = tmp_path / "db.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        for i in range(9):
            fmap = np.maximum(rng.standard_normal((channels, 11, 14)), 0).astype(np.float32)
            if i % 2 == 0:
                y, x = rng.integers(0, 7), rng.integers(0, 9)
                fmap[:, y : y + 4, x : x + 5] = np.maximum(fmap[:, y : y + 4, x : x + 5], pattern)
            writer.add(fmap, f"im{i}")
        writer.add(np.zeros((channels, 3, 4), np.float32), "blank")  # scale 0
    store = cm.FeatureMapStore(path)
    mean, projection = cm.fit_pca_whitening(
        np.abs(rng.standard_normal((100, channels))).astype(np.float32), shrinkage=1e-2
    )
    used = {"regional_vectors_from_codes": 0, "crop": 0}

    class CountingRMACInBox(cm.RMACInBox):
        def __call__(self, crop):
            used["crop"] += 1
            return super().__call__(crop)

        def regional_vectors_from_codes(self, codes, box, scale):
            used["regional_vectors_from_codes"] += 1
            return super().regional_vectors_from_codes(codes, box, scale)

    rmac = CountingRMACInBox(mean, projection)
    calls = []

    def float_path(crop):
        calls.append(crop.shape)
        regions = cm.rmac_regions(crop.shape[1], crop.shape[2])
        return cm.aggregate_regions(cm.grid_mac(crop, regions), mean, projection)

    query_mac = pattern.max(axis=(1, 2))
    query_descriptor = float_path(pattern)
    calls.clear()
    candidates = rng.permutation(len(store))
    results = {}
    for qe_k in (0, 3):
        expected = cm.aml_rerank(
            query_mac, query_descriptor, candidates, store, float_path, top_n=8, qe_k=qe_k, query_aspect=5 / 4
        )
        got = cm.aml_rerank(
            query_mac, query_descriptor, candidates, store, rmac, top_n=8, qe_k=qe_k, query_aspect=5 / 4
        )
        # RMACInBox aggregates the boxes together (one whitening product): equal up to rounding.
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
        np.testing.assert_array_equal(got.boxes, expected.boxes)
        np.testing.assert_allclose(got.expanded_query, expected.expanded_query, atol=1e-6)
        results[qe_k] = expected
    # RMACInBox never made a float crop
    assert len(calls) == 16 and used == {"regional_vectors_from_codes": 16, "crop": 0}
    # A callable whose from_store attribute is not callable is used as a plain callable.
    float_path.from_store = None
    plain = cm.aml_rerank(
        query_mac, query_descriptor, candidates, store, float_path, top_n=8, qe_k=0, query_aspect=5 / 4
    )
    assert len(calls) == 24
    np.testing.assert_array_equal(plain.indices, results[0].indices)
    np.testing.assert_array_equal(plain.scores, results[0].scores)


def test_aml_rerank_in_groups_is_independent_of_threads_and_checks_aggregate_many(tmp_path):
    """More candidates than one group (rerank.BATCH): the groups are fixed, so any n_threads gives
    the same bytes; each row equals the map's own descriptor up to rounding; an aggregate_many
    returning the wrong number of rows is refused."""
    from clustermac.search import rerank

    rng = np.random.default_rng(23)
    channels = 24
    path = tmp_path / "db.cmfm"
    count = 2 * rerank.BATCH + 3
    with cm.FeatureMapStoreWriter(path) as writer:
        for i in range(count):
            writer.add(np.maximum(rng.standard_normal((channels, 9, 7)), 0).astype(np.float32), f"im{i}")
    store = cm.FeatureMapStore(path)
    training = np.abs(rng.standard_normal((60, channels))).astype(np.float32)
    mean, projection = cm.fit_pca_whitening(training, shrinkage=1e-2)
    rmac = cm.RMACInBox(mean, projection)
    query_mac = np.abs(rng.standard_normal(channels)).astype(np.float32)
    query_descriptor = rmac(np.maximum(rng.standard_normal((channels, 4, 3)), 0).astype(np.float32))
    candidates = rng.permutation(count)
    runs = [
        cm.aml_rerank(query_mac, query_descriptor, candidates, store, rmac, top_n=count - 1, n_threads=threads)
        for threads in (1, 2, 3)
    ]
    for run in runs[1:]:
        for field in ("indices", "scores", "boxes", "expanded_query"):
            assert getattr(run, field).tobytes() == getattr(runs[0], field).tobytes(), field
    singles = np.array([rmac.from_store(store, int(i), box) for i, box in zip(runs[0].indices, runs[0].boxes)])
    vectors = [rmac.regional_vectors_from_store(store, int(i), box) for i, box in zip(runs[0].indices, runs[0].boxes)]
    np.testing.assert_allclose(rmac.aggregate_many(vectors), singles, atol=1e-6)
    assert rmac.aggregate_many([]).shape == (0, len(query_descriptor))

    class WrongRows(cm.RMACInBox):
        def aggregate_many(self, regional_vectors):
            return super().aggregate_many(regional_vectors)[:-1]

    with pytest.raises(ValueError, match="aggregate_many: returned shape"):
        cm.aml_rerank(query_mac, query_descriptor, candidates, store, WrongRows(mean, projection), top_n=5)


def test_pipeline_rerank_of_rmac_uses_the_codes_and_matches_the_float_path(monkeypatch):
    from types import SimpleNamespace

    from clustermac.bench import pipeline
    from clustermac.search import rerank

    rng = np.random.default_rng(31)
    channels = 24
    database = [(np.maximum(rng.standard_normal((channels, 9, 12)), 0).astype(np.float16), None) for _ in range(7)]
    query_maps = [(np.maximum(rng.standard_normal((channels, 4, 5)), 0).astype(np.float16), None) for _ in range(2)]
    maps = pipeline.DatasetFeatureMaps(database=database, whitening=[], queries={}, seconds=0.0)
    extractor = cm.Extractor(SimpleNamespace(max_size=1024, dim=channels), "rmac")
    extractor.whitening_mean, extractor.whitening_projection = cm.fit_pca_whitening(
        np.abs(rng.standard_normal((80, channels))).astype(np.float32), shrinkage=1e-2
    )
    queries = np.stack([extractor.descriptor_from_feature_map(q.astype(np.float32)) for q, _ in query_maps])
    ranks = np.stack([rng.permutation(7) for _ in range(2)], axis=1)
    descriptor_kinds = []
    original = rerank.aml_rerank

    def recording_aml_rerank(*args, **kwargs):
        descriptor_kinds.append(type(args[4]).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(rerank, "aml_rerank", recording_aml_rerank)
    from_codes = pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25, None], ranks, 5, 2)
    assert descriptor_kinds == ["RMACInBox", "RMACInBox"]
    # The same re-ranking with the generic float-crop path (what any other method uses).
    monkeypatch.setattr(extractor, "box_descriptor", lambda: extractor.descriptor_from_feature_map)
    descriptor_kinds.clear()
    float_path = pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25, None], ranks, 5, 2)
    assert descriptor_kinds == ["method", "method"]
    np.testing.assert_array_equal(from_codes, float_path)
    assert not np.array_equal(from_codes, ranks)  # re-ranking changed something


# --- ClusterMAC inside a box from the stored codes and cluster labels -----------------------------


def clustermac_reference(store, index, box, mean, projection, grid, pooling="mask"):
    """The float path: dequantised crop, the image's labels cropped to the box, region_mac per
    partition, or the MAC of each cluster's bounding box within the crop for "box" pooling
    (after R-MAC's grid when asked), aggregate_regions."""
    crop = store.feature_map(index, box)
    x0, y0, x1, y1 = box if box is not None else (0, 0, crop.shape[2], crop.shape[1])
    blocks = [cm.grid_mac(crop, cm.rmac_regions(crop.shape[1], crop.shape[2]))] if grid else []
    for lab in store.labels(index):
        inside = np.ascontiguousarray(lab[y0:y1, x0:x1])
        if pooling == "box":
            present = [k for k in range(inside.max() + 1) if (inside == k).any()]
            boxes = [
                (np.nonzero((inside == k).any(0))[0][[0, -1]], np.nonzero((inside == k).any(1))[0][[0, -1]])
                for k in present
            ]
            blocks.append(
                np.array([crop[:, ys[0] : ys[1] + 1, xs[0] : xs[1] + 1].max(axis=(1, 2)) for xs, ys in boxes])
            )
        else:
            blocks.append(cm.region_mac(crop, inside))
    return cm.aggregate_regions(np.concatenate(blocks), mean, projection)


def test_clustermac_in_box_equals_the_float_path(tmp_path):
    rng = np.random.default_rng(60)
    channels = 24
    path = tmp_path / "db.cmfm"
    with cm.FeatureMapStoreWriter(path) as writer:
        for i in range(3):
            fmap = np.maximum(rng.standard_normal((channels, 9, 12)), 0).astype(np.float32)
            labels = cm.cluster_feature_map(fmap, rgb=rng.random((9, 12, 3)).astype(np.float32), pca_dim=4)
            writer.add(fmap, f"im{i}", labels=labels)
        writer.add(np.ones((channels, 9, 12), np.float32), "unlabelled")
    store = cm.FeatureMapStore(path)
    assert len(store.labels(0)) == 3  # 5 + 20 feature clusters, 5 RGB clusters
    mean, projection = cm.fit_pca_whitening(
        np.abs(rng.standard_normal((90, channels))).astype(np.float32), shrinkage=1e-2
    )
    for whitening in ((None, None), (mean, projection)):
        for grid, pooling in ((False, "mask"), (True, "mask"), (False, "box"), (True, "box")):
            in_box = cm.ClusterMACInBox(*whitening, add_grid_regions=grid, cluster_pooling=pooling)
            for index in range(3):
                for box in (None, (0, 0, 12, 9), (2, 1, 9, 7), (5, 4, 6, 5)):
                    got = in_box.from_store(store, index, box)
                    expected = clustermac_reference(store, index, box, *whitening, grid, pooling)
                    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="cluster_pooling"):
        cm.ClusterMACInBox(cluster_pooling="boxes")
    with pytest.raises(ValueError, match="no cluster labels"):
        cm.ClusterMACInBox().from_store(store, 3, None)
    # Re-ranking with it: every candidate described from the codes, never from a float crop.
    query = store.feature_map(0, (2, 1, 9, 7))
    query_mac = query.max(axis=(1, 2))
    in_box = cm.ClusterMACInBox(mean, projection)
    query_descriptor = in_box.from_store(store, 0, (2, 1, 9, 7))
    result = cm.aml_rerank(query_mac, query_descriptor, [2, 1, 0], store, in_box, top_n=3, qe_k=0, query_aspect=7 / 6)
    for index, box, score in zip(result.indices, result.boxes, result.scores):
        expected = clustermac_reference(store, int(index), tuple(box), mean, projection, False) @ query_descriptor
        assert score == pytest.approx(expected, abs=1e-6)
    assert result.indices[0] == 0
    with pytest.raises(ValueError, match="descriptor_fn"):
        cm.aml_rerank(query_mac, query_descriptor, [0], store, object())


def test_extractor_box_descriptor_kinds():
    from types import SimpleNamespace

    backbone = SimpleNamespace(max_size=1024, dim=8)
    assert isinstance(cm.Extractor(backbone, "rmac").box_descriptor(), cm.RMACInBox)
    clustermac_in_box = cm.Extractor(
        backbone, "clustermac", add_grid_regions=True, cluster_pooling="box"
    ).box_descriptor()
    assert isinstance(clustermac_in_box, cm.ClusterMACInBox) and clustermac_in_box.add_grid_regions
    assert clustermac_in_box.cluster_pooling == "box"
    # ClusterMAC-box (the default): the box's grid and the boxes of the stored 20 clusters' cells.
    box_in_box = cm.Extractor(backbone).box_descriptor()
    assert isinstance(box_in_box, cm.ClusterMACInBox) and box_in_box.add_grid_regions
    assert box_in_box.cluster_pooling == "box"
    mac = cm.Extractor(backbone, "mac")
    assert mac.box_descriptor() == mac.descriptor_from_feature_map


def test_pipeline_rerank_of_clustermac_stored_or_reclustered(monkeypatch):
    from types import SimpleNamespace

    from clustermac.bench import pipeline
    from clustermac.search import rerank

    rng = np.random.default_rng(61)
    channels = 16
    database = [
        (
            np.maximum(rng.standard_normal((channels, 8, 10)), 0).astype(np.float16),
            rng.random((8, 10, 3)).astype(np.float32),
        )
        for _ in range(6)
    ]
    query_maps = [(np.maximum(rng.standard_normal((channels, 4, 5)), 0).astype(np.float16), None)]
    maps = pipeline.DatasetFeatureMaps(database=database, whitening=[], queries={}, seconds=0.0)
    extractor = cm.Extractor(SimpleNamespace(max_size=1024, dim=channels), "clustermac", pca_dim=4)
    queries = np.stack([extractor.descriptor_from_feature_map(q.astype(np.float32)) for q, _ in query_maps])
    ranks = rng.permutation(6)[:, None]
    seen = []
    original = rerank.aml_rerank

    def recording_aml_rerank(query_mac, query_descriptor, candidates, store, descriptor_fn, **kwargs):
        seen.append((type(descriptor_fn).__name__, [len(store.labels(i)) for i in range(len(store))]))
        return original(query_mac, query_descriptor, candidates, store, descriptor_fn, **kwargs)

    monkeypatch.setattr(rerank, "aml_rerank", recording_aml_rerank)
    stored = pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25], ranks, 4, 2)
    assert seen == [("ClusterMACInBox", [3] * 6)]  # the database's own clusters, RGB partition included
    reclustered = pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25], ranks, 4, 2, "box")
    assert seen[1] == ("function", [0] * 6)
    for result in (stored, reclustered):
        assert sorted(result[:4, 0]) == sorted(ranks[:4, 0]) and np.array_equal(result[4:], ranks[4:])
    with pytest.raises(ValueError, match="rerank_clusters"):
        pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25], ranks, 4, 2, "both")
    # ClusterMAC-box stores its one 20-cluster partition and describes boxes from it.
    box_extractor = cm.Extractor(SimpleNamespace(max_size=1024, dim=channels), "clustermac-box", pca_dim=4)
    box_queries = np.stack([box_extractor.descriptor_from_feature_map(q.astype(np.float32)) for q, _ in query_maps])
    pipeline._rerank_then_qe(box_extractor, maps, box_queries, query_maps, [1.25], ranks, 4, 2)
    assert seen[2] == ("ClusterMACInBox", [1] * 6)
    # Labels kept from computing the database descriptors: the same descriptors and re-ranking,
    # and no clustering of the database a second time.
    labels = []
    with_labels = pipeline.descriptors_from_maps(extractor, database, labels_out=labels)
    np.testing.assert_array_equal(with_labels, pipeline.descriptors_from_maps(extractor, database))
    assert len(labels) == 6 and all(len(partitions) == 3 for partitions in labels)
    calls = []
    original_labels = extractor.cluster_labels
    monkeypatch.setattr(extractor, "cluster_labels", lambda *a: calls.append(1) or original_labels(*a))
    reused = pipeline._rerank_then_qe(extractor, maps, queries, query_maps, [1.25], ranks, 4, 2, "stored", labels)
    assert calls == []
    np.testing.assert_array_equal(reused, stored)
