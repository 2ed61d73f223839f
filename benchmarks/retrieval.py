"""The full retrieval comparison on a large real-photo benchmark.

    python benchmarks/retrieval.py --out /tmp/cm-retrieval [--rerank] [--ablations]

Builds (or reuses) a benchmark of >= 50 queries and >= 1,000 database images from installed
photographs, extracts feature maps once with the embedded EfficientNet-Lite0 (or --onnx), and
reports mAP (classic and Easy/Medium/Hard) of MAC, SPoC, GeM, CroW, R-MAC and ClusterMAC, each
with and without average QE (and AML re-ranking + QE for R-MAC and ClusterMAC with --rerank),
for crop I and crop X queries. With --ablations, ClusterMAC variants (C, z, cluster counts,
RGB clusters, dataset PCA, graph normalisation) run on the same feature maps.
Writes results.json in --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clustermac.backbones import Backbone, default_backbone
from clustermac.bench import photo_benchmark
from clustermac.bench.datasets import load_dataset
from clustermac.bench.pipeline import DEFAULT_METHODS, MethodSpec, dataset_feature_maps, evaluate_methods
from clustermac.bench.report import format_table

ABLATIONS = (
    MethodSpec("ClusterMAC + grid regions", "clustermac", {"add_grid_regions": True}),
    MethodSpec("ClusterMAC C=4", "clustermac", {"pca_dim": 4}),
    MethodSpec("ClusterMAC C=16", "clustermac", {"pca_dim": 16}),
    MethodSpec("ClusterMAC z=0.1", "clustermac", {"z_ratio": 0.1}),
    MethodSpec("ClusterMAC z=0.02", "clustermac", {"z_ratio": 0.02}),
    MethodSpec("ClusterMAC no RGB", "clustermac", {"rgb_clusters": 0}),
    MethodSpec("ClusterMAC 5+15", "clustermac", {"n_clusters": (5, 15), "rgb_clusters": 0}),
    MethodSpec("ClusterMAC 1+5+20", "clustermac", {"n_clusters": (1, 5, 20)}),
    MethodSpec("ClusterMAC dataset PCA", "clustermac", {"clustering_pca": "dataset"}),
    MethodSpec("ClusterMAC Shi normalisation", "clustermac", {"normalization": "shi"}),
    MethodSpec("ClusterMAC spatial 0.5", "clustermac", {"spatial_weight": 0.5}),  # the paper's Fig. 6 term
    MethodSpec("ClusterMAC spatial 2", "clustermac", {"spatial_weight": 2.0}),
    MethodSpec("ClusterMAC spatial 5", "clustermac", {"spatial_weight": 5.0}),
    # Our variant: each cluster max-pooled over its bounding box (cluster_pooling="box").
    MethodSpec("ClusterMAC box", "clustermac", {"cluster_pooling": "box"}),
    MethodSpec("ClusterMAC box + grid", "clustermac", {"cluster_pooling": "box", "add_grid_regions": True}),
    MethodSpec(
        "ClusterMAC box 20 + grid",
        "clustermac",
        {"cluster_pooling": "box", "add_grid_regions": True, "n_clusters": (20,)},
    ),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="retrieval-benchmark")
    parser.add_argument("--preset", default="large", help="benchmark size preset of clustermac.bench.photo_benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=None, help="long side of the benchmark's images (default: the preset's)"
    )
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument(
        "--allow-smaller",
        action="store_true",
        help="when photo packages are missing, build a smaller benchmark than the preset (whose figures then differ "
        "from the README's) instead of stopping with the command that installs them (benchmarks/install-photos.sh)",
    )
    parser.add_argument("--onnx", help="another backbone (.onnx) instead of the embedded EfficientNet-Lite0")
    parser.add_argument(
        "--preset-backbone", default=None, help="preprocessing preset for --onnx (vgg16, resnet101, ...)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--precision", default="float32", choices=("float32", "int8"), help="backbone precision (int8: quantised)"
    )
    parser.add_argument("--rerank", action="store_true", help="also AML re-ranking + QE for R-MAC and ClusterMAC")
    parser.add_argument("--ablations", action="store_true", help="also ClusterMAC variants")
    parser.add_argument("--crops", nargs="+", default=["image", "activations"])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (labels, e.g. R-MAC ClusterMAC)")
    parser.add_argument("--rerank-top", type=int, default=1000, help="how many items AML re-ranks (Tolias: 1000)")
    parser.add_argument(
        "--rerank-clusters",
        choices=["stored", "box"],
        default="stored",
        help="ClusterMAC inside an AML box: the image's own clusters (stored) or re-clustered per box",
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench_dir, whitening_dir = out / "benchmark", out / "whitening"
    if not (bench_dir / "jpg").is_dir():
        print(f"building the {args.preset} benchmark in {bench_dir}", flush=True)
        photo_benchmark.make_benchmark(
            bench_dir, preset=args.preset, size=args.size, seed=args.seed, allow_smaller=args.allow_smaller
        )
    dataset = load_dataset(bench_dir)
    shortfall = photo_benchmark.preset_shortfall(len(dataset.queries), args.preset)
    if shortfall and not args.allow_smaller:
        raise SystemExit(f"retrieval.py: {shortfall} (or pass --allow-smaller)")
    if shortfall:
        print(f"WARNING: {shortfall}", flush=True)
    whitening_images = photo_benchmark.make_whitening_set(
        whitening_dir, preset=args.preset, size=args.size, seed=args.seed + 1
    )
    print(
        f"{dataset.name}: {len(dataset.queries)} queries, {len(dataset.images)} database images, "
        f"{len(whitening_images)} whitening images",
        flush=True,
    )

    backbone = (
        Backbone(args.onnx, preset=args.preset_backbone, n_threads=args.threads, precision=args.precision)
        if args.onnx
        else default_backbone(n_threads=args.threads, precision=args.precision)
    )
    maps = dataset_feature_maps(dataset, backbone, whitening_images, crops=args.crops, max_size=args.max_size)
    methods = list(DEFAULT_METHODS) + (list(ABLATIONS) if args.ablations else [])
    if args.methods:
        methods = [m for m in methods if m.label in args.methods]
    result = evaluate_methods(
        dataset,
        backbone,
        maps,
        methods,
        query_expansion=True,
        rerank=args.rerank,
        rerank_top=args.rerank_top,
        rerank_clusters=args.rerank_clusters,
        max_size=args.max_size,
    )

    columns = ["mAP"] + (["Easy", "Medium", "Hard"] if dataset.has_revisited else [])
    print(format_table(["Method", *columns], [[r["label"], *(f"{r[c]:.1f}" for c in columns)] for r in result["rows"]]))
    summary = {
        "command": " ".join(["python", "benchmarks/retrieval.py", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": dataset.name,
        "n_queries": len(dataset.queries),
        "n_database": len(dataset.images),
        "backbone": backbone.name,
        "max_size": args.max_size,
        "rerank_top": args.rerank_top if args.rerank else None,
        "rows": result["rows"],
        "timings": result["timings"],
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'results.json'} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
