"""The first search of a fresh process, as `clustermac search` pays it: loading the index (with and
without the checksum read) and "auto"'s path timing (with and without the on-disk cache of its choices).

    python benchmarks/first_search.py [--rows 500000] [--dim 512] [--rounds 5] [--queries 1]

Writes (once, reused) an exact index of ``--rows`` random unit vectors in the temp directory, then,
for ``--rounds`` rounds, runs four fresh child processes in turn, each loading the index and timing
one ``Index.search`` of ``--queries`` queries (top 10):

- ``Index.load(verify=True)`` (the default: reads every byte for its SHA-256) against
  ``verify=False`` (``clustermac search --no-verify``);
- the first search with an empty cache folder (``$CLUSTERMAC_CACHE``: "auto" times its paths) against
  one with the choices an earlier process left (``clustermac.search.path_cache``).

Prints the medians and their ratios. The index file is read once beforehand so that every process
finds it in the page cache (the first process would otherwise pay the disk). Thread CPU time is not
used: the load is I/O and the timing is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
import numpy as np
import clustermac
path, verify, queries = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
start = time.perf_counter()
index = clustermac.Index.load(path, verify=verify)
loaded = time.perf_counter()
rng = np.random.default_rng(1)
q = rng.standard_normal((queries, index.dim)).astype(np.float32)
index.search(q / np.linalg.norm(q, axis=1, keepdims=True), 10)
print(json.dumps({"load": loaded - start, "search": time.perf_counter() - loaded}))
"""


def make_index(path: Path, rows: int, dim: int) -> None:
    import clustermac

    if (path / "CURRENT").is_file():
        return
    rng = np.random.default_rng(0)
    index = clustermac.Index(dim)
    for start in range(0, rows, 65536):
        block = rng.standard_normal((min(65536, rows - start), dim)).astype(np.float32)
        names = [str(i) for i in range(start, start + len(block))]
        index.add(block / np.linalg.norm(block, axis=1, keepdims=True), names)
    index.save(path)


def child(index: Path, verify: bool, queries: int, cache: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(index), "1" if verify else "0", str(queries)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CLUSTERMAC_CACHE": str(cache)},
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1)
    args = parser.parse_args()
    index = Path(tempfile.gettempdir()) / f"clustermac-first-search-{args.rows}x{args.dim}.index"
    make_index(index, args.rows, args.dim)
    for file in index.rglob("*"):  # into the page cache
        if file.is_file():
            file.read_bytes()
    times: dict[str, list[float]] = {"verify": [], "no-verify": [], "timing": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        child(index, False, args.queries, warm)  # leaves its choices in the warm cache
        for round_ in range(args.rounds):
            empty = Path(tmp) / f"empty-{round_}"
            times["verify"].append(child(index, True, args.queries, warm)["load"])
            times["no-verify"].append(child(index, False, args.queries, warm)["load"])
            times["timing"].append(child(index, False, args.queries, empty)["search"])
            times["cached"].append(child(index, False, args.queries, warm)["search"])
    median = {name: statistics.median(values) for name, values in times.items()}
    size = args.rows * args.dim * 4 / 2**30
    print(f"index: {args.rows} x {args.dim} float32 ({size:.2f} GiB), {args.rounds} rounds of fresh processes")
    print(
        f"Index.load: verify=True {1e3 * median['verify']:.0f} ms, verify=False {1e3 * median['no-verify']:.0f} ms "
        f"-> {median['verify'] / median['no-verify']:.0f}x (runs {[round(1e3 * t) for t in times['verify']]} / "
        f"{[round(1e3 * t) for t in times['no-verify']]} ms)"
    )
    print(
        f"first search of {args.queries} quer{'y' if args.queries == 1 else 'ies'}: empty cache (auto times its paths) "
        f"{1e3 * median['timing']:.0f} ms, cached choices {1e3 * median['cached']:.0f} ms -> "
        f"{median['timing'] / median['cached']:.2f}x (runs {[round(1e3 * t) for t in times['timing']]} / "
        f"{[round(1e3 * t) for t in times['cached']]} ms)"
    )


if __name__ == "__main__":
    main()
