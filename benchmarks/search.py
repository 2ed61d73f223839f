"""Exact top-k search: clustermac.topk_search against FAISS's IndexFlatIP and NumPy, same data, same run.

    python benchmarks/search.py [--n 1000000] [--queries 1000] [--dim 512] [--k 100] [--repeats 3] [--threads 1 2]
        [--methods clustermac-float32 clustermac-bf16 clustermac-f32scan clustermac faiss numpy] [--small-batches 1 8]

The database is N unit vectors (float32, seeded) in a memory-mapped .npy file, so neither side
needs it in anonymous memory. Each measurement runs in a fresh subprocess (OPENBLAS/OMP threads
and n_threads = each of ``--threads``), which reports its wall time and peak RSS:

* clustermac: ``topk_search(memmap, queries, k)`` with ``path="auto"`` (what ``clustermac.Index``
  uses); clustermac-float32 / clustermac-bf16 / clustermac-f32scan force one path: the float32 kernel
  on every row, or the bf16 candidate scan (AVX512-BF16) or the float32 row scan (16 queries at a
  time) with the candidates re-scored by the float32 kernel. All return the same bits (checked); the
  scan runs report the mean candidates re-scored per query.
* faiss: ``IndexFlatIP`` — the exact index an expert would pick — holding the database (added in
  blocks from the memory-mapped file; the add is not timed, the search is), ``faiss.omp_set_num_threads``.
* NumPy: the database in blocks of ``--numpy-block`` rows (default 16384: a 64 MB score block
  for 1,000 queries, more working memory than clustermac's 1 MB), ``queries @ block.T`` (OpenBLAS)
  and ``argpartition`` per block, merging each block's top k into the running top k.

Prints the median times, the throughput ratios (queries·database rows per second) of each
clustermac path against FAISS and against the float32 path, each side's peak RSS during the
search (Linux VmHWM, reset at the start; mapped pages count, interpreter and imports included)
relative to the descriptors' size, and checks the top-k scores. ``--small-batches`` repeats the
comparison with only the first B queries (B = 1, 8, …), where converting the database costs most.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_data(directory: Path, n: int, dim: int, queries: int) -> tuple[Path, Path]:
    import numpy as np

    database_file, query_file = directory / f"database_{n}x{dim}.npy", directory / f"queries_{queries}x{dim}.npy"
    if not database_file.exists():
        rng = np.random.default_rng(0)
        partial = database_file.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, 65536):
            block = rng.standard_normal((min(65536, n - start), dim)).astype(np.float32)
            out[start : start + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
        out.flush()
        del out
        os.replace(partial, database_file)
    if not query_file.exists():
        rng = np.random.default_rng(1)
        q = rng.standard_normal((queries, dim)).astype(np.float32)
        np.save(query_file, q / np.linalg.norm(q, axis=1, keepdims=True))
    return database_file, query_file


def memory_status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux), from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


CLUSTERMAC_PATHS = {
    "clustermac": "auto",
    "clustermac-float32": "float32",
    "clustermac-bf16": "bf16",
    "clustermac-f32scan": "f32scan",
}


def worker(
    method: str,
    database_file: str,
    query_file: str,
    k: int,
    numpy_block: int,
    result_file: str,
    threads: int,
    batch: int | None,
) -> None:
    import numpy as np

    if method in CLUSTERMAC_PATHS:
        from clustermac import topk_search
    database = np.load(database_file, mmap_mode="r")
    queries = np.load(query_file)[:batch]
    details = {}
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        flat = faiss.IndexFlatIP(database.shape[1])
        for first in range(0, database.shape[0], 65536):
            flat.add(np.ascontiguousarray(database[first : first + 65536]))
    try:  # reset the peak-RSS counter, which a child inherits from its parent across exec
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass
    baseline = memory_status("VmRSS")
    start = time.perf_counter()
    if method in CLUSTERMAC_PATHS:
        scores, indices, details = topk_search(
            database, queries, k, threads, path=CLUSTERMAC_PATHS[method], return_details=True
        )
    elif method == "faiss":
        scores, indices = flat.search(queries, k)
    else:
        n = database.shape[0]
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        indices = np.zeros((queries.shape[0], k), dtype=np.int64)
        rows = np.arange(queries.shape[0])[:, None]
        for first in range(0, n, numpy_block):
            block = np.asarray(database[first : first + numpy_block])
            block_scores = queries @ block.T
            kk = min(k, block_scores.shape[1])
            top = np.argpartition(-block_scores, kk - 1, axis=1)[:, :kk]
            merged_scores = np.concatenate([scores, block_scores[rows, top]], axis=1)
            merged_indices = np.concatenate([indices, top + first], axis=1)
            keep = np.argpartition(-merged_scores, k - 1, axis=1)[:, :k]
            scores, indices = merged_scores[rows, keep], merged_indices[rows, keep]
        order = np.argsort(-scores, axis=1, kind="stable")
        scores, indices = scores[rows, order], indices[rows, order]
    elapsed = time.perf_counter() - start
    peak = memory_status("VmHWM")
    np.save(result_file, scores)
    print(json.dumps({"seconds": elapsed, "peak_bytes": peak, "baseline_bytes": baseline, **details}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="database size (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy-block", type=int, default=16384)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure (default 1 2)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["clustermac-float32", "clustermac-bf16", "clustermac", "faiss", "numpy"],
        choices=[*CLUSTERMAC_PATHS, "faiss", "numpy"],
    )
    parser.add_argument(
        "--small-batches", type=int, nargs="*", default=[], help="also compare with only the first B queries"
    )
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to keep the generated vectors (reused)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DATABASE", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker[0],
            args.worker[1],
            args.query_file,
            args.k,
            args.numpy_block,
            args.worker[2],
            args.threads[0],
            args.batch,
        )
        return

    if "clustermac-bf16" in args.methods and not bf16_path_available():
        args.methods = [m for m in args.methods if m != "clustermac-bf16"]
        print("clustermac-bf16 left out: this CPU has no AVX512-BF16 (or CLUSTERMAC_NO_BF16 is set)")
    directory = args.data_dir or Path(tempfile.gettempdir()) / "clustermac-search-bench"
    directory.mkdir(parents=True, exist_ok=True)
    database_file, query_file = make_data(directory, args.n, args.dim, args.queries)
    size = args.n * args.dim * 4
    print(
        f"database {args.n} x {args.dim} float32 ({size / 2**30:.2f} GiB, memory-mapped), "
        f"{args.queries} queries, exact top-{args.k}, {args.repeats} runs each"
    )
    print(f"CPU: {cpu_name()}")
    for threads in args.threads:
        for batch in [args.queries, *args.small_batches]:
            compare(args, database_file, query_file, directory, threads, size, batch)


def bf16_path_available() -> bool:
    """Whether topk_search's "bf16" path runs here (it raises ValueError on CPUs without AVX512-BF16)."""
    import numpy as np

    from clustermac import topk_search

    try:
        topk_search(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)[:1], 1, path="bf16")
    except ValueError:
        return False
    return True


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for the record beside the figures."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def compare(args, database_file: Path, query_file: Path, directory: Path, threads: int, size: int, batch: int) -> None:
    import numpy as np

    count = str(threads)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": count, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}
    runs: dict[str, list] = {method: [] for method in args.methods}
    results = {}
    for _ in range(args.repeats):
        for method in runs:  # interleaved, so that load changes hit all alike
            result_file = directory / f"result_{method}.npy"
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    str(database_file),
                    str(result_file),
                    "--query-file",
                    str(query_file),
                    "--k",
                    str(args.k),
                    "--numpy-block",
                    str(args.numpy_block),
                    "--threads",
                    count,
                    "--batch",
                    str(batch),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[method].append(json.loads(output.strip().splitlines()[-1]))
            results[method] = np.load(result_file)
    median = {m: float(np.median([r["seconds"] for r in runs[m]])) for m in runs}
    peak = {m: max(r["peak_bytes"] for r in runs[m]) for m in runs}
    baseline = {m: min(r["baseline_bytes"] for r in runs[m]) for m in runs}
    print(f"--- {threads} thread(s), {batch} queries")
    for m in runs:
        throughput = batch * args.n / median[m]
        rescored = [r["candidates_rescored"] / batch for r in runs[m] if r.get("path") in ("bf16", "f32scan")]
        note = f"  path {runs[m][0]['path']}" if "path" in runs[m][0] else ""
        if rescored:
            note += f", {np.mean(rescored):.1f} candidates re-scored per query"
        print(
            f"{m:>18}: median {median[m]:8.3f} s  ({throughput / 1e9:6.2f} G query-rows/s)  "
            f"runs {[round(r['seconds'], 3) for r in runs[m]]}  peak RSS {peak[m] / 2**30:.2f} GiB "
            f"= {peak[m] / size:.2f}x descriptors (before the search: {baseline[m] / 2**30:.2f} GiB){note}"
        )
    ours = [m for m in runs if m in CLUSTERMAC_PATHS]
    for mine in ours:
        for other in (m for m in runs if m != mine and (m not in CLUSTERMAC_PATHS or m == "clustermac-float32")):
            print(f"throughput ratio {mine} / {other}: {median[other] / median[mine]:.2f}x")
    for mine in ours[1:]:
        same = np.array_equal(results[mine], results[ours[0]])
        print(f"{mine} scores identical to {ours[0]}'s: {same}")
    for other in (m for m in runs if m not in CLUSTERMAC_PATHS):
        if ours:
            difference = float(np.abs(results[ours[0]] - results[other]).max())
            print(f"max |score difference| {ours[0]} vs {other} top-{args.k} lists: {difference:.2e}")


if __name__ == "__main__":
    main()
