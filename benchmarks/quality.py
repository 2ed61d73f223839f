"""Research harness of issue 16: which descriptor beats R-MAC, measured with a paired bootstrap.

    python benchmarks/quality.py --out /tmp/q/b640                       # large preset, seed 0, 640 px
    python benchmarks/quality.py --out /tmp/q/b1024 --size 1024 --max-size 1024
    python benchmarks/quality.py --out /tmp/q/b640s1 --seed 1
    python benchmarks/quality.py --out /tmp/q/pip --preset demo --pip-only --max-size 576
    python benchmarks/quality.py --out ... --scales 1 0.7071 0.5       # multi-scale (three backbone passes)
    python benchmarks/quality.py --out ... --variants R-MAC "GeM-grid+box20" --qe

Builds the benchmark (or reuses it), runs the backbone ONCE per scale with the uncapped head
(``head="relu"``) and keeps the feature maps on disk; the ReLU6 maps of the network as trained are
exactly ``min(map, 6)`` of those, so both heads cost one pass. The NCut partitions are cached per
head. Every variant (head × regions × regional pooling × region weights) is then pooled in NumPy
from the cached maps, whitened (PCA-whitening learned on the benchmark's separate whitening set,
shrinkage 1e-3 as the library), and scored; each row has mAP (classic and Hard where the
benchmark has the revisited split) and a paired bootstrap over queries (10,000 resamples,
seed 0) of the mAP difference against R-MAC on the same head and scales, with its 95 % interval.
With ``--qe``, query expansion and re-ranking rows follow (average QE, α-QE, DBA + α-QE,
SuperGlobal's MDescAug + RerankwMDA) for the variants given.
Results go to ``<out>/quality-<max size>-<scales>.json`` and a table on stdout. Research only:
not run by the tests or by .ci/run.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from clustermac import _core
from clustermac.backbones import default_backbone
from clustermac.bench import photo_benchmark
from clustermac.bench.datasets import load_dataset
from clustermac.bench.evaluate import paired_bootstrap_interval
from clustermac.bench.pipeline import compute_feature_maps, per_query_scores
from clustermac.descriptors import Extractor
from clustermac.descriptors.base import cluster_boxes
from clustermac.descriptors.whitening import fit_whitening_on_vectors
from clustermac.search.global_rerank import superglobal_rerank
from clustermac.search.query_expansion import (
    alpha_query_expansion,
    average_query_expansion,
    database_side_augmentation,
)

RELU6_CAP = 6.0
SETS = ("database", "whitening", "image", "activations")  # the last two: queries, crop I and crop X

# name: (head, regions, pooling, weighting). Regions: "grid" (R-MAC's 3 levels), "clusters" (the
# paper's 5 + 20 feature clusters + 5 RGB clusters, each over its cells), "box20" (the 20 clusters,
# each over its bounding box), "boxall" (all 30 clusters over their boxes); joined with "+".
VARIANTS: dict[str, tuple[str, ...]] = {
    "R-MAC": ("relu6", "grid", "max", "uniform"),
    "relu R-MAC": ("relu", "grid", "max", "uniform"),
    "relu GeM-grid": ("relu", "grid", "gem", "uniform"),
    "relu GeM-grid+box20": ("relu", "grid+box20", "gem", "uniform"),
    "relu GeM-grid+boxall": ("relu", "grid+boxall", "gem", "uniform"),
    "relu GeM-grid+clusters": ("relu", "grid+clusters", "gem", "uniform"),
    "relu GeM-grid+box20 mass": ("relu", "grid+box20", "gem", "mass"),
    "relu GeM-grid mass": ("relu", "grid", "gem", "mass"),
    "ClusterMAC (paper)": ("relu6", "clusters", "max", "uniform"),
    "relu ClusterMAC": ("relu", "clusters", "max", "uniform"),
    "box20+grid": ("relu6", "grid+box20", "max", "uniform"),
    "relu box20+grid": ("relu", "grid+box20", "max", "uniform"),
    "GeM-grid": ("relu6", "grid", "gem", "uniform"),
    "GeM-grid+box20": ("relu6", "grid+box20", "gem", "uniform"),
    "R-MAC mass": ("relu6", "grid", "max", "mass"),
    "clusters+grid": ("relu6", "grid+clusters", "max", "uniform"),
    "GeM-clusters": ("relu6", "clusters", "gem", "uniform"),
    "relu clusters+grid": ("relu", "grid+clusters", "max", "uniform"),
    # Session 7: boxes grown about their centre, boxes at two sizes, more partitions, part weights.
    "relu box20@1.5+grid": ("relu", "grid+box20@1.5", "max", "uniform"),
    "relu box20@2+grid": ("relu", "grid+box20@2", "max", "uniform"),
    "relu box20+box20@2+grid": ("relu", "grid+box20+box20@2", "max", "uniform"),
    "relu box5+box20+grid": ("relu", "grid+box5+box20", "max", "uniform"),
    "relu box20 w0.5+grid": ("relu", "grid+box20", "max", "box20=0.5"),
    "relu box20 w2+grid": ("relu", "grid+box20", "max", "box20=2"),
    "relu grid w0.5+box20": ("relu", "grid+box20", "max", "grid=0.5"),
    "relu box10+grid": ("relu", "grid+box10", "max", "uniform"),
    "relu box40+grid": ("relu", "grid+box40", "max", "uniform"),
    "relu box10+box20+box40+grid": ("relu", "grid+box10+box20+box40", "max", "uniform"),
    # Session 10: spatially coherent regions. "box20sp": the boxes of 20 clusters of an NCut whose
    # affinity has the spatial term (spatial_weight SPATIAL_WEIGHT); "cc20": the boxes of the
    # connected pieces (4-neighbours, >= CC_MIN_CELLS cells) of the 20 clusters.
    "relu box20sp+grid": ("relu", "grid+box20sp", "max", "uniform"),
    "relu cc20+grid": ("relu", "grid+cc20", "max", "uniform"),
    "relu box20sp+box20+grid": ("relu", "grid+box20+box20sp", "max", "uniform"),
    # Asymmetric: a fifth entry gives the queries' regions (the database and whitening keep the fourth's).
    "relu box20+grid, queries grid": ("relu", "grid+box20", "max", "uniform", "grid"),
    "relu grid, queries box20+grid": ("relu", "grid", "max", "uniform", "grid+box20"),
}
GEM_P = 3.0


# ----------------------------------------------------------------------------------------------
# Cached backbone output and partitions
# ----------------------------------------------------------------------------------------------


def load_or_build(out: Path, args) -> tuple:
    bench_dir, whitening_dir = out / "benchmark", out / "whitening"
    sources = photo_benchmark.find_photo_sources(include_debian=not args.pip_only)
    if not (bench_dir / "jpg").is_dir():
        photo_benchmark.make_benchmark(
            bench_dir,
            preset=args.preset,
            size=args.size,
            seed=args.seed,
            sources=sources,
            progress=False,
            allow_smaller=args.allow_smaller or args.pip_only,
        )
    dataset = load_dataset(bench_dir)
    shortfall = photo_benchmark.preset_shortfall(len(dataset.queries), args.preset)
    if shortfall and not (args.allow_smaller or args.pip_only):
        raise SystemExit(f"quality.py: {shortfall} (or pass --allow-smaller)")
    if shortfall:
        print(f"WARNING: {shortfall}", flush=True)
    whitening_images = photo_benchmark.make_whitening_set(
        whitening_dir, preset=args.preset, size=args.size, seed=args.seed + 1, sources=sources
    )
    return dataset, whitening_images


def cached_maps(out: Path, dataset, whitening_images, max_size: int, scale: float) -> dict[str, list]:
    """Uncapped-head feature maps (float16) and RGB of every set at one scale, cached on disk."""
    path = out / f"maps-{max_size}-s{scale:.3f}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    size = max(32, int(round(max_size * scale)))
    backbone = default_backbone(head="relu")
    database = Extractor(backbone, "mac", max_size=size)
    paths = [str(dataset.query_path(i)) for i in range(len(dataset.queries))]
    maps = {
        "database": compute_feature_maps(
            database, [str(dataset.image_path(i)) for i in range(len(dataset.images))], description="database"
        ),
        "whitening": compute_feature_maps(database, [str(p) for p in whitening_images], description="whitening"),
    }
    for crop in ("image", "activations"):
        ex = Extractor(backbone, "mac", crop=crop, max_size=size)
        maps[crop] = compute_feature_maps(ex, paths, dataset.query_boxes, description=f"queries {crop}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(maps, f, protocol=5)
    tmp.rename(path)
    return maps


def head_map(item, head: str) -> np.ndarray:
    fmap = np.asarray(item[0], dtype=np.float32)
    return np.minimum(fmap, RELU6_CAP) if head == "relu6" else fmap


EXTRA_CLUSTERS = (10, 40)  # the partitions of the parts "box10" and "box40" (no RGB partition)
SPATIAL_WEIGHT = 1.0  # the spatial term of the partition of "box20sp" (crossing the map ~ one feature std)
CC_MIN_CELLS = 3  # the smallest connected piece of a cluster that "cc20" keeps


def cached_partitions(
    out: Path,
    maps: dict[str, list],
    max_size: int,
    scale: float,
    head: str,
    extra: bool = False,
    spatial: bool = False,
) -> dict[str, list]:
    """The paper's partitions (5 and 20 feature clusters, 5 RGB clusters; C = 7, z = 0.05, seed 0);
    with ``extra``, the partitions into EXTRA_CLUSTERS feature clusters instead; with ``spatial``,
    the 20-cluster partition with the spatial term SPATIAL_WEIGHT."""
    counts, rgb_clusters = (EXTRA_CLUSTERS, 0) if extra else ((20,), 0) if spatial else ((5, 20), 5)
    tag = "-k" + "-".join(map(str, EXTRA_CLUSTERS)) if extra else f"-sp{SPATIAL_WEIGHT:g}" if spatial else ""
    path = out / f"labels-{max_size}-s{scale:.3f}-{head}{tag}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    labels = {}
    for name in SETS:
        labels[name] = [
            None
            if item is None
            else _core.cluster_feature_map(
                np.ascontiguousarray(head_map(item, head)),
                rgb=np.ascontiguousarray(item[1], dtype=np.float32),
                n_clusters=counts,
                rgb_clusters=rgb_clusters,
                pca_dim=7,
                z_ratio=0.05,
                spatial_weight=SPATIAL_WEIGHT if spatial else 0.0,
                seed=0,
                normalization="sym",
            )
            for item in maps[name]
        ]
        print(f"  clustered {name} ({head})", flush=True)
    with open(path, "wb") as f:
        pickle.dump(labels, f, protocol=5)
    return labels


def append_partitions(labels: dict[str, list], more: dict[str, list]) -> None:
    """Append each image's partitions in ``more`` to its partitions in ``labels`` (every set)."""
    for name in SETS:
        labels[name] = [None if p is None else list(p) + list(e) for p, e in zip(labels[name], more[name])]


# ----------------------------------------------------------------------------------------------
# Pooling variants (NumPy research code; the shipped ones live in clustermac.descriptors)
# ----------------------------------------------------------------------------------------------


def region_boxes_of(part: str, height: int, width: int, partitions) -> np.ndarray:
    """[x0, y0, x1, y1) boxes of a box-shaped part: R-MAC's grid or the bounding boxes of clusters
    ("box20": of the 20-cluster partition, "box5": of the 5-cluster one, "boxall": of all three;
    a suffix "@1.5" grows each box about its centre by that factor, clipped to the map)."""
    if part == "grid":
        return np.asarray(_core.rmac_regions(height, width, 3))
    if part == "cc20":
        return connected_piece_boxes(np.asarray(partitions[1]).reshape(height, width))
    name, _, factor = part.partition("@")
    # partitions: 5, 20 and RGB clusters, then (with box10 / box40 / box20sp variants) EXTRA_CLUSTERS
    # and the spatial 20-cluster partition.
    indices = {"box20": [1], "box5": [0], "boxall": [0, 1, 2], "box10": [3], "box40": [4], "box20sp": [5]}[name]
    chosen = [partitions[i] for i in indices]
    boxes = np.concatenate([cluster_boxes(np.ascontiguousarray(p, dtype=np.int32)) for p in chosen])
    if factor:
        grow = float(factor)
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0
        half_w, half_h = grow * (boxes[:, 2] - boxes[:, 0]) / 2.0, grow * (boxes[:, 3] - boxes[:, 1]) / 2.0
        boxes = np.stack(
            [
                np.clip(np.floor(centre_x - half_w), 0, width - 1),
                np.clip(np.floor(centre_y - half_h), 0, height - 1),
                np.clip(np.ceil(centre_x + half_w), 1, width),
                np.clip(np.ceil(centre_y + half_h), 1, height),
            ],
            axis=1,
        ).astype(np.int64)
    return boxes


def connected_piece_boxes(labels: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1) boxes of the 4-connected pieces of each cluster with >= CC_MIN_CELLS cells
    (every cluster's largest piece is kept, so no cluster is left without a box)."""
    from scipy import ndimage

    boxes = []
    for k in np.unique(labels):
        pieces, count = ndimage.label(labels == k)
        sizes = np.bincount(pieces.ravel())[1:]
        for j, piece in enumerate(ndimage.find_objects(pieces)):
            if sizes[j] >= CC_MIN_CELLS or j == int(np.argmax(sizes)):
                rows, cols = piece
                boxes.append((cols.start, rows.start, cols.stop, rows.stop))
    return np.asarray(boxes, dtype=np.int64)


def part_vectors(fmap: np.ndarray, partitions, part: str, pooling: str) -> tuple[np.ndarray, np.ndarray]:
    """Un-normalised R×D vectors of one kind of region (max or GeM p = 3 inside each), and each
    region's activation mass (sum of its activations)."""
    source = np.maximum(fmap, np.float32(1e-6)) ** np.float32(GEM_P) if pooling == "gem" else fmap
    vectors, mass = [], []
    if part == "clusters":
        flat, flat_source = fmap.reshape(fmap.shape[0], -1), source.reshape(fmap.shape[0], -1)
        for p in partitions:
            labels = np.asarray(p).reshape(-1)
            for k in np.unique(labels):
                m = labels == k
                cells = flat_source[:, m]
                vectors.append(cells.max(axis=1) if pooling == "max" else cells.mean(axis=1))
                mass.append(float(flat[:, m].sum()))
    else:
        for x0, y0, x1, y1 in region_boxes_of(part, fmap.shape[1], fmap.shape[2], partitions):
            cells = source[:, y0:y1, x0:x1]
            vectors.append(cells.max(axis=(1, 2)) if pooling == "max" else cells.mean(axis=(1, 2)))
            mass.append(float(fmap[:, y0:y1, x0:x1].sum()))
    out = np.stack(vectors).astype(np.float32)
    if pooling == "gem":
        out = out ** (1.0 / GEM_P)
    return out, np.asarray(mass)


_PART_CACHE: dict = {}


def image_regions(scale_index, set_name, i, item, partitions, variant) -> tuple[np.ndarray, np.ndarray]:
    """Regional vectors and weights of one image for a variant (parts cached across variants)."""
    head, regions, pooling, weighting = variant
    vectors, masses = [], []
    for part in regions.split("+"):
        key = (scale_index, set_name, i, head, part, pooling)
        if key not in _PART_CACHE:
            v, m = part_vectors(head_map(item, head), partitions, part, pooling)
            _PART_CACHE[key] = (v.astype(np.float16) if np.abs(v).max() < 6e4 else v, m)
        v, m = _PART_CACHE[key]
        vectors.append(np.asarray(v, np.float32))
        masses.append(m)
    vectors, mass = np.concatenate(vectors), np.concatenate(masses)
    if weighting == "uniform":
        return vectors, np.ones(len(vectors))
    if "=" in weighting:  # "box20=0.5": the regions of that part count with that weight
        part_name, _, value = weighting.partition("=")
        parts = zip(regions.split("+"), masses)
        weights = [np.full(len(m), float(value) if part == part_name else 1.0) for part, m in parts]
        return vectors, np.concatenate(weights)
    return vectors, np.sqrt(mass / max(mass.max(), 1e-12))


def describe(vectors: np.ndarray, weights: np.ndarray, mean, projection) -> np.ndarray:
    unit = _core.l2_normalize(np.ascontiguousarray(vectors, dtype=np.float32))
    white = _core.l2_normalize(_core.apply_whitening(unit, mean, projection))
    return (weights[:, None] * white).sum(axis=0)


def parse_whitening(spec: str) -> dict:
    """A whitening setting of --whitening: "/"-joined "r<shrinkage>" (r·λmax added to every
    eigenvalue, the library's whitening_shrinkage; default 1e-3), "d<dim>" (output dimension,
    the library's whitening_dim), "lw" (Ledoit–Wolf: the shrinkage toward μ·I that
    sklearn.covariance.ledoit_wolf_shrinkage estimates, turned into the same r), "n<k>" (learn
    it on the first k whitening images only)."""
    config = {"shrinkage": 1e-3, "dim": None, "ledoit_wolf": False, "n_images": None}
    for item in spec.split("/"):
        if item == "lw":
            config["ledoit_wolf"] = True
        elif item[:1] == "r":
            config["shrinkage"] = float(item[1:])
        elif item[:1] == "d":
            config["dim"] = int(item[1:])
        elif item[:1] == "n":
            config["n_images"] = int(item[1:])
        else:
            raise SystemExit(f"--whitening: cannot read {item!r} in {spec!r}")
    return config


def ledoit_wolf_ratio(training: np.ndarray) -> float:
    """Ledoit–Wolf's shrinkage of the covariance toward μ·I (μ = mean eigenvalue) as the library's
    r: ((1 − α)Σ + αμI) has the eigenvalues of Σ + (α/(1 − α))μI up to a scale, and the
    whitening adds r·λmax."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    alpha = float(ledoit_wolf_shrinkage(training))
    centred = training - training.mean(axis=0)
    eigenvalues = np.linalg.eigvalsh((centred.T @ centred) / len(training))
    return alpha / max(1.0 - alpha, 1e-12) * float(eigenvalues.mean()) / float(eigenvalues[-1])


WHITENING = parse_whitening("r1e-3")  # set from --whitening in main, one setting at a time


def set_variant(variant: tuple, set_name: str) -> tuple:
    """The (head, regions, pooling, weighting) of one set: an asymmetric variant's fifth entry
    replaces the regions of the query sets."""
    if len(variant) == 5 and set_name in ("image", "activations"):
        return (variant[0], variant[4], *variant[2:4])
    return tuple(variant[:4])


def variant_descriptors(variant, scale_data) -> dict[str, np.ndarray]:
    """Descriptors of every set for one variant, summed over scales then l2-normalised. The
    whitening is learned on the regional vectors of the whitening set at all scales."""
    head = variant[0]
    per_scale = []
    training = []
    for scale_index, (maps, labels) in enumerate(scale_data):
        regions = {
            name: [
                None
                if item is None
                else image_regions(scale_index, name, i, item, labels[head][name][i], set_variant(variant, name))
                for i, item in enumerate(maps[name])
            ]
            for name in SETS
        }
        kept = [r for r in regions["whitening"] if r is not None][: WHITENING["n_images"]]
        training += [_core.l2_normalize(np.ascontiguousarray(r[0])) for r in kept]
        per_scale.append(regions)
    shrinkage = WHITENING["shrinkage"]
    if WHITENING["ledoit_wolf"]:
        stacked = np.concatenate(training).astype(np.float64)
        shrinkage = ledoit_wolf_ratio(stacked[np.linalg.norm(stacked, axis=1) > 0])
        print(f"    Ledoit-Wolf shrinkage as r: {shrinkage:.3g}", flush=True)
    mean, projection = fit_whitening_on_vectors(training, WHITENING["dim"], shrinkage)
    out = {}
    for name in SETS:
        n = len(per_scale[0][name])
        total = np.zeros((n, projection.shape[0]), np.float64)
        for regions in per_scale:
            for i, r in enumerate(regions[name]):
                if r is not None:
                    total[i] += describe(r[0], r[1], mean, projection)
        out[name] = _core.l2_normalize(np.ascontiguousarray(total, dtype=np.float32))
    return out


# ----------------------------------------------------------------------------------------------
# Ranking, re-ranking, scores
# ----------------------------------------------------------------------------------------------


def ranks_of(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """n_database × n_queries ranks by cosine similarity (stable order on ties)."""
    return np.argsort(-(queries @ database.T), axis=1, kind="stable").T


def superglobal_ranks(queries, database, ranks, top=400, k=9, beta=0.15):
    """SuperGlobal's MDescAug + RerankwMDA (clustermac.search.global_rerank), in the ranks layout."""
    return np.ascontiguousarray(superglobal_rerank(queries, database, ranks.T, top=top, k=k, beta=beta).T)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--pip-only", action="store_true", help="photos of the pip packages only (a fresh machine)")
    parser.add_argument(
        "--allow-smaller",
        action="store_true",
        help="build the preset smaller when photo packages are missing (else refused; benchmarks/install-photos.sh)",
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--variants", nargs="+", default=None, help=f"some of {list(VARIANTS)}")
    parser.add_argument("--qe", action="store_true", help="also query expansion and re-ranking rows")
    parser.add_argument(
        "--whitening",
        nargs="+",
        default=["r1e-3"],
        help="whitening settings, each applied to every variant (see parse_whitening): e.g. r1e-2 r1e-2/d512 lw",
    )
    parser.add_argument("--report", action="store_true", help="only tabulate the rows saved by earlier runs")
    parser.add_argument("--reference", help="compare every row with this variant (default: R-MAC on the row's head)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset, whitening_images = load_or_build(out, args)
    print(f"{out}: {len(dataset.queries)} queries, {len(dataset.images)} database images", flush=True)
    names = args.variants or list(VARIANTS)
    heads = sorted({VARIANTS[n][0] for n in names})
    scale_data = []
    for scale in [] if args.report else args.scales:
        maps = cached_maps(out, dataset, whitening_images, args.max_size, scale)
        labels = {head: cached_partitions(out, maps, args.max_size, scale, head) for head in heads}
        spatial_heads = {VARIANTS[n][0] for n in names if "box20sp" in VARIANTS[n][1]}
        extra_heads = {VARIANTS[n][0] for n in names if "box10" in VARIANTS[n][1] or "box40" in VARIANTS[n][1]}
        for head in extra_heads | spatial_heads:
            append_partitions(labels[head], cached_partitions(out, maps, args.max_size, scale, head, extra=True))
        for head in spatial_heads:  # the spatial partition is the sixth (after 5, 20, RGB, 10, 40)
            append_partitions(labels[head], cached_partitions(out, maps, args.max_size, scale, head, spatial=True))
        scale_data.append((maps, labels))

    rows, per_query = [], {}
    scales_tag = "-".join(f"{s:.2f}" for s in args.scales)
    saved_path = out / f"per-query-{args.max_size}-{scales_tag}.pkl"
    saved = pickle.loads(saved_path.read_bytes()) if saved_path.is_file() else {}
    if args.report:  # tabulate every row saved by earlier runs, in the order of VARIANTS
        names = []
        order = {name: i for i, name in enumerate(VARIANTS)}
        for label, entry in sorted(saved.items(), key=lambda kv: (order.get(kv[1]["row"]["variant"], 99), kv[0])):
            rows.append(dict(entry["row"]))
            per_query[label] = entry["aps"]
    jobs = [(spec, name) for spec in ([] if args.report else args.whitening) for name in names]
    for spec, name in jobs:
        WHITENING.update(parse_whitening(spec))
        wtag = "" if spec == "r1e-3" else f" [{spec}]"
        t = time.perf_counter()
        d = variant_descriptors(VARIANTS[name], scale_data)
        for crop in ("image", "activations"):
            ranks = ranks_of(d[crop], d["database"])
            tag = "I" if crop == "image" else "X"
            variants = [("", ranks)]
            if args.qe:
                q, db = d[crop], d["database"]
                variants.append((" +QE5", ranks_of(average_query_expansion(q, db, ranks.T, k=5), db)))
                variants.append((" +aQE3", ranks_of(alpha_query_expansion(q, db, ranks.T, alpha=3.0, k=10), db)))
                dba = database_side_augmentation(db, k=3, alpha=3.0)
                dba_ranks = ranks_of(q, dba)
                variants.append((" +DBA", dba_ranks))
                variants.append((" +DBA+aQE3", ranks_of(alpha_query_expansion(q, dba, dba_ranks.T, 3.0, 10), dba)))
                variants.append((" +SG", superglobal_ranks(q, db, ranks)))
            for suffix, r in variants:
                label = f"{name}{wtag}{suffix}, crop {tag}"
                per_query[label] = per_query_scores(dataset, r)
                rows.append({"label": label, "variant": name, "crop": tag, "extra": suffix.strip(), "whitening": wtag})
                saved[label] = {"row": rows[-1], "aps": per_query[label]}
        # Per-query APs of every row so far, so that --report can tabulate runs done in pieces.
        with open(saved_path, "wb") as f:
            pickle.dump(saved, f)
        done = [r["label"] for r in rows if r["variant"] == name and not r["extra"] and r["whitening"] == wtag]
        summary = ", ".join(f"{lab.split(', ')[-1]} {np.nanmean(per_query[lab]['mAP']):.1f}" for lab in done)
        print(f"  {name}{wtag}: {summary} ({time.perf_counter() - t:.0f} s)", flush=True)

    for row in rows:
        scores = per_query[row["label"]]
        wtag = row.get("whitening", "")  # the reference has the row's whitening
        reference = f"{'relu ' if VARIANTS[row['variant']][0] == 'relu' else ''}R-MAC{wtag}, crop {row['crop']}"
        reference = reference if reference in per_query else f"R-MAC{wtag}, crop {row['crop']}"
        if args.reference:
            reference = f"{args.reference}{wtag}, crop {row['crop']}"
        row["reference"] = reference
        for key, aps in scores.items():
            row[key] = float(np.nanmean(aps))
            if reference in per_query and reference != row["label"]:
                diff = aps - per_query[reference][key]
                row[f"{key} diff"] = float(np.nanmean(diff))
                row[f"{key} CI"] = paired_bootstrap_interval(diff)
    header = f"{'variant':56s} {'mAP':>6s} {'Δ':>6s} {'95% CI':>15s} {'Hard':>6s} {'ΔHard':>6s}"
    print(f"\n{out} max_size {args.max_size} scales {args.scales}\n{header}")
    for row in rows:
        ci = row.get("mAP CI")
        print(
            f"{row['label']:56s} {row['mAP']:6.1f} {row.get('mAP diff', 0):+6.1f} "
            f"{'' if ci is None else f'[{ci[0]:+.1f}, {ci[1]:+.1f}]':>15s} "
            f"{row.get('Hard', float('nan')):6.1f} {row.get('Hard diff', 0):+6.1f}"
        )
    summary = {
        "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "n_queries": len(dataset.queries),
        "n_database": len(dataset.images),
        "max_size": args.max_size,
        "scales": args.scales,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    kind = "-report" if args.report else "-qe" if args.qe else ""
    kind += "" if args.whitening == ["r1e-3"] else "-w" + "_".join(args.whitening).replace("/", "")
    kind += f"-vs-{args.reference.replace(' ', '_')}" if args.reference else ""
    path = out / f"quality-{args.max_size}-{scales_tag}{kind}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {path} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
