"""`clustermac demo`: the method working end to end, offline, in a few minutes.

1. Build a small instance-retrieval benchmark from real photographs installed with the package's
   dependencies (scikit-image, scikit-learn sample photos; Debian photo packages when present).
2. Extract feature maps once with the embedded EfficientNet-Lite0.
3. Compare MAC, R-MAC and ClusterMAC (crop I and crop X, with and without QE), whitening learned
   on a disjoint image set.
4. Draw the paper's Figures 3–7 and write one HTML report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .._typing import PathLike
from ..backbones import default_backbone
from ..descriptors import Extractor
from ..descriptors.clustermac import cluster_labels
from ..files import atomic_write_bytes
from .datasets import load_dataset
from .pipeline import (
    DatasetFeatureMaps,
    MethodSpec,
    dataset_feature_maps,
    descriptors_from_maps,
    evaluate_methods,
    fitted_extractor,
    full_ranks,
    score_ranks,
)

DEMO_METHODS = (
    MethodSpec("MAC", "mac"),
    MethodSpec("R-MAC", "rmac"),
    MethodSpec("ClusterMAC", "clustermac"),
    MethodSpec("ClusterMAC + grid (ours)", "clustermac", {"add_grid_regions": True}),
    MethodSpec(
        "ClusterMAC box 20 + grid (ours)",
        "clustermac",
        {"cluster_pooling": "box", "n_clusters": (20,), "add_grid_regions": True},
    ),
)
PCA_DIMS_FOR_FIGURE_3 = (1, 2, 4, 7, 16, 64)
DEMO_MAX_SIZE = 640


def _say(message: str) -> None:
    print(f"[clustermac demo] {message}", flush=True)


def run_demo(out: PathLike = "clustermac-demo", seed: int = 0, quick: bool = False, threads: int | None = None) -> int:
    """Run the demo; writes ``out/report.html`` and ``out/results.json``. Returns 0."""
    from . import figures, photo_benchmark
    from .report import format_table, write_report

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = "quick" if quick else "demo"

    _say(f"1/4 building the {preset} benchmark from installed photographs in {out / 'benchmark'}")
    photo_benchmark.make_benchmark(out / "benchmark", preset=preset, seed=seed)
    whitening_dir = out / "whitening"
    whitening_images = photo_benchmark.make_whitening_set(whitening_dir, preset=preset, seed=seed + 1)
    dataset = load_dataset(out / "benchmark")
    _say(
        f"    {len(dataset.queries)} queries, {len(dataset.images)} database images, "
        f"{len(whitening_images)} whitening images"
    )

    backbone = default_backbone(n_threads=threads)
    _say(
        f"2/4 extracting with {backbone.name} ({backbone.dim} channels, stride {backbone.stride}) "
        f"at {DEMO_MAX_SIZE} px; "
        "then MAC, R-MAC and ClusterMAC on the same feature maps"
    )
    maps = dataset_feature_maps(
        dataset, backbone, whitening_images, crops=("image", "activations"), max_size=DEMO_MAX_SIZE
    )
    result = evaluate_methods(dataset, backbone, maps, DEMO_METHODS, query_expansion=True, max_size=DEMO_MAX_SIZE)
    columns = ["mAP"] + (["Easy", "Medium", "Hard"] if dataset.has_revisited else [])
    header = ["Method", *columns]
    rows = [[r["label"], *(f"{r[c]:.1f}" for c in columns)] for r in result["rows"]]
    table = format_table(header, rows)
    print(table, flush=True)

    _say("3/4 the paper's figures")
    figure_list = _results_gallery(dataset, result["ranks"], figures) + _figures(dataset, backbone, maps, figures)

    _say("4/4 writing the report")
    elapsed = time.perf_counter() - started
    notes = [
        f"Backbone: {backbone.name} (embedded, ImageNet weights), images at most {DEMO_MAX_SIZE} px.",
        f"Benchmark: {len(dataset.queries)} queries, {len(dataset.images)} database images "
        "built from installed photographs "
        f"(seed {seed}); whitening learned on {len(whitening_images)} disjoint images.",
        "ClusterMAC: NCut on C-dim PCA features into 5 and 20 clusters + NCut on RGB into 5 (paper section 4.1). "
        "'ClusterMAC + grid (ours)' adds R-MAC's square regions to the clusters (not in the paper); "
        "'ClusterMAC box 20 + grid (ours)' also pools each of 20 feature clusters (and the 5 RGB clusters) "
        "over its bounding box instead of its own cells.",
        f"Total time {elapsed:.0f} s.",
    ]
    write_report(out / "report.html", "clustermac demo", [("Retrieval mAP (%)", header, rows)], figure_list, notes)
    summary = {"dataset": dataset.name, "rows": result["rows"], "timings": result["timings"], "seconds": elapsed}
    atomic_write_bytes(out / "results.json", json.dumps(summary, indent=1).encode())
    _say(f"done in {elapsed:.0f} s: {out / 'report.html'}")
    return 0


GALLERY_RANKING = "ClusterMAC, crop I"  # the ranking the results gallery shows
GALLERY_QUERIES = 3
GALLERY_TOP = 10


def _results_gallery(dataset, ranks: dict, figures) -> list:
    """A few queries of the benchmark (spread over the list), each with its box and its top 10
    of ClusterMAC crop I, framed correct / junk / wrong by the ground truth."""
    from ..images import load_image

    order = ranks[GALLERY_RANKING]  # database × queries
    gnd = dataset.classic_gnd()
    count = len(dataset.queries)
    chosen = sorted({q * count // GALLERY_QUERIES for q in range(min(GALLERY_QUERIES, count))})
    rows = []
    for q in chosen:
        positives, junk = set(gnd[q]["ok"]), set(gnd[q]["junk"])
        results = []
        for i in order[:GALLERY_TOP, q]:
            status = "correct" if i in positives else "junk" if i in junk else "wrong"
            results.append((load_image(dataset.image_path(int(i))), status))
        rows.append(figures.results_gallery_figure(load_image(dataset.query_path(q)), dataset.query_boxes[q], results))
    caption = (
        f"Results gallery: {GALLERY_RANKING}, top {GALLERY_TOP} of {len(chosen)} queries (query box in red; "
        "frame green = correct, orange = junk, red = wrong)"
    )
    return [(caption, figures.stack_figures(rows))] if rows else []


def _figures(dataset, backbone, maps: DatasetFeatureMaps, figures) -> list:
    """The paper's Figures 7, 6, 5, 4 and 3 on the demo benchmark."""
    out = []
    ex = Extractor(backbone, "clustermac", max_size=DEMO_MAX_SIZE)
    query_paths = [str(dataset.query_path(i)) for i in range(len(dataset.queries))]
    examples = []
    for path in query_paths[:3]:
        prepared = ex.prepare(path)
        fmap, _ = ex.feature_map(prepared)
        examples.append((prepared.image, fmap))
        labels = _labels(ex, fmap, 10)
        out.append(
            (
                f"Fig. 7: {Path(path).name} — image, l2 norm of the features, 10 NCut clusters",
                figures.cluster_figure(prepared.image, fmap, labels),
            )
        )
    image, fmap = examples[0]
    out.append(
        (
            "Fig. 6: clusters without (paper) and with a spatial term",
            figures.spatial_ablation_figure(
                image, fmap, _labels(ex, fmap, 10), _labels(ex, fmap, 10, spatial_weight=1.0)
            ),
        )
    )
    out.append(
        (
            "Fig. 5: PCA dimensions 1, 2, 8, 64, 256, 512 of the local features "
            "(those the image has enough locations for)",
            figures.pca_dimensions_figure(image, fmap),
        )
    )
    curves = figures.region_precision_study(
        Extractor(backbone, "clustermac", max_size=DEMO_MAX_SIZE), query_paths, dataset.query_boxes
    )
    out.append(
        (
            "Fig. 4: share of regions whose precision (Eq. 1) reaches each threshold, R-MAC grid vs clusters",
            figures.region_precision_figure(curves),
        )
    )
    out.append(
        ("Fig. 3: ClusterMAC mAP against the PCA dimension C", _map_against_pca_dim(dataset, backbone, maps, figures))
    )
    return out


def _labels(ex: Extractor, fmap: np.ndarray, n_clusters: int, spatial_weight: float = 0.0) -> np.ndarray:
    """One NCut partition into ``n_clusters`` with the extractor's settings, no RGB clusters."""
    return cluster_labels(
        ex,
        np.ascontiguousarray(fmap, dtype=np.float32),
        None,
        n_clusters=(n_clusters,),
        rgb_clusters=0,
        spatial_weight=spatial_weight,
    )[0]


def _map_against_pca_dim(dataset, backbone, maps: DatasetFeatureMaps, figures) -> str:
    """Fig. 3: ClusterMAC (crop I, no QE) for several PCA dimensions C, on the cached maps."""
    xs, ys = [], []
    for c in PCA_DIMS_FOR_FIGURE_3:
        if c > backbone.dim:
            continue
        ex = fitted_extractor(backbone, MethodSpec(f"C={c}", "clustermac", {"pca_dim": c}), maps, DEMO_MAX_SIZE)
        ranks = full_ranks(descriptors_from_maps(ex, maps.database), descriptors_from_maps(ex, maps.queries["image"]))
        xs.append(c)
        ys.append(score_ranks(dataset, ranks)["mAP"])
    return figures.line_plot_svg(
        {"ClusterMAC, crop I": (xs, ys)}, "PCA dimension C", "mAP (%)", "mAP against C", log_x=True
    )
