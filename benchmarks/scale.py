"""A compressed FAISS index at 10 million images: build time, peak memory, size, queries/s, recall.

    python benchmarks/scale.py [--n 10000000] [--dim 256] [--factory "IVF4096_HNSW32,PQ32"]
        [--train-size 100000] [--nprobes 8 16 32 64] [--rescore 0 200] [--write-vectors] [--out /tmp/cm-scale]

Kept out of CI (minutes to an hour). The descriptors are not near-copies of a few real ones
(every top-100 would then be a set of copies) but draws from a Gaussian mixture (diagonal
covariances) fitted to real descriptors of our photo benchmark:

1. Mixture (cached in ``<cache>/scale-mixture-<preset>-<dim>d-<k>.npz``, see
   :func:`clustermac.backbones.efficientnet_lite.cache_dir`): the photo benchmark (``--preset``,
   default ``demo``) and its whitening set are generated, the embedded EfficientNet-Lite0 runs
   once over them, ClusterMAC descriptors are whitened to ``--dim`` dimensions (the whitening
   learned on the whitening set) and ``sklearn.mixture.GaussianMixture(k, "diag")`` is fitted to
   the database, query and whitening-set descriptors. The same run measures the mAP cost of the
   dimension reduction (ClusterMAC, crop I, no QE: full whitening, 512 and ``--dim``) and stores it.
2. Collection: row chunks of ``--chunk-rows`` drawn from the mixture with the seed
   ``(seed, 0, chunk number)`` and l2-normalised, so any chunk can be made again on its own and the
   collection is never held in memory (:class:`MixtureRows`, an array-like over it). The index is trained
   on ``--train-size`` fresh draws (seed ``(seed, 3)``: the rows are independent draws, so this is
   distributed as a random sample of them and costs no pass over the collection), then
   :meth:`clustermac.Index.add` receives the chunks one by one (with ``--write-vectors`` they are also
   written to ``--out/vectors.npy``, for ``--rescore``).
3. Queries, two sets measured separately: ``held-out``: ``--queries`` new draws from the same mixture
   (seed ``(seed, 1)``), not rows of the collection (the hard case: the mixture's components are broad, so a
   query's true neighbours are barely closer than its 100th); ``perturbed``: random rows of the collection
   plus Gaussian noise of norm ``--perturbation`` (cosine about 0.71 to their row: "another photo of an
   indexed object").
4. Exact neighbours: the chunks made again and streamed through the exact kernel
   (``clustermac._core.topk_search``), top-100 merged across chunks (ties by the smaller row), for both
   query sets at once; saved in ``--out/queries.npz``.
5. Measures: train and add time, peak memory of the build (VmHWM of this process: imports, mixture, the
   index being built, one chunk), the saved index's size, its load time (memory-mapped), and for each
   nprobe (and ``--rescore R``: the top R re-scored exactly from the float vectors): queries/s of the
   queries batched and ``--single-queries`` of them one at a time, at 1 and 2 FAISS threads,
   1-recall@100 (the true nearest neighbour in the top 100), 10-recall@10 and 100-recall@100.

``--search-only`` measures again with the index, queries and exact neighbours already in ``--out``;
``--reuse DIR`` builds another factory over the same collection and takes the queries, exact neighbours
and float vectors of the run in DIR.

Writes ``results.json`` in ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RECALL_K = 100


# ---------------------------------------------------------------------------------- the mixture
def fit_mixture(cache: Path, preset: str, dim: int, components: int, seed: int) -> dict:
    """Fit (or load from the cache) the Gaussian mixture of real ClusterMAC descriptors, whitened to ``dim``."""
    file = cache / f"scale-mixture-{preset}-{dim}d-{components}.npz"
    if not file.is_file():
        from sklearn.mixture import GaussianMixture

        real, meta = real_descriptors(cache, preset, dim, seed)
        gmm = GaussianMixture(components, covariance_type="diag", random_state=seed, reg_covar=1e-5).fit(real)
        meta.update(components=components)
        save_npz(
            file,
            weights=gmm.weights_.astype(np.float64),
            means=gmm.means_.astype(np.float32),
            variances=gmm.covariances_.astype(np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
    with np.load(file) as data:
        mixture = {name: data[name] for name in ("weights", "means", "variances")}
        mixture["meta"] = json.loads(bytes(data["meta"]).decode())
    return mixture


def real_descriptors(cache: Path, preset: str, dim: int, seed: int) -> tuple[np.ndarray, dict]:
    """ClusterMAC descriptors (embedded EfficientNet-Lite0) of the photo benchmark's database, queries and
    whitening set, whitened to ``dim`` (cached), and the benchmark's mAP at full, 512 and ``dim`` dimensions."""
    file = cache / f"scale-real-{preset}-{dim}d.npz"
    if not file.is_file():
        from clustermac.backbones import default_backbone
        from clustermac.bench import photo_benchmark
        from clustermac.bench.datasets import load_dataset
        from clustermac.bench.pipeline import (
            MethodSpec,
            dataset_feature_maps,
            descriptors_from_maps,
            fitted_extractor,
            full_ranks,
            score_ranks,
        )

        work = cache / f"scale-benchmark-{preset}"
        if not (work / "benchmark" / "jpg").is_dir():
            photo_benchmark.make_benchmark(work / "benchmark", preset=preset, seed=seed)
        whitening_images = photo_benchmark.make_whitening_set(work / "whitening", preset=preset, seed=seed + 1)
        dataset = load_dataset(work / "benchmark")
        backbone = default_backbone()
        maps = dataset_feature_maps(dataset, backbone, whitening_images, crops=("image",))
        map_by_dim = {}
        for reduced in (None, 512, dim):
            spec = MethodSpec("ClusterMAC", "clustermac", {"whitening_dim": reduced})
            extractor = fitted_extractor(backbone, spec, maps)
            database = descriptors_from_maps(extractor, maps.database, True, f"database at {extractor.dim} dims")
            queries = descriptors_from_maps(extractor, maps.queries["image"])
            map_by_dim[str(extractor.dim)] = score_ranks(dataset, full_ranks(database, queries))
            if reduced == dim:
                real = np.concatenate([database, queries, descriptors_from_maps(extractor, maps.whitening)])
        real = real[np.linalg.norm(real, axis=1) > 0]
        meta = {
            "preset": preset,
            "dim": dim,
            "real_descriptors": int(real.shape[0]),
            "method": "ClusterMAC (embedded EfficientNet-Lite0), crop I, whitened; mAP without QE",
            "map_by_dim": map_by_dim,
        }
        save_npz(file, real=real, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    with np.load(file) as data:
        return data["real"], json.loads(bytes(data["meta"]).decode())


def save_npz(file: Path, **arrays: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, file)


def draw(mixture: dict, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` l2-normalised float32 draws from the mixture."""
    component = rng.choice(len(mixture["weights"]), size=rows, p=mixture["weights"] / mixture["weights"].sum())
    out = rng.standard_normal((rows, mixture["means"].shape[1]), dtype=np.float32)
    out *= np.sqrt(mixture["variances"])[component]
    out += mixture["means"][component]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


class MixtureRows:
    """The collection as an array-like (``len``, ``shape``, ``dtype``, rows by int / slice / sorted
    integer array): chunk ``c`` is drawn with the seed ``(seed, 0, c)`` whenever rows of it are asked for."""

    def __init__(self, mixture: dict, n: int, chunk_rows: int, seed: int) -> None:
        self.mixture, self.n, self.chunk_rows, self.seed = mixture, n, chunk_rows, seed
        self.shape = (n, mixture["means"].shape[1])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.n

    def chunk(self, c: int) -> np.ndarray:
        rows = min(self.chunk_rows, self.n - c * self.chunk_rows)
        return draw(self.mixture, rows, np.random.default_rng([self.seed, 0, c]))

    def iter_chunks(self):
        for c in range(-(-self.n // self.chunk_rows)):
            yield c * self.chunk_rows, self.chunk(c)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step != 1:
                raise ValueError("MixtureRows: slices with a step are not supported")
            key = np.arange(start, stop)
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, self.shape[1]), dtype=np.float32)
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of):
            inside = chunk_of == c
            out[inside] = self.chunk(int(c))[rows[inside] - c * self.chunk_rows]
        return out


class RowNames:
    """Names ``"000000000"``, ``"000000001"``, ... made when asked (a slice gives a list)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> list[str]:
        return [f"{i:09d}" for i in range(*key.indices(self.n))]


# ---------------------------------------------------------------------------------- measures
def memory_status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux), from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def exact_neighbours(rows: MixtureRows, queries: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, rows) of every query, streaming the chunks through ``topk_search``."""
    from clustermac import _core

    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start, chunk in rows.iter_chunks():
        scores, indices = _core.topk_search(chunk, queries, min(k, chunk.shape[0]), threads)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_rows = np.concatenate([best_rows, indices + start], axis=1)
        order = np.lexsort((all_rows, -all_scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_rows = np.take_along_axis(all_rows, order, axis=1)
    return best_scores, best_rows


def recalls(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """1-recall@100, 10-recall@10 and 100-recall@100 of ``found`` (Q × >=100 rows) against ``truth``."""
    one = np.mean([truth[q, 0] in found[q, :100] for q in range(len(truth))])
    ten = np.mean([len(set(truth[q, :10]) & set(found[q, :10])) / 10 for q in range(len(truth))])
    hundred = np.mean([len(set(truth[q, :100]) & set(found[q, :100])) / 100 for q in range(len(truth))])
    return {"1-recall@100": float(one), "10-recall@10": float(ten), "100-recall@100": float(hundred)}


def queries_per_second(index, queries: np.ndarray, batched: bool, **search) -> tuple[float, np.ndarray]:
    """Queries/s of ``index.search`` over ``queries``, all in one call or one call per query."""
    started = time.perf_counter()
    if batched:
        _, found = index.search(queries, RECALL_K, **search)
    else:
        found = np.concatenate([index.search(q[None, :], RECALL_K, **search)[1] for q in queries])
    return len(queries) / (time.perf_counter() - started), found


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="collection size (default 10,000,000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--factory", default="IVF4096_HNSW32,PQ32")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--efsearch", type=int, default=None, help="HNSW quantizer efSearch (default: 2 × nprobe)")
    parser.add_argument("--rescore", type=int, nargs="+", default=[0], help="0: none; R: re-score the top R exactly")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument(
        "--perturbation", type=float, default=1.0, help="noise norm of the perturbed queries (default 1: cosine ~0.71)"
    )
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--components", type=int, default=16, help="Gaussian mixture components")
    parser.add_argument("--preset", default="demo", help="photo benchmark preset the mixture is fitted to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/cm-scale")
    parser.add_argument(
        "--write-vectors", action="store_true", help="also write the float vectors (for --rescore; 1 KB per row)"
    )
    parser.add_argument(
        "--search-only", action="store_true", help="reuse the index, queries and exact neighbours in --out"
    )
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="DIR",
        help="take the queries, exact neighbours and float vectors of an earlier run (same --n, --seed) from DIR",
    )
    parser.add_argument("--cache", default=None, help="default: clustermac's cache folder")
    args = parser.parse_args(argv)

    import faiss

    from clustermac import Index
    from clustermac.backbones.efficientnet_lite import cache_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    result: dict = {
        "command": " ".join(["python", "benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "n": args.n,
        "dim": args.dim,
        "factory": args.factory,
    }

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    mixture = fit_mixture(Path(args.cache) if args.cache else cache_dir(), args.preset, args.dim, args.components, 0)
    result["mixture"] = mixture["meta"]
    log(f"mixture: {mixture['meta']}")
    rows = MixtureRows(mixture, args.n, args.chunk_rows, args.seed)
    vectors_file = (Path(args.reuse) if args.reuse else out) / "vectors.npy"
    if not args.search_only:
        result.update(build(rows, args, out, log))
        (out / "results.json").write_text(json.dumps(result, indent=1))
    else:
        result.update(json.loads((out / "results.json").read_text())["build_results"])
    with np.load((Path(args.reuse) if args.reuse else out) / "queries.npz") as data:
        query_sets = {kind: data[kind] for kind in ("held-out", "perturbed")}
        truths = {kind: data[f"truth-{kind}"] for kind in ("held-out", "perturbed")}

    started = time.perf_counter()
    index = Index.load(out / "index")
    result["load_s"] = time.perf_counter() - started
    result["rss_after_load_bytes"] = memory_status("VmRSS")
    log(f"index {result['index_bytes'] / 1e9:.2f} GB, loaded (memory-mapped) in {result['load_s']:.1f} s")
    if max(args.rescore) > 0:
        index.attach_vectors(vectors_file)

    result["curve"] = []
    for kind, queries in query_sets.items():
        for nprobe in args.nprobes:
            for rescore in args.rescore:
                search = {"nprobe": nprobe, "efsearch": args.efsearch or 2 * nprobe}
                if rescore:
                    search["rescore"] = rescore
                point = {"queries": kind, "nprobe": nprobe, "efsearch": search["efsearch"], "rescore": rescore}
                for threads in (1, 2):
                    faiss.omp_set_num_threads(threads)
                    point[f"batched_qps_{threads}t"], found = queries_per_second(index, queries, True, **search)
                    single = queries[: args.single_queries]
                    point[f"single_qps_{threads}t"], _ = queries_per_second(index, single, False, **search)
                point.update(recalls(found, truths[kind]))
                result["curve"].append(point)
                log(json.dumps(point))
                (out / ("results-search.json" if args.search_only else "results.json")).write_text(
                    json.dumps(result, indent=1)
                )
    print(format_curve(result["curve"]))
    return 0


def build(rows: MixtureRows, args: argparse.Namespace, out: Path, log) -> dict:
    """Train, add chunk by chunk (writing the float vectors beside, for re-scoring, with ``--write-vectors``),
    save; then the exact neighbours of both query sets. Returns the figures (also under "build_results")."""
    import faiss

    from clustermac import Index

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng([args.seed, 2])
    perturbed_from = np.sort(rng.choice(rows.n, size=args.queries, replace=False))
    index = Index(args.dim, "faiss", faiss_factory=args.factory)
    started = time.perf_counter()
    # The rows are independent draws of the mixture, so a fresh draw is distributed as a random sample of them
    # (and costs no pass over the collection).
    index.train(draw(rows.mixture, min(args.train_size, rows.n), np.random.default_rng([args.seed, 3])))
    train_s = time.perf_counter() - started
    log(f"trained in {train_s:.0f} s")
    stored = None
    if args.write_vectors:  # written, not memory-mapped: mapped pages would count in the peak memory
        stored = open(out / "vectors.npy", "wb")
        header = {"descr": "<f4", "fortran_order": False, "shape": rows.shape}
        np.lib.format.write_array_header_1_0(stored, header)
    picked = []
    started = time.perf_counter()
    for start, chunk in rows.iter_chunks():
        index.add(chunk, RowNames(rows.n)[start : start + chunk.shape[0]])
        inside = perturbed_from[(perturbed_from >= start) & (perturbed_from < start + chunk.shape[0])]
        picked.append(chunk[inside - start])
        if stored is not None:
            stored.write(chunk.tobytes())
        if (start // rows.chunk_rows) % 16 == 0:
            log(f"added {start + chunk.shape[0]:,} rows")
    if stored is not None:
        stored.close()
    add_s = time.perf_counter() - started
    figures: dict = {
        "build": {
            "train_size": min(args.train_size, rows.n),
            "train_s": train_s,
            "add_s": add_s,
            "peak_memory_bytes": memory_status("VmHWM"),
            "vectors_written": bool(args.write_vectors),
        }
    }
    log(f"built: {figures['build']}")
    index.save(out / "index")
    figures["index_bytes"] = folder_bytes(out / "index")
    del index
    if args.reuse:  # the same collection (--n, --seed, --chunk-rows): its queries and exact neighbours
        figures["build_results"] = dict(figures)
        return figures
    noisy = np.concatenate(picked)
    noisy += rng.standard_normal(noisy.shape, dtype=np.float32) * (args.perturbation / rows.shape[1] ** 0.5)
    query_sets = {
        "held-out": draw(rows.mixture, args.queries, np.random.default_rng([args.seed, 1])),
        "perturbed": (noisy / np.linalg.norm(noisy, axis=1, keepdims=True))[rng.permutation(args.queries)],
    }
    started = time.perf_counter()
    both = np.concatenate(list(query_sets.values()))
    _, truth = exact_neighbours(rows, both, RECALL_K, 2)
    figures["exact_s"] = time.perf_counter() - started
    log(f"exact neighbours of {len(both)} queries in {figures['exact_s']:.0f} s")
    truths = dict(zip(query_sets, np.split(truth, len(query_sets))))
    np.savez(out / "queries.npz", **query_sets, **{f"truth-{k}": v for k, v in truths.items()})
    figures["build_results"] = dict(figures)
    return figures


def format_curve(curve: list[dict]) -> str:
    lines = [
        f"{'queries':>9} {'nprobe':>6} {'rescore':>7} {'1-R@100':>8} {'10-R@10':>8} {'100-R@100':>9} "
        f"{'q/s 1t':>8} {'q/s 2t':>8} {'1-by-1 1t':>9} {'1-by-1 2t':>9}"
    ]
    for p in curve:
        lines.append(
            f"{p['queries']:>9} {p['nprobe']:>6} {p['rescore']:>7} {p['1-recall@100']:>8.3f} "
            f"{p['10-recall@10']:>8.3f} {p['100-recall@100']:>9.3f} {p['batched_qps_1t']:>8.0f} "
            f"{p['batched_qps_2t']:>8.0f} {p['single_qps_1t']:>9.0f} {p['single_qps_2t']:>9.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
