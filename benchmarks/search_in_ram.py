"""Exact search of a few queries against a database held in RAM: our paths against FAISS.

    python benchmarks/search_in_ram.py [--rows 1000000] [--dim 512] [--batches 1 8] [--repeats 5]
        [--threads 1 2] [--levels native avx2]

`benchmarks/search.py` searches a memory-mapped file in a fresh process, so its small batches
also pay the mapping of the file's pages (once per process). Here both sides hold the same
unit vectors in RAM (FAISS's `IndexFlatIP` has its own copy; its `add` is not timed), so the
figures compare the scans alone: `clustermac.topk_search` with `path="float32"`, `"f32scan"`,
`"bf16"` (CPUs with AVX512-BF16) and `"auto"` (the path it chose is printed), against
`IndexFlatIP.search`, top 100, median of `--repeats`, the paths and FAISS alternating in each
round, checked to return identical scores across our paths.

`--levels avx2` runs the comparison again in a child process with both libraries capped at AVX2
(`CLUSTERMAC_NO_AVX512=1`, which also turns bf16 off, and `FAISS_SIMD_LEVEL=AVX2`): a CPU without
AVX-512 and AVX512-BF16, as far as the code is concerned (same caches and memory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from search import bf16_path_available, cpu_name  # benchmarks/search.py, beside this script

LEVEL_ENVIRONMENT = {"native": {}, "avx2": {"CLUSTERMAC_NO_AVX512": "1", "FAISS_SIMD_LEVEL": "AVX2"}}


def compare(database: np.ndarray, flat, paths: list[str], batch: int, threads: int, args, rng) -> None:
    """One batch size on one thread count: every path and FAISS, alternating, median of args.repeats."""
    import faiss

    from clustermac import _core

    faiss.omp_set_num_threads(threads)
    queries = database[:batch] + 0.1 * rng.standard_normal((batch, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    runs: dict[str, object] = {}
    scores, chosen = {}, ""
    for path in paths:
        scores[path], _, details = _core.topk_search(
            database, queries, args.k, n_threads=threads, path=path, return_details=True
        )
        chosen = details["path"] if path == "auto" else chosen
        runs[path] = lambda p=path: _core.topk_search(database, queries, args.k, n_threads=threads, path=p)
    runs["faiss"] = lambda: flat.search(queries, args.k)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved, so that load changes hit all alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    same = all(np.array_equal(scores[p], scores["float32"]) for p in scores)
    line = ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in seconds.items())
    ratios = ", ".join(f"{name} {seconds['faiss'] / value:.2f}x" for name, value in seconds.items() if name != "faiss")
    print(f"  {threads} thread(s), {batch} queries: {line} (auto chose {chosen})")
    print(f"      throughput against FAISS (FAISS time / ours): {ratios}; our paths identical: {same}")


def run_level(args) -> None:
    import faiss

    from clustermac import _core

    rng = np.random.default_rng(0)
    database = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(database)
    faiss_level = faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig") else "?"
    print(
        f"CPU: {cpu_name()}; load average {os.getloadavg()[0]:.1f}; clustermac SIMD level {_core.simd_level()}, "
        f"FAISS {faiss_level}; {args.rows} x {args.dim} unit vectors in RAM, top {args.k}, median of {args.repeats}"
    )
    paths = ["float32", "f32scan", "bf16", "auto"]
    if not bf16_path_available():  # no AVX512-BF16 on this CPU (or at this level)
        print("  bf16 left out: this CPU has no AVX512-BF16 (or CLUSTERMAC_NO_BF16 is set)")
        paths.remove("bf16")
    for threads in args.threads:
        for batch in args.batches:
            compare(database, flat, paths, batch, threads, args, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--levels", nargs="+", choices=sorted(LEVEL_ENVIRONMENT), default=["native"])
    parser.add_argument("--this-level", action="store_true", help=argparse.SUPPRESS)  # a child: run here
    args = parser.parse_args()
    if args.this_level:
        run_level(args)
        return
    options = [str(v) for v in ("--rows", args.rows, "--dim", args.dim, "--repeats", args.repeats, "--k", args.k)]
    options += ["--batches", *map(str, args.batches), "--threads", *map(str, args.threads), "--this-level"]
    for level in args.levels:  # each level in its own process: the SIMD level is chosen once per process
        environment = {key: value for key, value in os.environ.items() if not key.startswith("CLUSTERMAC_NO_")}
        environment.update(LEVEL_ENVIRONMENT[level])
        subprocess.run([sys.executable, __file__, *options], env=environment, check=True)


if __name__ == "__main__":
    main()
