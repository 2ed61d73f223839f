"""The bf16 path of topk_search (bfloat16 candidate scan + exact float32 re-score) returns the
float32 path's results bit for bit, and both match a NumPy brute force where float32 is exact.

Data the tests make: random unit vectors, small integers (float32 sums exact, many ties), integers
that bf16 rounds to the same value (its scan cannot tell them apart; float32 can), duplicates,
zero vectors, large norms, D = 1, odd D, N not a multiple of the 256-row block, k = 1 and k = N.
"""

from __future__ import annotations

import numpy as np
import pytest

import clustermac as cm


def brute_force(database, queries, k):
    """Top k by float64 score descending, ties by the smaller index (exact for integer data)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(database.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def search_both_paths(database, queries, k):
    """Results of the float32 path (1 thread) and of the bf16 path on 1 and 2 threads, all asserted
    identical bit for bit; returns (scores, indices, bf16 details)."""
    scores, indices = cm.topk_search(database, queries, k, 1, path="float32")
    for threads in (1, 2):
        bf16_scores, bf16_indices, details = cm.topk_search(
            database, queries, k, threads, path="bf16", return_details=True
        )
        assert details["path"] == "bf16"
        np.testing.assert_array_equal(bf16_indices, indices)
        assert bf16_scores.tobytes() == scores.tobytes()  # bit for bit (-0.0 and 0.0 differ here)
    return scores, indices, details


def unit(rng, n, d):
    return cm.l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


@pytest.mark.bf16
@pytest.mark.parametrize(
    "n,q,d,k",
    [(3000, 20, 64, 10), (1000, 7, 37, 1), (257, 13, 33, 257), (700, 9, 1, 5), (600, 6, 512, 600), (31, 3, 2, 31)],
)
def test_bf16_path_equals_float32_path_on_unit_vectors(n, q, d, k):
    rng = np.random.default_rng(n + d)
    database, queries = unit(rng, n, d), unit(rng, q, d)
    scores, indices, _ = search_both_paths(database, queries, k)
    ref_scores, _ = brute_force(database, queries, k)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.bf16
@pytest.mark.parametrize("n,q,d,k", [(1000, 13, 16, 50), (257, 7, 5, 257), (513, 4, 1, 1), (600, 20, 37, 10)])
def test_bf16_path_equals_numpy_on_integers_with_many_ties(n, q, d, k):
    rng = np.random.default_rng(n * d)
    database = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
    scores, indices, _ = search_both_paths(database, queries, k)
    ref_scores, ref_indices = brute_force(database, queries, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


@pytest.mark.bf16
@pytest.mark.parametrize("n_queries", [1, 9, 16, 17])  # up to 16: rows scored one by one; above: tiles
def test_bf16_path_resolves_scores_bf16_cannot_tell_apart(n_queries):
    # Entries 256..259 all round to 256 or 260 in bf16 (8-bit significand), so the bf16 scan sees
    # masses of ties; the float32 scores (exact: integers below 2^24) differ, and only the
    # re-score can order them. Queries with entries 0..3 keep every product and sum exact.
    rng = np.random.default_rng(3)
    database = rng.integers(256, 260, size=(2000, 24)).astype(np.float32)
    database[1000:1500] = database[0]  # exact duplicates too: ties go to the smaller index
    queries = rng.integers(0, 4, size=(n_queries, 24)).astype(np.float32)
    scores, indices, _ = search_both_paths(database, queries, 40)
    ref_scores, ref_indices = brute_force(database, queries, 40)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


@pytest.mark.bf16
def test_bf16_path_on_vectors_differing_in_the_last_bits():
    rng = np.random.default_rng(4)
    base = unit(rng, 1, 48)[0]
    steps = rng.integers(-3, 4, size=(1500, 48)).astype(np.float32)
    database = (base + steps * np.spacing(np.abs(base))).astype(np.float32)  # a few ulps apart
    queries = np.concatenate([base[None], unit(rng, 4, 48)]).astype(np.float32)
    scores, _, _ = search_both_paths(database, queries, 30)
    np.testing.assert_allclose(scores, brute_force(database, queries, 30)[0], atol=1e-5)


@pytest.mark.bf16
def test_bf16_path_on_duplicates_zero_vectors_and_large_norms():
    rng = np.random.default_rng(5)
    d = 40
    database = unit(rng, 3000, d)
    database[::7] = database[0]  # duplicates of row 0 throughout
    database[100:120] = 0.0  # zero rows
    database[200:260] *= 1e3  # large but bounded norms
    database[300:305] *= 1e17  # beyond the bound's reach (2^50): never pruned, re-scored exactly
    queries = unit(rng, 8, d)
    queries[1] = database[0]
    queries[2] = 0.0  # a zero query: every score 0, the smallest indices win
    queries[3] *= 1e-30  # tiny scores, down to float32 denormals
    scores, indices, _ = search_both_paths(database, queries, 25)
    np.testing.assert_array_equal(indices[2], np.arange(25))
    np.testing.assert_allclose(scores, brute_force(database, queries, 25)[0], rtol=1e-5, atol=1e-35)


@pytest.mark.bf16
def test_bf16_path_with_a_huge_query_falls_back_and_agrees():
    rng = np.random.default_rng(6)
    database, queries = unit(rng, 800, 16), unit(rng, 6, 16)
    queries[0] *= 1e20  # a query norm beyond the bound's reach: that chunk runs in float32
    float32 = cm.topk_search(database, queries, 5, 1, path="float32")
    scores, indices, details = cm.topk_search(database, queries, 5, 1, path="bf16", return_details=True)
    assert details["path"] == "float32"
    np.testing.assert_array_equal(indices, float32[1])
    assert scores.tobytes() == float32[0].tobytes()


@pytest.mark.bf16
def test_bf16_path_on_all_duplicate_rows_switches_to_float32_and_agrees():
    # Every row ties: every row is a candidate, which triggers the early re-scores and then the
    # switch of the rest of each share to the float32 scan.
    rng = np.random.default_rng(8)
    database = np.repeat(unit(rng, 1, 20), 6000, axis=0)
    database[4321] *= 1.5  # one row above the rest
    queries = unit(rng, 5, 20)
    queries[0] = database[0]
    scores, indices, details = search_both_paths(database, queries, 7)
    assert details["candidates_rescored"] > 0
    np.testing.assert_allclose(scores, brute_force(database, queries, 7)[0], rtol=1e-6)
    assert indices[0, 0] == 4321 and list(indices[0, 1:]) == list(range(6))


@pytest.mark.bf16
def test_bf16_path_with_a_tenth_of_rows_tied_at_the_top_rescores_early_and_agrees():
    # Every 10th row copies the query: thousands of candidates tie at the top score, more than a
    # query keeps pending (2k + 2048) but too few to switch a share to float32: early re-scores.
    rng = np.random.default_rng(12)
    database = unit(rng, 40000, 8)
    database[::10] = database[3]
    queries = np.concatenate([database[3:4], unit(rng, 2, 8)])
    scores, indices, details = search_both_paths(database, queries, 5)
    assert details["candidates_rescored"] > 4000
    assert list(indices[0]) == [0, 3, 10, 20, 30]
    np.testing.assert_allclose(scores, brute_force(database, queries, 5)[0], rtol=1e-6)


@pytest.mark.bf16
def test_bf16_bound_prunes_random_unit_vectors():
    # The bound must be tight enough to be useful: few candidates beyond k per query.
    rng = np.random.default_rng(9)
    database, queries = unit(rng, 20000, 64), unit(rng, 12, 64)
    _, _, details = search_both_paths(database, queries, 10)
    assert 10 * 12 <= details["candidates_rescored"] < 12 * 2000


@pytest.mark.bf16
def test_bf16_path_raises_the_float32_path_errors():
    rng = np.random.default_rng(10)
    database, queries = unit(rng, 600, 12), unit(rng, 3, 12)
    for bad in (np.nan, np.inf):
        broken = database.copy()
        broken[437, 5] = bad
        messages = []
        for path in ("float32", "bf16"):
            with pytest.raises(ValueError, match="database: row 437 contains NaN or Inf") as error:
                cm.topk_search(broken, queries, 4, 1, path=path)
            messages.append(str(error.value))
        assert messages[0] == messages[1]
    # Dot products that overflow float32: the same error from both paths.
    large = database * np.float32(1e20)
    messages = []
    for path in ("float32", "bf16"):
        with pytest.raises(ValueError, match="overflow") as error:
            cm.topk_search(large, queries * np.float32(1e20), 4, 1, path=path)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match='path: expected "auto", "float32", "bf16" or "f32scan"'):
        cm.topk_search(database, queries, 4, path="int8")


def test_auto_path_gives_the_same_results():
    rng = np.random.default_rng(11)
    database, queries = unit(rng, 5000, 32), unit(rng, 40, 32)
    auto = cm.topk_search(database, queries, 10, return_details=True)
    assert auto[2]["path"] in ("bf16", "float32")
    float32 = cm.topk_search(database, queries, 10, path="float32")
    np.testing.assert_array_equal(auto[1], float32[1])
    assert auto[0].tobytes() == float32[0].tobytes()


def test_without_bf16_forced_bf16_is_refused_and_auto_is_float32(run_python):
    result = run_python(
        """
        import numpy as np, clustermac as cm
        database = np.eye(40, 8, dtype=np.float32)
        _, _, details = cm.topk_search(database, database[:20], 3, return_details=True)
        assert details["path"] == "float32", details
        try:
            cm.topk_search(database, database[:20], 3, path="bf16")
        except ValueError as error:
            print(error)
        """,
        env={"CLUSTERMAC_NO_BF16": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert 'path: "bf16" needs a CPU with AVX512-BF16' in result.stdout
