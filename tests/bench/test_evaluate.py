"""Tests of clustermac.evaluate against Oxford's published AP values and plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clustermac import average_precision, compute_map, revisited_map
from clustermac.bench.evaluate import paired_bootstrap_interval

# --- plain references -----------------------------------------------------------------------


def reference_ap(ranked, positives, junk=()):
    """Oxford's compute_ap written as a running recall/precision loop (not the rank form)."""
    positives, junk = set(positives), set(junk)
    if not positives:
        return math.nan
    ap, old_recall, old_precision, hits, kept = 0.0, 0.0, 1.0, 0, 0
    for item in ranked:
        if item in junk:
            continue
        if item in positives:
            hits += 1
        kept += 1
        recall, precision = hits / len(positives), hits / kept
        ap += (recall - old_recall) * (old_precision + precision) / 2.0
        old_recall, old_precision = recall, precision
    return ap


def reference_precision_at_k(ranked, positives, junk, k):
    """revisitop's precision at k: k capped at the (junk-free, 1-based) rank of the last positive."""
    kept = [item for item in ranked if item not in set(junk)]
    ranks = [rank + 1 for rank, item in enumerate(kept) if item in set(positives)]
    if not ranks:
        return 0.0
    capped = min(max(ranks), k)
    return sum(rank <= capped for rank in ranks) / capped


def reference_map(ranks, gnd, kappas):
    aps, precisions = [], []
    for query, entry in enumerate(gnd):
        ranked = list(ranks[:, query])
        if len(entry["ok"]) == 0:
            aps.append(math.nan)
            precisions.append([math.nan] * len(kappas))
            continue
        aps.append(reference_ap(ranked, entry["ok"], entry.get("junk", ())))
        precisions.append([reference_precision_at_k(ranked, entry["ok"], entry.get("junk", ()), k) for k in kappas])
    aps, precisions = np.array(aps), np.array(precisions, dtype=float).reshape(len(gnd), len(kappas))
    kept = ~np.isnan(aps)
    return aps[kept].mean(), aps, precisions[kept].mean(axis=0), precisions


def random_problem(rng, n_database, n_queries, n_ranked=None, with_empty=True):
    """Random rankings and disjoint easy/hard/junk lists; some queries without positives."""
    n_ranked = n_database if n_ranked is None else n_ranked
    ranks = np.stack([rng.permutation(n_database)[:n_ranked] for _ in range(n_queries)], axis=1)
    gnd = []
    for query in range(n_queries):
        labels = rng.integers(0, 6, size=n_database)  # 0 easy, 1 hard, 2 junk, else negative
        if with_empty and query % 4 == 3:
            labels[labels < 2] = 5
        gnd.append(
            {
                "easy": np.flatnonzero(labels == 0).tolist(),
                "hard": np.flatnonzero(labels == 1).tolist(),
                "junk": np.flatnonzero(labels == 2).tolist(),
            }
        )
    return ranks, gnd


# --- average_precision ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranked, positives, junk, expected",
    [
        (["a", "x", "b"], {"a", "b"}, (), 0.791667),
        (["j", "a", "x", "b"], {"a", "b"}, {"j"}, 0.791667),
        (["a", "x", "b"], {"a", "b", "c"}, (), 0.527778),
        (["x", "a"], {"a"}, (), 0.25),
    ],
)
def test_average_precision_known_values(ranked, positives, junk, expected):
    assert average_precision(ranked, positives, junk) == pytest.approx(expected, abs=1e-6)


def test_average_precision_edge_cases():
    assert average_precision([3, 1, 2], {3}) == 1.0
    assert average_precision([1, 2], {9}) == 0.0  # positive never retrieved
    assert average_precision([], {1}) == 0.0
    assert math.isnan(average_precision([1, 2], set()))
    assert average_precision([7, 1], {1}, junk={7}) == 1.0  # junk takes no rank
    with pytest.raises(ValueError, match="more than once"):
        average_precision([1, 2, 1], {1})
    with pytest.raises(ValueError, match="overlap"):
        average_precision([1, 2], {1}, junk={1})


def test_average_precision_matches_reference_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        ranked = rng.permutation(n + 5)[:n].tolist()
        labels = rng.integers(0, 4, size=n + 5)
        positives = set(np.flatnonzero(labels == 0).tolist())
        junk = set(np.flatnonzero(labels == 1).tolist())
        expected = reference_ap(ranked, positives, junk)
        result = average_precision(ranked, positives, junk)
        if math.isnan(expected):
            assert math.isnan(result)
        else:
            assert result == pytest.approx(expected, abs=1e-12)


# --- compute_map ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_ranked", [None, 7])
def test_compute_map_matches_reference(n_ranked):
    rng = np.random.default_rng(1)
    ranks, revisited = random_problem(rng, n_database=25, n_queries=12, n_ranked=n_ranked)
    gnd = [{"ok": entry["easy"] + entry["hard"], "junk": entry["junk"]} for entry in revisited]
    kappas = (1, 3, 5, 10, 40)
    mean_ap, aps, mean_precision, precisions = compute_map(ranks, gnd, kappas)
    expected = reference_map(ranks, gnd, kappas)
    assert mean_ap == pytest.approx(expected[0], abs=1e-12)
    np.testing.assert_allclose(aps, expected[1], atol=1e-12)
    np.testing.assert_allclose(mean_precision, expected[2], atol=1e-12)
    np.testing.assert_allclose(precisions, expected[3], atol=1e-12)
    assert np.isnan(aps[3]) and np.isnan(precisions[3]).all()  # query without positives
    for query in range(len(gnd)):  # per-query AP equals average_precision on the same list
        if gnd[query]["ok"]:
            assert aps[query] == pytest.approx(
                average_precision(ranks[:, query].tolist(), gnd[query]["ok"], gnd[query]["junk"]), abs=1e-12
            )


def test_compute_map_small_hand_example():
    ranks = np.array([[0, 3], [1, 0], [2, 1], [3, 2]], dtype=np.int32)
    mean_ap, aps, mean_precision, precisions = compute_map(ranks, [{"ok": [0, 2]}, {"ok": []}])
    assert mean_ap == pytest.approx(0.791667, abs=1e-6)
    assert np.isnan(aps[1])
    # Positives at 1-based ranks 1 and 3: P@1 = 1, P@5 and P@10 capped at rank 3: 2/3.
    np.testing.assert_allclose(precisions[0], [1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(mean_precision, [1.0, 2 / 3, 2 / 3])


def test_compute_map_no_positives_retrieved_and_all_empty():
    ranks = np.array([[0], [1]])
    mean_ap, aps, mean_precision, precisions = compute_map(ranks, [{"ok": [5], "junk": []}])
    assert mean_ap == 0.0 and np.all(precisions == 0.0)
    mean_ap, aps, mean_precision, precisions = compute_map(ranks, [{"ok": [], "junk": [0]}])
    assert math.isnan(mean_ap) and np.isnan(mean_precision).all()


def test_compute_map_accepts_revisited_entries_as_medium():
    ranks = np.array([[2], [0], [1]])
    classic = compute_map(ranks, [{"ok": [0, 1], "junk": [2]}])
    revisited = compute_map(ranks, [{"easy": [0], "hard": [1], "junk": [2]}])
    assert classic[0] == revisited[0] == 1.0


@pytest.mark.parametrize(
    "ranks, gnd, kappas, message",
    [
        (np.arange(4), [{"ok": [1]}], (1,), "2-D"),
        (np.zeros((3, 2), dtype=int), [{"ok": [1]}], (1,), "columns"),
        (np.arange(3.0).reshape(3, 1), [{"ok": [1]}], (1,), "integer"),
        (np.array([[0], [-1]]), [{"ok": [1]}], (1,), "negative"),
        (np.array([[0], [1], [0]]), [{"ok": [1]}], (1,), "more than once"),
        (np.array([[10**12], [5], [10**12]]), [{"ok": [1]}], (1,), "more than once"),
        (np.array([[0], [1]]), [{"ok": [1]}], (0, 5), "kappas"),
        (np.array([[0], [1]]), [{"positives": [1]}], (1,), "'ok'"),
        (np.array([[0], [1]]), [{"ok": [1], "junk": [1]}], (1,), "both a positive and junk"),
        (np.array([[0], [1]]), [{"ok": [0.5]}], (1,), "integer image indices"),
        (np.array([[0], [1]]), [[1]], (1,), "expected a dict"),
    ],
)
def test_compute_map_rejects_bad_input(ranks, gnd, kappas, message):
    with pytest.raises(ValueError, match=message):
        compute_map(ranks, gnd, kappas)


# --- revisited_map --------------------------------------------------------------------------


def test_revisited_map_hand_built_ground_truth():
    # Query 0 ranks [3, 0, 5, 1, 2, 4] with easy {0}, hard {1, 4}, junk {5}:
    #   Easy   (junk 5, 1, 4): list 3 0 2      -> positive at rank 1: AP = (0 + 1/2) / 2 = 0.25
    #   Medium (junk 5):       list 3 0 1 2 4  -> ranks 1, 2, 4: AP = (0.25 + 0.58333 + 0.55) / 3
    #   Hard   (junk 5, 0):    list 3 1 2 4    -> ranks 1, 3: AP = (0.25 + 0.41667) / 2
    # Query 1 ranks 0..5 with only hard {2}: no Easy positives (left out), AP 1/6 otherwise.
    ranks = np.array([[3, 0, 5, 1, 2, 4], [0, 1, 2, 3, 4, 5]]).T
    gnd = [
        {"easy": [0], "hard": [1, 4], "junk": [5], "bbx": [0, 0, 10, 10]},
        {"easy": [], "hard": [2], "junk": []},
    ]
    result = revisited_map(ranks, gnd)
    medium_ap = (0.25 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
    hard_ap = (0.25 + (1 / 3 + 2 / 4) / 2) / 2
    np.testing.assert_allclose(result["easy"]["aps"], [0.25, np.nan])
    np.testing.assert_allclose(result["medium"]["aps"], [medium_ap, 1 / 6])
    np.testing.assert_allclose(result["hard"]["aps"], [hard_ap, 1 / 6])
    assert result["easy"]["map"] == pytest.approx(0.25)
    assert result["medium"]["map"] == pytest.approx((medium_ap + 1 / 6) / 2)
    assert result["hard"]["map"] == pytest.approx((hard_ap + 1 / 6) / 2)
    # Medium, query 0: positives at 1-based ranks 2, 3, 5 -> P@1 = 0, P@5 = P@10 = 3/5.
    np.testing.assert_allclose(result["medium"]["pr@k"][0], [0.0, 0.6, 0.6])
    assert set(result["hard"]) == {"map", "aps", "mp@k", "pr@k"}


def test_revisited_map_matches_reference_protocols():
    rng = np.random.default_rng(2)
    ranks, gnd = random_problem(rng, n_database=30, n_queries=10, n_ranked=20)
    result = revisited_map(ranks, gnd, kappas=(1, 5))
    protocols = {
        "easy": [{"ok": g["easy"], "junk": g["junk"] + g["hard"]} for g in gnd],
        "medium": [{"ok": g["easy"] + g["hard"], "junk": g["junk"]} for g in gnd],
        "hard": [{"ok": g["hard"], "junk": g["junk"] + g["easy"]} for g in gnd],
    }
    for protocol, protocol_gnd in protocols.items():
        expected = reference_map(ranks, protocol_gnd, (1, 5))
        assert result[protocol]["map"] == pytest.approx(expected[0], abs=1e-12)
        np.testing.assert_allclose(result[protocol]["aps"], expected[1], atol=1e-12)
        np.testing.assert_allclose(result[protocol]["mp@k"], expected[2], atol=1e-12)
        np.testing.assert_allclose(result[protocol]["pr@k"], expected[3], atol=1e-12)


def test_revisited_map_requires_easy_hard_split():
    with pytest.raises(ValueError, match="no Easy/Hard split"):
        revisited_map(np.array([[0], [1]]), [{"ok": [0], "junk": []}])


# --- paired bootstrap ---------------------------------------------------------------------------


def reference_bootstrap(differences, resamples, seed, level=0.95):
    """The percentile bootstrap written out: the same resampled query indices, each mean summed by
    hand, the percentiles by linear interpolation between sorted means."""
    kept = [float(d) for d in differences if not math.isnan(d)]
    picks = np.random.default_rng(seed).integers(0, len(kept), size=(resamples, len(kept)))
    means = sorted(sum(kept[j] for j in row) / len(kept) for row in picks.tolist())

    def percentile(q):
        position = q / 100.0 * (len(means) - 1)
        low = math.floor(position)
        high = min(low + 1, len(means) - 1)
        return means[low] + (means[high] - means[low]) * (position - low)

    tail = 100.0 * (1.0 - level) / 2.0
    return percentile(tail), percentile(100.0 - tail)


def test_paired_bootstrap_matches_the_written_out_reference():
    rng = np.random.default_rng(3)
    differences = rng.normal(3.0, 4.0, size=40)
    differences[[3, 17]] = np.nan  # queries without positives are left out
    for level in (0.95, 0.8):
        got = paired_bootstrap_interval(differences, resamples=500, seed=7, level=level)
        assert got == pytest.approx(reference_bootstrap(differences, 500, 7, level), abs=1e-12)
    low, high = paired_bootstrap_interval(differences, resamples=2000)
    kept = differences[~np.isnan(differences)]
    assert low < kept.mean() < high and low > 0.0  # a clear gain lies above 0
    assert paired_bootstrap_interval(differences, resamples=2000) == (low, high)  # same seed, same interval
    assert paired_bootstrap_interval(-differences, resamples=2000) == pytest.approx((-high, -low), abs=1e-12)


def test_paired_bootstrap_edge_cases():
    assert paired_bootstrap_interval(np.full(5, 2.0), resamples=50) == pytest.approx((2.0, 2.0))
    assert paired_bootstrap_interval([0.5], resamples=10) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="differences"):
        paired_bootstrap_interval([math.nan, math.nan])
    with pytest.raises(ValueError, match="differences"):
        paired_bootstrap_interval([1.0, math.inf])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap_interval([1.0, 2.0], resamples=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_interval([1.0, 2.0], level=1.0)
