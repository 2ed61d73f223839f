"""Exact search of a few queries against a database held in RAM: our paths against FAISS.

    python benchmarks/search_in_ram.py [--rows 1000000] [--dim 512] [--batches 1 8] [--repeats 5] [--threads 1]

`benchmarks/search.py` searches a memory-mapped file in a fresh process, so its small batches
also pay the mapping of the file's pages (once per process). Here both sides hold the same
unit vectors in RAM (FAISS's `IndexFlatIP` has its own copy; its `add` is not timed), so the
figures compare the scans alone: `clustermac.topk_search` with `path="float32"`, `"bf16"`
(CPUs with AVX512-BF16) and `"auto"`, against `IndexFlatIP.search`, top 100, median of
`--repeats`, checked to return identical scores across our paths.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from search import cpu_name  # benchmarks/search.py, beside this script

from clustermac import _core


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    database = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(database)
    paths = ["float32", "bf16", "auto"] if "bf16" in str(_core.topk_search.__doc__) else ["float32", "auto"]
    print(f"CPU: {cpu_name()}; {args.rows} x {args.dim} unit vectors in RAM, top {args.k}, {args.threads} thread(s)")
    for batch in args.batches:
        queries = database[:batch] + 0.1 * rng.standard_normal((batch, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        seconds, scores = {}, {}
        for path in paths:
            try:
                scores[path] = _core.topk_search(database, queries, args.k, n_threads=args.threads, path=path)[0]
            except ValueError as error:  # no AVX512-BF16 on this CPU
                print(f"  {path}: {error}")
                continue
            seconds[path] = median_seconds(
                lambda p=path, q=queries: _core.topk_search(database, q, args.k, n_threads=args.threads, path=p),
                args.repeats,
            )
        seconds["faiss"] = median_seconds(lambda q=queries: flat.search(q, args.k), args.repeats)
        same = all(np.array_equal(scores[p], scores["float32"]) for p in scores)
        line = ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in seconds.items())
        ratios = ", ".join(
            f"{name} / faiss {seconds['faiss'] / value:.2f}x" for name, value in seconds.items() if name != "faiss"
        )
        print(f"{batch} queries: {line}; throughput {ratios}; our paths identical: {same}")


if __name__ == "__main__":
    main()
