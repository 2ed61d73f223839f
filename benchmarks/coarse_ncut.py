"""Research (issue 17, "small maps"): is clustering a 2×2-pooled map a route to N = 768 in ≤ 5 ms?

    python benchmarks/coarse_ncut.py [--images 6] [--size 24x32] [--repeats 20]

For the embedded backbone's maps of scikit-image's photographs (``benchmarks/clustering.py``'s
``load_maps``), the paper's clustering (5 and 20 feature clusters, 5 RGB clusters, C = 7) runs on
the full H×W map and on the map mean-pooled over 2×2 cells (features and RGB); each location then
takes its pooled cell's label. Printed per map: thread CPU time of both, and the NCut objective on
the FULL graph (``reference_pipeline``'s similarity, as ``benchmarks/clustering.py`` reports it)
of the full partitions, the pooled ones and scikit-learn's. Research only: not run by the tests or .ci/run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from clustering import load_maps, reference_pipeline  # benchmarks/clustering.py, beside this script

from clustermac import _core
from clustermac.bench.reference import ncut_objective

PARTITIONS = ("K=5", "K=20", "RGB")


def pool_2x2(array: np.ndarray) -> np.ndarray:
    """Mean over 2×2 cells of a C×H×W array (H and W even)."""
    c, h, w = array.shape
    return np.ascontiguousarray(array.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4)), dtype=np.float32)


def median_cpu_time(feature_map: np.ndarray, rgb: np.ndarray, repeats: int) -> float:
    """Median thread CPU seconds of the paper's clustering of one map."""
    _core.cluster_feature_map(feature_map, rgb, pca_dim=7)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        _core.cluster_feature_map(feature_map, rgb, pca_dim=7)
        times.append(time.thread_time() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", default="24x32", help="HxW of the maps (even; default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    maps, description = load_maps(height, width, args.images, synthetic=False)
    print(description)
    objectives = []
    for feature_map, rgb in maps:
        feature_map, rgb = np.ascontiguousarray(feature_map), np.ascontiguousarray(rgb, dtype=np.float32)
        reference, similarity, rgb_similarity = reference_pipeline(feature_map, rgb, 7)
        pooled_map = pool_2x2(feature_map)
        pooled_rgb = np.ascontiguousarray(pool_2x2(rgb.transpose(2, 0, 1)).transpose(1, 2, 0))
        full = _core.cluster_feature_map(feature_map, rgb, pca_dim=7)
        pooled = _core.cluster_feature_map(pooled_map, pooled_rgb, pca_dim=7)
        spread = [np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1) for labels in pooled]
        full_ms = 1e3 * median_cpu_time(feature_map, rgb, args.repeats)
        pooled_ms = 1e3 * median_cpu_time(pooled_map, pooled_rgb, args.repeats)
        row = [
            tuple(ncut_objective(s, np.ravel(labels)) for labels in (a, b, c))
            for s, a, b, c in zip((similarity, similarity, rgb_similarity), full, spread, reference)
        ]
        objectives.append(row)
        print(
            f"N = {height * width}: full {full_ms:.1f} ms, pooled {pooled_ms:.1f} ms; objective full / pooled / "
            "scikit-learn " + ", ".join(f"{k} {a:.3f} / {b:.3f} / {c:.3f}" for k, (a, b, c) in zip(PARTITIONS, row))
        )
    mean = np.array(objectives).mean(axis=0)
    for k, (a, b, c) in zip(PARTITIONS, mean):
        print(f"{k}: mean objective ÷ scikit-learn's: full {a / c:.2f}, pooled {b / c:.2f}")


if __name__ == "__main__":
    main()
