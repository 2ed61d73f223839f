"""Limits and errors of the C++ core (issue 12, items 6, 9, 10 and 11): the thread pool caps its
threads and turns a thread that cannot start into RuntimeError (never an abort), absurd sizes are
refused with explicit limits before allocating, and overflow, NaN and denormal garbage raise
instead of passing through. The thread limits are provoked in real subprocesses (each bounded in
time) with resource limits, not with mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import clustermac as cm
from clustermac import _core

# --- helpers -------------------------------------------------------------------------------------


def run_child(code: str, *, stack_limit: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; with `stack_limit`, RLIMIT_STACK is set first and the
    interpreter exec'd again, since glibc takes its default thread stack size from that limit at start."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if stack_limit is None:
        args = [sys.executable, "-c", code]
    else:
        wrapper = (
            "import os, resource, sys\n"
            "hard = resource.getrlimit(resource.RLIMIT_STACK)[1]\n"
            f"if hard != resource.RLIM_INFINITY and hard < {stack_limit}:\n"
            "    sys.exit(print('SKIP: the hard RLIMIT_STACK is too low to raise'))\n"
            f"resource.setrlimit(resource.RLIMIT_STACK, ({stack_limit}, hard))\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {code!r}])\n"
        )
        args = [sys.executable, "-c", wrapper]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def feature_maps(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((6, 5, 4), dtype=np.float32) for _ in range(count)]


# --- item 6: the thread pool ---------------------------------------------------------------------


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    database = rng.standard_normal((3000, 12)).astype(np.float32)
    queries = rng.standard_normal((9, 12)).astype(np.float32)
    expected = cm.topk_search(database, queries, 25, n_threads=1)
    for n_threads in (0, 2, 3, 10**6, 2**62):
        scores, indices = cm.topk_search(database, queries, 25, n_threads=n_threads)
        np.testing.assert_array_equal(scores, expected[0])
        np.testing.assert_array_equal(indices, expected[1])
    maps = feature_maps(7)
    expected_labels = cm.cluster_feature_maps(maps, n_clusters=[2, 3], n_threads=1)
    for n_threads in (0, 3, 10**6):
        labels = cm.cluster_feature_maps(maps, n_clusters=[2, 3], n_threads=n_threads)
        for got, want in zip(labels, expected_labels, strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_million_threads_are_capped_under_a_memory_limit():
    """Before the cap, n_threads=10**6 started one thread per database block (here 400): under an
    address-space limit the 30th or so failed and std::thread's destructor aborted the interpreter.
    Capped at the hardware concurrency, the call fits and gives the single-thread result."""
    code = textwrap.dedent(
        """
        import os, resource
        import numpy as np
        import clustermac as cm
        rng = np.random.default_rng(2)
        database = rng.standard_normal((400 * 256, 8)).astype(np.float32)
        queries = rng.standard_normal((5, 8)).astype(np.float32)
        maps = [rng.random((4, 4, 4), dtype=np.float32) for _ in range(300)]
        want_search = cm.topk_search(database, queries, 10, n_threads=1)
        want_labels = cm.cluster_feature_maps(maps, n_clusters=[2], rgb_clusters=0, n_threads=1)
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        headroom = (512 + 160 * os.cpu_count()) << 20  # one thread: 8 MB stack + a malloc arena
        resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.RLIM_INFINITY))
        got_search = cm.topk_search(database, queries, 10, n_threads=10**6)
        got_labels = cm.cluster_feature_maps(maps, n_clusters=[2], rgb_clusters=0, n_threads=10**6)
        assert all((a == b).all() for a, b in zip(got_search, want_search))
        assert all((a[0] == b[0]).all() for a, b in zip(got_labels, want_labels))
        print("capped ok")
        """
    )
    result = run_child(code)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "capped ok" in result.stdout


def test_a_thread_that_cannot_start_is_a_runtime_error_not_an_abort():
    """With RLIMIT_STACK beyond the address space, glibc cannot map any thread's stack, so every
    thread start fails (std::system_error): the call must raise RuntimeError and the process go on."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one hardware thread: the pool is capped at 1 and never starts a thread")
    code = textwrap.dedent(
        """
        import threading
        try:
            threading.Thread(target=lambda: None).start()
        except RuntimeError:
            pass
        else:
            print("SKIP: threads still start under this stack limit")
            raise SystemExit(0)
        import numpy as np
        import clustermac as cm
        rng = np.random.default_rng(3)
        database = rng.standard_normal((4 * 256, 8)).astype(np.float32)
        maps = [rng.random((4, 4, 4), dtype=np.float32) for _ in range(4)]
        for call in (
            lambda n: cm.topk_search(database, database[:3], 5, n_threads=n),
            lambda n: cm.cluster_feature_maps(maps, n_clusters=[2], rgb_clusters=0, n_threads=n),
        ):
            try:
                call(0)
            except RuntimeError as error:
                assert "could not start worker thread" in str(error), str(error)
                assert "n_threads=1" in str(error), str(error)
            else:
                raise AssertionError("no RuntimeError although no thread can start")
            call(1)  # the calling thread alone still works
        print("runtime error ok")
        """
    )
    result = run_child(code, stack_limit=1 << 47)
    if "SKIP:" in result.stdout:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "runtime error ok" in result.stdout


# --- item 9: sizes -------------------------------------------------------------------------------


def test_rmac_regions_refuses_absurd_sizes():
    with pytest.raises(ValueError, match=r"height and width must be <= 2147483647"):
        cm.rmac_regions(2**40, 2**40)
    with pytest.raises(ValueError, match=r"levels must be <= 64"):
        cm.rmac_regions(30, 30, 2**31 - 1)
    with pytest.raises(ValueError, match=r"levels must be <= 64"):
        cm.rmac_regions(30, 30, 2**40)
    for height, width in ((2**31 - 1, 2**31 - 1), (2**31 - 1, 5), (7, 2**31 - 1)):
        regions = cm.rmac_regions(height, width, 64).astype(np.int64)
        assert len(regions) > 0
        assert (regions[:, :2] >= 0).all() and (regions[:, 0] < regions[:, 2]).all()
        assert (regions[:, 2] <= width).all() and (regions[:, 3] <= height).all()
    assert len(cm.rmac_regions(30, 30, 64)) > len(cm.rmac_regions(30, 30, 3))


def test_region_mac_refuses_an_output_over_one_gib():
    fmap = np.ones((512, 2, 2), np.float32)
    labels = np.zeros((2, 2), np.int32)
    labels[1, 1] = 2**20 - 1  # K = 2**20 rows × 512 channels = 2 GiB
    with pytest.raises(ValueError, match=r"region_mac: K = 1048576 rows .* 2 GiB .*limit is 1 GiB"):
        cm.region_mac(fmap, labels)
    codes = np.ones((2, 2, 512), np.uint8)
    with pytest.raises(ValueError, match=r"region_mac_codes: K = 1048576 rows .*limit is 1 GiB"):
        _core.region_mac_codes(codes, labels, None, 1.0)
    small = np.ones((4, 2, 2), np.float32)  # a sparse label is fine while the output is small
    out = cm.region_mac(small, labels)
    assert out.shape == (2**20, 4) and out[-1].tolist() == [1.0] * 4 and not out[1:-1].any()


def test_clustering_refuses_more_than_65536_locations(tmp_path):
    features = np.random.default_rng(4).random((65537, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"features: N = 65537 locations is more than the limit of 65536"):
        cm.affinity(features)
    big = np.ones((4, 257, 256), np.float32)  # 65,792 locations
    with pytest.raises(ValueError, match=r"feature_map: N = 65792 locations .* limit of 65536"):
        cm.cluster_feature_map(big)
    with pytest.raises(ValueError, match=r"feature_maps\[1\]: N = 65792"):
        cm.cluster_feature_maps([np.ones((4, 4, 4), np.float32), big])
    # An N×N affinity that large is 16 GiB; a sparse file mapped read-only stands in for it.
    path = tmp_path / "affinity.f32"
    with open(path, "wb") as f:
        f.truncate(65537 * 65537 * 4)
    huge = np.memmap(path, np.float32, "r", shape=(65537, 65537))
    for function in (cm.ncut, cm.ncut_embedding):
        with pytest.raises(ValueError, match=r"affinity: N = 65537 locations .* limit of 65536"):
            function(huge, 2)
    del huge


# --- items 10 and 11: untyped errors and silent garbage ------------------------------------------


def test_z_ratio_too_small_is_refused():
    features = np.random.default_rng(5).standard_normal((40, 3)).astype(np.float32)
    for z_ratio in (1e-40, 1e-20, 9e-9):
        with pytest.raises(ValueError, match=r"z_ratio: .* is too small \(the limit is 1e-8\)"):
            cm.affinity(features, z_ratio=z_ratio)
    with pytest.raises(ValueError, match=r"z_ratio: .* is too small \(the limit is 1e-8\)"):
        cm.cluster_feature_map(np.random.default_rng(5).random((4, 5, 5), dtype=np.float32), z_ratio=1e-40)
    s = cm.affinity(features, z_ratio=1e-8)  # the limit itself is accepted
    assert np.isfinite(s).all() and (np.diag(s) == 1.0).all()


def test_nan_and_inf_are_refused_by_l2_normalize_and_apply_whitening():
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((10, 4)).astype(np.float32)
    mean, projection = cm.fit_pca_whitening(vectors, dim=3)
    for bad in (np.nan, np.inf, -np.inf):
        broken = vectors.copy()
        broken[3, 1] = bad
        with pytest.raises(ValueError, match=r"^vectors contains NaN or Inf"):
            cm.l2_normalize(broken)
        with pytest.raises(ValueError, match=r"^vectors contains NaN or Inf"):
            cm.l2_normalize(broken[3])
        with pytest.raises(ValueError, match=r"^vectors contains NaN or Inf"):
            cm.apply_whitening(broken, mean, projection)
    huge = np.full((2, 4), 3e38, np.float32)
    with pytest.raises(ValueError, match=r"apply_whitening: the whitened vectors overflow float32"):
        cm.apply_whitening(huge, np.zeros(4, np.float32), np.full((2, 4), 10.0, np.float32))


def test_pooling_overflow_is_an_error():
    big = np.full((2, 4, 4), 3e38, np.float32)
    with pytest.raises(ValueError, match=r"spoc_pool: channel 0 overflows float32 .* too large"):
        cm.spoc_pool(big)
    big[1, ::2] = 0.0  # two channels with different non-zero proportions: CroW's weights are > 0
    with pytest.raises(ValueError, match=r"crow_pool: channel 0 overflows float32 .* too large"):
        cm.crow_pool(big)
    assert np.isfinite(cm.gem_pool(big)).all()  # GeM divides by the channel maximum first


def test_topk_search_score_overflow_is_an_error():
    database = np.ones((40, 2), np.float32)
    database[7] = 1e30
    with pytest.raises(ValueError, match=r"topk_search: the score of query 0 with database row 7 is inf"):
        cm.topk_search(database, np.full((1, 2), 1e10, np.float32), 3)
    # 1e60 − 1e60 inside one dot product: inf where the kernel fuses multiply and add (the
    # exact product is added to inf), NaN (never ranked) where it rounds each product first.
    database[7] = (1e30, 1e30)
    query = np.array([[1e30, -1e30]], np.float32)
    with pytest.raises(ValueError, match=r"topk_search: .* overflows? float32; the vectors are too large"):
        cm.topk_search(database, query, 40)
    code = textwrap.dedent(
        """
        import numpy as np
        import clustermac as cm
        database = np.ones((40, 2), np.float32)
        database[7] = (1e30, 1e30)
        try:
            cm.topk_search(database, np.array([[1e30, -1e30]], np.float32), 40)
        except ValueError as error:
            print(error)
        """
    )
    env = dict(os.environ, CLUSTERMAC_NO_AVX2="1")  # the scalar kernel: no fused multiply-add
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "topk_search: query 0 has NaN scores: its dot products overflow float32" in result.stdout
    scores, indices = cm.topk_search(database, np.ones((1, 2), np.float32), 3)
    assert indices[0, 0] == 7 and np.isfinite(scores).all()


def test_integer_and_number_arguments_give_value_errors():
    vectors = np.random.default_rng(7).standard_normal((10, 6)).astype(np.float32)
    for dim in (3.5, "3", [3]):
        with pytest.raises(ValueError, match=r"^dim: expected an integer or None, got"):
            cm.fit_pca_whitening(vectors, dim=dim)
    with pytest.raises(ValueError, match=r"dim: expected an integer or None that fits in 64 bits"):
        cm.fit_pca_whitening(vectors, dim=2**70)
    a = cm.fit_pca_whitening(vectors, dim=np.int64(3))
    b = cm.fit_pca_whitening(vectors, dim=3)
    np.testing.assert_array_equal(a[1], b[1])
    fmap = np.random.default_rng(8).random((4, 6, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^query_aspect: expected a number"):
        cm.aml_localize(fmap, fmap.max(axis=(1, 2)), query_aspect="wide")
    box, _ = cm.aml_localize(fmap, fmap.max(axis=(1, 2)), query_aspect=np.float32(1.0))
    assert box.shape == (4,)


def test_an_unpickled_float32_array_is_accepted_and_another_byte_order_refused():
    """Arrays that crossed a process boundary (pickle, Ray, multiprocessing) carry a dtype object
    equal to NumPy's float32 but not the same object; the core compares dtypes by equality."""
    import pickle

    x = pickle.loads(pickle.dumps(np.arange(6, dtype=np.float32).reshape(2, 3) + 1))
    np.testing.assert_array_equal(cm.l2_normalize(x), cm.l2_normalize(np.ascontiguousarray(x, np.float32)))
    with pytest.raises(ValueError, match="expected dtype float32"):
        cm.l2_normalize(x.astype(">f4"))
