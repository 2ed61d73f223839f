"""`clustermac demo`: the method working end to end, offline, in a few minutes.

1. Build a small instance-retrieval benchmark from real photographs installed with the package's
   dependencies (scikit-image, scikit-learn sample photos; Debian photo packages when present).
2. Extract feature maps once with the embedded EfficientNet-Lite0 (uncapped head; the ReLU6 maps
   of the network as trained are those capped at 6, see ``pipeline.relu6_feature_maps``).
3. Compare MAC, R-MAC, the paper's ClusterMAC and ours, ClusterMAC-box (crop I and crop X, with
   and without QE), whitening learned on a disjoint image set; the paper's ClusterMAC, R-MAC and
   ClusterMAC-box side by side with a paired bootstrap over queries.
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
from ..descriptors.registry import method_class
from ..files import atomic_write_bytes
from .datasets import load_dataset
from .evaluate import paired_bootstrap_interval
from .pipeline import (
    DatasetFeatureMaps,
    MethodSpec,
    dataset_feature_maps,
    descriptors_from_maps,
    evaluate_methods,
    fitted_extractor,
    full_ranks,
    per_query_scores,
    relu6_feature_maps,
    score_ranks,
)

DEMO_METHODS = (
    MethodSpec("MAC", "mac"),
    MethodSpec("R-MAC", "rmac"),
    MethodSpec("ClusterMAC", "clustermac"),
    MethodSpec("ClusterMAC-box (ours)", "clustermac-box"),
)
#: The side-by-side table of the report: (label in DEMO_METHODS, what to call it); the first
#: holds R-MAC, the reference of the paired differences.
COMPARISON = (
    ("R-MAC", "R-MAC (rmac)"),
    ("ClusterMAC", "ClusterMAC, the paper's (clustermac)"),
    ("ClusterMAC-box (ours)", "ClusterMAC-box, ours, the default (clustermac-box)"),
)
PCA_DIMS_FOR_FIGURE_3 = (1, 2, 4, 7, 16, 64)
DEMO_MAX_SIZE = 640
#: The commands behind the report's figures (shown in it).
COMMANDS = (
    "clustermac demo --out DIR [--seed S]  (this report)",
    "clustermac evaluate --data-root DIR/benchmark --whitening-root DIR/whitening --methods clustermac rmac "
    "clustermac-box --max-size 640 --crops image activations --out EVAL  (the same three methods on this "
    "benchmark, or on Oxford/Paris with --dataset)",
)


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

    sources = photo_benchmark.find_photo_sources()
    missing = photo_benchmark.missing_photo_packages(sources)
    if missing:
        _say(
            f"NOTE: the photo packages {missing} are not installed, so the benchmark is built from the pip "
            "packages' photographs only (the README's 'demo, pip photos only' row); for the full one run: "
            f"{photo_benchmark.INSTALL_PHOTOS_COMMAND}"
        )
    _say(f"1/4 building the {preset} benchmark from installed photographs in {out / 'benchmark'}")
    photo_benchmark.make_benchmark(out / "benchmark", preset=preset, seed=seed, sources=sources)
    whitening_dir = out / "whitening"
    whitening_images = photo_benchmark.make_whitening_set(whitening_dir, preset=preset, seed=seed + 1, sources=sources)
    dataset = load_dataset(out / "benchmark")
    _say(
        f"    {len(dataset.queries)} queries, {len(dataset.images)} database images, "
        f"{len(whitening_images)} whitening images"
    )

    uncapped = default_backbone(n_threads=threads, head="relu")
    backbone = default_backbone(n_threads=threads)  # ReLU6, as trained
    _say(
        f"2/4 extracting with {backbone.name} ({backbone.dim} channels, stride {backbone.stride}) "
        f"at {DEMO_MAX_SIZE} px, once (uncapped head; capped at 6 for the methods on ReLU6); "
        "then MAC, R-MAC, ClusterMAC and ClusterMAC-box on the same feature maps"
    )
    uncapped_maps = dataset_feature_maps(
        dataset, uncapped, whitening_images, crops=("image", "activations"), max_size=DEMO_MAX_SIZE
    )
    maps = relu6_feature_maps(uncapped_maps)
    result = _evaluate_by_head(dataset, {"relu6": (backbone, maps), "relu": (uncapped, uncapped_maps)})
    columns = ["mAP"] + (["Easy", "Medium", "Hard"] if dataset.has_revisited else [])
    header = ["Method", *columns]
    rows = [[r["label"], *(f"{r[c]:.1f}" for c in columns)] for r in result["rows"]]
    print(format_table(header, rows), flush=True)
    comparison = side_by_side(dataset, result["ranks"])
    comparison_header, comparison_rows = comparison_table(comparison)
    print(format_table(comparison_header, comparison_rows), flush=True)

    _say("3/4 the paper's figures")
    figure_list = _results_gallery(dataset, result["ranks"], figures) + _figures(dataset, backbone, maps, figures)

    _say("4/4 writing the report")
    elapsed = time.perf_counter() - started
    notes = [
        f"Backbone: {backbone.name} (embedded, ImageNet weights), images at most {DEMO_MAX_SIZE} px; "
        "MAC, R-MAC and ClusterMAC on its ReLU6 head as trained, ClusterMAC-box on the uncapped head "
        "(one backbone pass: the ReLU6 maps are the uncapped ones capped at 6).",
        f"Benchmark: {len(dataset.queries)} queries, {len(dataset.images)} database images "
        "built from installed photographs "
        f"(seed {seed}); whitening learned on {len(whitening_images)} disjoint images."
        + (
            f" The photo packages {missing} are not installed: pip photographs only "
            f"({photo_benchmark.INSTALL_PHOTOS_COMMAND} gives the full benchmark)."
            if missing
            else ""
        ),
        "ClusterMAC (the paper's): NCut on C-dim PCA features into 5 and 20 clusters + NCut on RGB into 5 "
        "(paper section 4.1), each cluster max-pooled over its own cells. ClusterMAC-box (ours, not in the "
        "paper; the library's default, Extractor()): R-MAC's square regions plus the bounding boxes of 20 "
        "feature clusters, max-pooled, on the uncapped head.",
        "Side by side: Δ is the mean per-query AP difference to R-MAC on the same queries, with the 95 % "
        "interval of a paired bootstrap over queries (10,000 resamples); an interval above 0 means better "
        "than R-MAC beyond the choice of queries. On this small benchmark the intervals are wide.",
        *(f"Command: {command}" for command in COMMANDS),
        f"Total time {elapsed:.0f} s.",
    ]
    tables = [
        ("Retrieval mAP (%)", header, rows),
        ("The paper's ClusterMAC, R-MAC and ClusterMAC-box side by side (no QE)", comparison_header, comparison_rows),
    ]
    write_report(out / "report.html", "clustermac demo", tables, figure_list, notes)
    summary = {
        "dataset": dataset.name,
        "rows": result["rows"],
        "comparison": comparison,
        "missing_photo_packages": missing,
        "timings": result["timings"],
        "seconds": elapsed,
    }
    atomic_write_bytes(out / "results.json", json.dumps(summary, indent=1).encode())
    _say(f"done in {elapsed:.0f} s: {out / 'report.html'}")
    return 0


def _evaluate_by_head(dataset, heads: dict) -> dict:
    """The demo's methods, each on the maps of its backbone head (``heads``: head → (backbone,
    maps)), rows in the order of DEMO_METHODS."""
    result: dict = {"rows": [], "ranks": {}, "timings": {"backbone_s": heads["relu"][1].seconds}}
    for spec in DEMO_METHODS:
        backbone, maps = heads[method_class(spec.method).backbone_head]
        part = evaluate_methods(dataset, backbone, maps, [spec], query_expansion=True, max_size=DEMO_MAX_SIZE)
        result["rows"] += part["rows"]
        result["ranks"].update(part["ranks"])
        result["timings"][f"{spec.label}_s"] = part["timings"][f"{spec.label}_s"]
    return result


def side_by_side(dataset, ranks: dict, resamples: int = 10000) -> list[dict]:
    """The methods of COMPARISON on crop I and crop X without QE: mAP (and Hard), and the
    per-query difference to R-MAC with its paired-bootstrap 95 % interval."""
    reference_label = COMPARISON[0][0]
    out = []
    for label, name in COMPARISON:
        entry: dict = {"method": label, "name": name}
        for crop in ("I", "X"):
            scores = per_query_scores(dataset, ranks[f"{label}, crop {crop}"])
            reference = per_query_scores(dataset, ranks[f"{reference_label}, crop {crop}"])
            for key, aps in scores.items():
                entry[f"{key} crop {crop}"] = float(np.nanmean(aps))
                if label != reference_label:
                    diff = aps - reference[key]
                    entry[f"Δ{key} crop {crop}"] = float(np.nanmean(diff))
                    entry[f"Δ{key} crop {crop} 95% CI"] = list(paired_bootstrap_interval(diff, resamples))
        out.append(entry)
    return out


def comparison_table(comparison: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table (mAP, Hard if any, Δ mAP to R-MAC [95 % CI])."""
    keys = [k for k in ("mAP", "Hard") if f"{k} crop I" in comparison[0]]
    header = ["Method"] + [f"{k} crop {c}" for k in keys for c in ("I", "X")]
    header += [f"Δ mAP vs R-MAC crop {c} [95% CI]" for c in ("I", "X")]
    rows = []
    for entry in comparison:
        row = [entry["name"]] + [f"{entry[f'{k} crop {c}']:.1f}" for k in keys for c in ("I", "X")]
        for crop in ("I", "X"):
            if f"ΔmAP crop {crop}" in entry:
                low, high = entry[f"ΔmAP crop {crop} 95% CI"]
                row.append(f"{entry[f'ΔmAP crop {crop}']:+.1f} [{low:+.1f}, {high:+.1f}]")
            else:
                row.append("reference")
        rows.append(row)
    return header, rows


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
