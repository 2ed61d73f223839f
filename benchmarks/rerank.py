"""AML re-ranking of the top 1,000 for one query with VGG16-sized maps, single-threaded.

    python benchmarks/rerank.py [--maps 1000] [--repeats 3] [--height 64 --width 48 --channels 512]
        [--kind noise|blobs|cnn]

Writes (once, reused) a feature-map store of `--maps` sparse post-ReLU maps of D×H×W =
512×64×48 (a VGG16 conv5_3 map of a 768×1024 image) quantised to 8 bits, then times
:func:`clustermac.aml_rerank` for one query over all of them, with the R-MAC descriptor
(Tolias grid, regional MAC → l2 → whitening → l2, summed) computed inside each AML box and
average QE with the top 5 — the whole of Tolias et al.'s re-ranking step. ``--kind blobs`` writes
maps with structure instead (a few bright Gaussian blobs over faint sparse noise); the default,
sparse noise everywhere, is the worst case for AML (every box scores within ~1e-3 of the best);
``--kind cnn`` writes maps that look like real conv5 activations (sparse, non-negative, spatially smooth).
It also times the re-ranking with the descriptor computed map by map (``from_store``, one
whitening product per box, the path before grouped aggregation) in the same run. The descriptor is
:class:`clustermac.RMACInBox`, which takes the regional maxima on the 8-bit codes themselves
(:func:`clustermac._core.grid_mac_codes`). It prints the median of `--repeats` runs split into
localisation (the C++ AML on the 8-bit codes) and the rest (the descriptor in the box, QE), and,
as references measured in the same run: the float-crop path for the descriptor (dequantise the
box to a float D×h×w crop, then rmac_regions → grid_mac → aggregate_regions) on the same boxes,
checked to give identical descriptors; and the same localisation written with NumPy (integral
images of x^p in float64, every grid box scored at once) on a few maps, extrapolated to `--maps`,
with the spread of the grid boxes' scores on those maps (what a bounded search could prune).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import clustermac as cm
from clustermac import _core


def sparse_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A post-ReLU-like map: ~85 % zeros, heavy-tailed positive activations."""
    u = rng.random(shape, dtype=np.float32)
    return np.maximum(u - 0.85, 0.0) ** 2 * 400.0


def blob_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A map with structure: 1-3 bright Gaussian blobs (random channel strengths) over faint sparse noise."""
    d, h, w = shape
    fmap = 0.2 * sparse_map(rng, shape)
    y, x = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, sy, sx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h / 4), rng.uniform(2, w / 4)
        bump = np.exp(-(((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2)).astype(np.float32)
        fmap += (rng.random(d, dtype=np.float32) ** 4 * 60.0)[:, None, None] * bump[None]
    return fmap


def box_filter(values: np.ndarray, axis: int, width: int) -> np.ndarray:
    """Means over windows of `width` along `axis` (the axis shrinks by width - 1)."""
    sums = np.cumsum(values, axis=axis, dtype=np.float64)
    zero = np.zeros_like(np.take(sums, [0], axis=axis))
    sums = np.concatenate([zero, sums], axis=axis)
    n = values.shape[axis]
    return (
        (np.take(sums, range(width, n + 1), axis=axis) - np.take(sums, range(n + 1 - width), axis=axis)) / width
    ).astype(np.float32)


def cnn_like_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Like real conv5 activations: per channel a smooth random field (white noise box-filtered twice
    over 5 cells along each axis) through a ReLU that keeps about its top 12 %, times a heavy-tailed
    channel strength: sparse, non-negative, spatially smooth."""
    d, h, w = shape
    field = rng.standard_normal((d, h + 8, w + 8)).astype(np.float32)
    for axis in (1, 2):
        field = box_filter(box_filter(field, axis, 5), axis, 5)
    threshold = np.quantile(field, 0.88, axis=(1, 2), keepdims=True)
    strength = rng.random((d, 1, 1), dtype=np.float32) ** 3 * 50.0
    return np.maximum(field - threshold, 0.0) * strength


MAKERS = {"noise": sparse_map, "blobs": blob_map, "cnn": cnn_like_map}


def make_store(path: Path, maps: int, shape: tuple[int, int, int], kind: str) -> None:
    if path.exists():
        store = cm.FeatureMapStore(path)
        if len(store) == maps and store.codes(0).shape == (shape[1], shape[2], shape[0]):
            return
    rng = np.random.default_rng(0)
    make = MAKERS[kind]
    with cm.FeatureMapStoreWriter(path) as writer:
        for i in range(maps):
            writer.add(make(rng, shape), f"image_{i:05d}")


def numpy_aml(fmap: np.ndarray, query: np.ndarray, step: int, p: float, query_aspect: float, tolerance: float):
    """Grid search of AML in NumPy (no refinement): the plain reference."""
    d, h, w = fmap.shape
    v = (fmap.astype(np.float64) / max(fmap.max(), 1e-30)) ** p
    integral = np.zeros((d, h + 1, w + 1))
    integral[:, 1:, 1:] = v.cumsum(1).cumsum(2)
    xs, ys = list(range(0, w, step)) + [w], list(range(0, h, step)) + [h]
    boxes = [
        (x0, y0, x1, y1)
        for x0 in xs
        for x1 in xs
        if x1 > x0
        for y0 in ys
        for y1 in ys
        if y1 > y0 and query_aspect / tolerance <= (x1 - x0) / (y1 - y0) <= query_aspect * tolerance
    ]
    b = np.array(boxes)
    sums = (
        integral[:, b[:, 3], b[:, 2]]
        - integral[:, b[:, 1], b[:, 2]]
        - integral[:, b[:, 3], b[:, 0]]
        + integral[:, b[:, 1], b[:, 0]]
    )
    f = np.maximum(sums, 0.0) ** (1.0 / p)
    scores = (query / np.linalg.norm(query)) @ f / np.maximum(np.linalg.norm(f, axis=0), 1e-30)
    return boxes[int(np.argmax(scores))], float(scores.max()), scores


def clustermac_in_box(store, pairs, mean, projection, repeats: int) -> None:
    """ClusterMAC inside the AML boxes: from the database image's stored clusters (5 + 20 feature
    clusters and 5 RGB clusters; random label maps here: the cost does not depend on them) vs.
    re-clustering the activations inside each box (the paper's clustering on the crop, no RGB)."""
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labelled.cmfm"
        with cm.FeatureMapStoreWriter(path) as writer:
            for i, _ in pairs:
                height, width = store.codes(i).shape[:2]
                labels = [rng.integers(0, k, (height, width)) for k in (5, 20, 5)]
                writer.add(store.feature_map(i), store.names[i], labels=labels)
        labelled = cm.FeatureMapStore(path)
        stored_times, box_pooling_times, recluster_times = [], [], []
        for pooling, times in (("mask", stored_times), ("box", box_pooling_times)):
            in_box = cm.ClusterMACInBox(mean, projection, cluster_pooling=pooling)
            for _ in range(repeats):
                t0 = time.perf_counter()
                for row, (_, box) in enumerate(pairs):
                    in_box.from_store(labelled, row, box)
                times.append(time.perf_counter() - t0)
        for _, box in pairs[:3]:  # re-clustering is slow: three boxes
            t0 = time.perf_counter()
            crop = labelled.feature_map(0, box)
            labels = cm.cluster_feature_map(crop, pca_dim=4)
            cm.aggregate_regions(np.concatenate([cm.region_mac(crop, lab) for lab in labels]), mean, projection)
            recluster_times.append(time.perf_counter() - t0)
        del labelled
    stored_ms = 1e3 * float(np.median(stored_times)) / len(pairs)
    recluster_ms = 1e3 * float(np.median(recluster_times))
    box_ms = 1e3 * float(np.median(box_pooling_times)) / len(pairs)
    print(
        f"ClusterMAC in the AML box: from the stored clusters {stored_ms:.3f} ms/map ({len(pairs)} maps), "
        f"re-clustering the box {recluster_ms:.1f} ms/map -> {recluster_ms / stored_ms:.0f}x; with "
        f"cluster_pooling='box' {box_ms:.3f} ms/map (random labels: every cluster's bounding box is the whole "
        "AML box, the worst case)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy-maps", type=int, default=3, help="maps timed with the NumPy reference")
    parser.add_argument("--clustermac-maps", type=int, default=100, help="maps timed for ClusterMAC in the box")
    parser.add_argument("--kind", choices=tuple(MAKERS), default="noise", help="the maps' content (see above)")
    parser.add_argument("--store", type=Path, default=None, help="store file (default: in the temp directory)")
    args = parser.parse_args()
    shape = (args.channels, args.height, args.width)
    suffix = "" if args.kind == "noise" else f"-{args.kind}"
    default_name = f"clustermac-rerank-bench-{args.maps}-{'x'.join(map(str, shape))}{suffix}.cmfm"
    path = args.store or Path(tempfile.gettempdir()) / default_name
    start = time.perf_counter()
    make_store(path, args.maps, shape, args.kind)
    store = cm.FeatureMapStore(path)
    print(
        f"store: {len(store)} {args.kind} maps of D×H×W = {shape}, {path.stat().st_size / 2**20:.0f} MiB "
        f"(ready in {time.perf_counter() - start:.1f} s)"
    )

    rng = np.random.default_rng(1)
    query_map = MAKERS[args.kind](rng, (args.channels, 20, 16))
    query_mac = query_map.max(axis=(1, 2))
    query_aspect = 16 / 20
    whitening_mean, whitening_projection = cm.fit_pca_whitening(
        np.abs(rng.standard_normal((2 * args.channels, args.channels))).astype(np.float32), shrinkage=1e-2
    )

    def rmac_descriptor(crop: np.ndarray) -> np.ndarray:
        """The float-crop path (the reference)."""
        regions = cm.rmac_regions(crop.shape[1], crop.shape[2])
        return cm.aggregate_regions(cm.grid_mac(crop, regions), whitening_mean, whitening_projection)

    rmac_in_box = cm.RMACInBox(whitening_mean, whitening_projection)
    query_descriptor = rmac_in_box(query_map)
    candidates = np.arange(len(store))

    class PerMap:
        """RMACInBox map by map (from_store only): one aggregation, one whitening product per box."""

        def from_store(self, store, index, box):
            return rmac_in_box.from_store(store, index, box)

    def rerank(descriptor, n_threads: int):
        return cm.aml_rerank(
            query_mac,
            query_descriptor,
            candidates,
            store,
            descriptor,
            top_n=len(store),
            query_aspect=query_aspect,
            qe_k=5,
            n_threads=n_threads,
        )

    def localise_all() -> None:
        for i in candidates:
            _core.aml_localize_codes(store.codes(int(i)), query_mac, query_aspect=query_aspect)

    # Single-threaded runs are timed by the wall clock and by this thread's CPU time (which other
    # processes on a shared machine inflate far less); the run on every core by the wall clock.
    times: dict[str, list[tuple[float, float]]] = {"per_map": [], "localisation": [], "total": [], "parallel": []}

    def timed(name: str, fn):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = fn()
        times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
        return out

    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        one_by_one = timed("per_map", lambda: rerank(PerMap(), 1))
        timed("localisation", localise_all)
        result = timed("total", lambda: rerank(rmac_in_box, 1))
        threaded = timed("parallel", lambda: rerank(rmac_in_box, 0))
        assert np.array_equal(threaded.indices, result.indices) and np.array_equal(threaded.boxes, result.boxes)
        assert np.array_equal(one_by_one.indices, result.indices) and np.array_equal(one_by_one.boxes, result.boxes)
        assert np.allclose(one_by_one.scores, result.scores, atol=1e-6)
    wall = {name: float(np.median([t[0] for t in runs])) for name, runs in times.items()}
    cpu = {name: float(np.median([t[1] for t in runs])) for name, runs in times.items()}
    print(f"load average (1 min) before / after the timed runs: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"aml_rerank of {len(store)} maps (AML + R-MAC in the box + QE top 5), 1 thread: median {wall['total']:.3f} s "
        f"wall, {cpu['total']:.3f} s CPU (wall runs {[round(t[0], 3) for t in times['total']]})"
    )
    print(
        f"  the same with the descriptor map by map (from_store): median {wall['per_map']:.3f} s wall, "
        f"{cpu['per_map']:.3f} s CPU -> grouped aggregation {cpu['per_map'] / cpu['total']:.2f}x (CPU); same ranking "
        "and boxes, scores within 1e-6"
    )
    loc, rest = cpu["localisation"], cpu["total"] - cpu["localisation"]
    print(
        f"  of which AML localisation (C++, 8-bit codes): {loc:.3f} s CPU = {1e3 * loc / len(store):.2f} ms/map; "
        f"descriptor in the box and QE: {rest:.3f} s = {1e3 * rest / len(store):.2f} ms/map"
    )
    print(
        f"  with n_threads=0 ({os.cpu_count()} cores): median {wall['parallel']:.3f} s wall "
        f"({wall['total'] / wall['parallel']:.2f}x the 1-thread wall time), same ranking"
    )
    loc = wall["localisation"]

    # The descriptor alone on the boxes AML found: from the codes vs. dequantised float crops.
    pairs = [(int(i), box) for i, box in zip(result.indices, result.boxes)]
    from_codes_times, float_crop_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        from_codes = [rmac_in_box.from_codes(store.codes(i), box, store.scale(i)) for i, box in pairs]
        from_codes_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        from_crops = [rmac_descriptor(store.feature_map(i, box)) for i, box in pairs]
        float_crop_times.append(time.perf_counter() - t0)
    identical = sum(np.array_equal(a, b) for a, b in zip(from_codes, from_crops))
    codes_s, crops_s = float(np.median(from_codes_times)), float(np.median(float_crop_times))
    mean_cells = float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for _, b in pairs]))
    print(
        f"R-MAC in the {len(pairs)} AML boxes (mean {mean_cells:.0f} of {args.height * args.width} cells): "
        f"from the 8-bit codes {1e3 * codes_s / len(pairs):.3f} ms/map, float-crop path (dequantise + grid_mac) "
        f"{1e3 * crops_s / len(pairs):.3f} ms/map -> {crops_s / codes_s:.1f}x; identical descriptors on "
        f"{identical}/{len(pairs)} boxes"
    )

    clustermac_in_box(store, pairs[: args.clustermac_maps], whitening_mean, whitening_projection, args.repeats)

    t0 = time.perf_counter()
    agree = 0
    for i in range(args.numpy_maps):
        fmap = store.feature_map(i)
        box_np, best, scores = numpy_aml(fmap, query_mac, 3, 10.0, query_aspect, 1.1)
        # How flat the landscape is: a bounded (branch-and-bound) search that must return exactly
        # the exhaustive box can only skip boxes whose upper bound is below the best score.
        print(
            f"map {i}: {len(scores)} grid boxes, best cosine {best:.6f}, median {np.median(scores):.6f}, "
            f"99th percentile {np.percentile(scores, 99):.6f}; {np.mean(scores >= best - 1e-3):.0%} of boxes "
            "within 1e-3 of the best"
        )
        box_cm, _ = _core.aml_localize_codes(store.codes(i), query_mac, query_aspect=query_aspect, refine_iterations=0)
        agree += tuple(box_cm) == tuple(box_np)
    per_map = (time.perf_counter() - t0) / args.numpy_maps
    print(
        f"NumPy AML grid search (no refinement): {1e3 * per_map:.0f} ms/map -> {per_map * len(store):.1f} s for "
        f"{len(store)} maps; clustermac AML (with refinement) is {per_map * len(store) / loc:.0f}x faster; "
        f"same grid box on {agree}/{args.numpy_maps} maps"
    )
    assert len(result.indices) == len(store)
    assert identical == len(pairs), "RMACInBox.from_codes differs from the float-crop path"


if __name__ == "__main__":
    main()
