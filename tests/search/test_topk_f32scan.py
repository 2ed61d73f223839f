"""The f32scan path of topk_search (a float32 scan of the rows in place, in another summation order,
with a rigorous bound, then the candidates re-scored by the float32 kernel) returns the float32 path's
results bit for bit, on 1 and 2 threads, at every SIMD level (AVX-512, AVX2, the baseline), and both
match a NumPy brute force where float32 is exact.

Data the tests make: random unit vectors, small integers (float32 sums exact, many ties), vectors a
few ulps apart (the two summation orders disagree in the last bits), duplicates, zero vectors, large
norms and norms beyond the bound's reach, a tiny query (denormal products), D = 1, 33, 37, 512, N not
a multiple of the 256-row block, k = 1 and k = N, 1, 8, 9, 16 and 17 queries.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import clustermac as cm
from clustermac import _core


def brute_force(database, queries, k):
    """Top k by float64 score descending, ties by the smaller index (exact for integer data)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(database.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def unit(rng, n, d):
    return cm.l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


def unit_vectors(n, q, d, k):
    rng = np.random.default_rng(n + 7 * d + q)
    return unit(rng, n, d), unit(rng, q, d), k


def integers_with_ties():
    rng = np.random.default_rng(2)
    database = rng.integers(-2, 3, size=(1000, 16)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(8, 16)).astype(np.float32)
    return database, queries, 50


def last_bits(d):
    # Rows a few ulps apart around one unit vector: against it, the scores differ in the last bits
    # only, where the scan's summation order and the float32 kernel's disagree.
    rng = np.random.default_rng(4 + d)
    base = unit(rng, 1, d)[0]
    steps = rng.integers(-3, 4, size=(1500, d)).astype(np.float32)
    database = (base + steps * np.spacing(np.abs(base))).astype(np.float32)
    queries = np.concatenate([base[None], unit(rng, 4, d)]).astype(np.float32)
    return database, queries, 30


def duplicates_zeros_and_large_norms():
    rng = np.random.default_rng(5)
    database = unit(rng, 3000, 40)
    database[::7] = database[0]  # duplicates of row 0 throughout
    database[100:120] = 0.0  # zero rows
    database[200:260] *= 1e3  # large but bounded norms
    database[300:305] *= 1e17  # beyond the bound's reach (2^50): never pruned, re-scored exactly
    queries = unit(rng, 8, 40)
    queries[1] = database[0]
    queries[2] = 0.0  # a zero query: every score 0, the smallest indices win
    queries[3] *= 1e-30  # tiny scores, down to float32 denormals
    return database, queries, 25


def all_duplicate_rows():
    # Every row ties: every row is a candidate, which triggers the early re-scores and then the
    # switch of the rest of each share to the float32 scan.
    rng = np.random.default_rng(8)
    database = np.repeat(unit(rng, 1, 20), 6000, axis=0)
    database[4321] *= 1.5
    queries = unit(rng, 5, 20)
    queries[0] = database[0]
    return database, queries, 7


def a_tenth_of_rows_tied():
    # Every 10th row copies the first query: thousands of candidates tie at the top, more than a
    # query keeps pending (2k + 2048) but too few to switch a share to float32: early re-scores.
    rng = np.random.default_rng(12)
    database = unit(rng, 40000, 8)
    database[::10] = database[3]
    return database, np.concatenate([database[3:4], unit(rng, 2, 8)]), 5


CASES = {
    "1 query, D=512": lambda: unit_vectors(3000, 1, 512, 10),
    "8 queries, D=37, k=1": lambda: unit_vectors(1000, 8, 37, 1),
    "9 queries, D=33, k=N": lambda: unit_vectors(257, 9, 33, 257),
    "9 queries, D=1": lambda: unit_vectors(700, 9, 1, 5),
    "16 queries, D=512": lambda: unit_vectors(1200, 16, 512, 50),
    "17 queries (two chunks), D=64": lambda: unit_vectors(900, 17, 64, 7),
    "1 query, D=512, k=N": lambda: unit_vectors(600, 1, 512, 600),
    "integers with ties": integers_with_ties,
    "last bits, D=48": lambda: last_bits(48),
    "last bits, D=512": lambda: last_bits(512),
    "duplicates, zeros, large norms": duplicates_zeros_and_large_norms,
    "all duplicate rows": all_duplicate_rows,
    "a tenth of the rows tied": a_tenth_of_rows_tied,
}
EXACT_IN_FLOAT32 = {"integers with ties"}
FIRST_QUERY_TOP = {"all duplicate rows": [4321, 0, 1, 2, 3, 4, 5], "a tenth of the rows tied": [0, 3, 10, 20, 30]}


def check_case(name: str) -> None:
    """f32scan on 1 and 2 threads and auto give the float32 path's bits; the float32 path is right."""
    database, queries, k = CASES[name]()
    scores, indices = cm.topk_search(database, queries, k, 1, path="float32")
    for threads in (1, 2):
        for path in ("f32scan", "auto"):
            found, found_indices, details = cm.topk_search(
                database, queries, k, threads, path=path, return_details=True
            )
            np.testing.assert_array_equal(found_indices, indices, err_msg=f"{name}, {path}, {threads} threads")
            assert found.tobytes() == scores.tobytes(), f"{name}, {path}, {threads} threads"  # -0.0 != 0.0 here
            if path == "f32scan":
                assert details["path"] == "f32scan", details
                assert details["candidates_rescored"] >= (queries.shape[0] * k if name != "all duplicate rows" else 1)
    ref_scores, ref_indices = brute_force(database, queries, k)
    if name in EXACT_IN_FLOAT32:
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    else:
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    if name in FIRST_QUERY_TOP:  # ties among equal float32 scores go to the smaller index
        assert list(indices[0]) == FIRST_QUERY_TOP[name]


def check_errors() -> None:
    """NaN and Inf rows, and overflowing scores, raise the float32 path's very messages."""
    rng = np.random.default_rng(10)
    database, queries = unit(rng, 600, 12), unit(rng, 3, 12)
    for bad in (np.nan, np.inf, -np.inf):
        broken = database.copy()
        broken[437, 5] = bad
        broken[590, 1] = bad  # a later bad row: the first one is named
        messages = []
        for path in ("float32", "f32scan", "auto"):
            with pytest.raises(ValueError, match="database: row 437 contains NaN or Inf") as error:
                cm.topk_search(broken, queries, 4, 1, path=path)
            messages.append(str(error.value))
        assert len(set(messages)) == 1, messages
    large = database * np.float32(1e20)  # finite, but every dot product overflows float32
    messages = []
    for path in ("float32", "f32scan"):
        with pytest.raises(ValueError, match="overflow") as error:
            cm.topk_search(large, queries * np.float32(1e20), 4, 1, path=path)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("name", list(CASES))
def test_f32scan_path_equals_float32_path(name):
    check_case(name)


def test_f32scan_path_raises_the_float32_path_errors():
    check_errors()
    with pytest.raises(ValueError, match='path: expected "auto", "float32", "bf16" or "f32scan", got "f16scan"'):
        cm.topk_search(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), 1, path="f16scan")


def test_f32scan_bound_is_tight_on_random_unit_vectors():
    # The bound must be tight enough to be useful: few candidates beyond k per query.
    rng = np.random.default_rng(9)
    database, queries = unit(rng, 20000, 64), unit(rng, 8, 64)
    _, _, details = cm.topk_search(database, queries, 10, 1, path="f32scan", return_details=True)
    assert 10 * 8 <= details["candidates_rescored"] < 8 * 200


def test_f32scan_with_a_huge_query_falls_back_to_float32_and_agrees():
    rng = np.random.default_rng(6)
    database, queries = unit(rng, 800, 16), unit(rng, 6, 16)
    queries[0] *= 1e20  # a query norm beyond the bound's reach: that chunk runs in float32
    scores, indices = cm.topk_search(database, queries, 5, 1, path="float32")
    found, found_indices, details = cm.topk_search(database, queries, 5, 1, path="f32scan", return_details=True)
    assert details["path"] == "float32"
    np.testing.assert_array_equal(found_indices, indices)
    assert found.tobytes() == scores.tobytes()


@pytest.mark.parametrize("d", [16, 32, 48, 40])
def test_f32scan_path_at_every_alignment_of_the_database(d):
    # The scan aligns its loads on the rows' first 64-byte boundary when every row has the same
    # alignment (D a multiple of 16), reading the partial vectors before and after as masked aligned
    # loads: each of the 16 float offsets of the first row, and the last row, must give the same bits.
    rng = np.random.default_rng(d)
    rows, queries = unit(rng, 700, d), unit(rng, 3, d)
    storage = np.zeros(700 * d + 32, dtype=np.float32)
    start = (-storage.ctypes.data // 4) % 16  # storage[start] is on a 64-byte boundary
    for offset in range(16):
        database = storage[start + offset : start + offset + 700 * d].reshape(700, d)
        database[:] = rows
        database[-1] *= 2.0  # the last row ranks first for some queries
        scores, indices = cm.topk_search(database, queries, 9, 1, path="float32")
        found, found_indices = cm.topk_search(database, queries, 9, 1, path="f32scan")
        np.testing.assert_array_equal(found_indices, indices, err_msg=f"offset {offset}")
        assert found.tobytes() == scores.tobytes(), f"offset {offset}"
    ref_scores, _ = brute_force(database, queries, 9)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_f32scan_path_on_a_memory_mapped_database(tmp_path):
    rng = np.random.default_rng(13)
    np.save(tmp_path / "db.npy", unit(rng, 5000, 96))
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    queries = unit(rng, 3, 96)
    scores, indices = cm.topk_search(mapped, queries, 20, 2, path="float32")
    found, found_indices = cm.topk_search(mapped, queries, 20, 2, path="f32scan")
    np.testing.assert_array_equal(found_indices, indices)
    assert found.tobytes() == scores.tobytes()


# Every case again in a child process whose SIMD level is capped (as on CPUs without AVX-512, or
# without AVX2): the environment variables are read once per process.
LEVEL_SCRIPT = """
import sys
sys.path.insert(0, {folder!r})
from clustermac import _core
import test_topk_f32scan as cases
assert _core.simd_level() == {level!r}, _core.simd_level()
for name in cases.CASES:
    cases.check_case(name)
cases.check_errors()
print("checked", len(cases.CASES), "cases at", _core.simd_level())
"""


@pytest.mark.parametrize(
    "variable,level", [("CLUSTERMAC_NO_AVX512", "avx2"), ("CLUSTERMAC_NO_AVX2", "scalar")], ids=["avx2", "baseline"]
)
def test_f32scan_path_equals_float32_path_at_lower_simd_levels(run_python, variable, level):
    if level == "avx2" and _core.simd_level() == "scalar":
        pytest.skip("this CPU has no AVX2")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLUSTERMAC_NO_")}
    env[variable] = "1"
    script = LEVEL_SCRIPT.format(folder=str(Path(__file__).parent), level=level)
    result = run_python(script, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checked {len(CASES)} cases at {level}" in result.stdout


# With the bound forced to 0 (the test hook CLUSTERMAC_TEST_SEARCH_BOUND_SCALE), rows of the exact
# top k are lost where the scan and the float32 kernel disagree (the summation orders in the last
# bits for f32scan, the bfloat16 rounding for bf16): the equality checks above would fail.
BROKEN_BOUND_SCRIPT = """
import sys
sys.path.insert(0, {folder!r})
import numpy as np
import clustermac as cm
import test_topk_f32scan as cases
differing = 0
for database, queries, k in (cases.last_bits(48), cases.last_bits(512), cases.unit_vectors(20000, 8, 512, 100)):
    scores, indices = cm.topk_search(database, queries, k, 1, path="float32")
    found, found_indices = cm.topk_search(database, queries, k, 1, path={path!r})
    differing += int(not np.array_equal(found_indices, indices) or found.tobytes() != scores.tobytes())
print("differing", differing)
"""


@pytest.mark.parametrize("path", ["f32scan", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_a_broken_bound_makes_the_paths_differ(run_python, path):
    script = BROKEN_BOUND_SCRIPT.format(folder=str(Path(__file__).parent), path=path)
    broken = run_python(script, env={"CLUSTERMAC_TEST_SEARCH_BOUND_SCALE": "0"})
    assert broken.returncode == 0, broken.stderr[-3000:]
    assert "differing 0" not in broken.stdout and "differing" in broken.stdout, broken.stdout
    intact = run_python(script, env={"CLUSTERMAC_TEST_SEARCH_BOUND_SCALE": "1"})
    assert "differing 0" in intact.stdout, intact.stdout + intact.stderr[-3000:]


def test_auto_without_bf16_chooses_between_float32_and_f32scan(run_python):
    result = run_python(
        """
        import numpy as np, clustermac as cm
        rng = np.random.default_rng(1)
        database = rng.standard_normal((5000, 64)).astype(np.float32)
        for n_queries in (1, 8, 40):
            queries = database[:n_queries] + 0.1
            scores, indices, details = cm.topk_search(database, queries, 10, return_details=True)
            reference = cm.topk_search(database, queries, 10, path="float32")
            assert np.array_equal(indices, reference[1]) and scores.tobytes() == reference[0].tobytes()
            print(n_queries, details["path"])
        """,
        env={"CLUSTERMAC_NO_BF16": "1"},
    )
    assert result.returncode == 0, result.stderr
    paths = dict(line.split() for line in result.stdout.splitlines())
    assert paths["1"] in ("float32", "f32scan") and paths["8"] in ("float32", "f32scan"), paths
    assert paths["40"] == "float32", paths  # more than 16 queries: f32scan is not a candidate
