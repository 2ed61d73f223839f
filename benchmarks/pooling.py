"""Max-pooling of real feature maps over boxes and clusters, single-threaded, against references
measured in the same run.

    python benchmarks/pooling.py [--images 6] [--max-size 1024] [--repeats 7] [--baseline-python PY]

The maps are the embedded EfficientNet-Lite0's (uncapped head, 1280 channels; 1280×24×32 for a
1024 px photo) of installed photographs (``benchmarks/extraction.py``'s ``photos``). Timed per map,
thread CPU time, median over maps × repeats:

- ``grid_mac`` over the regions of ``clustermac-box`` (R-MAC's grid of 3 levels + the bounding
  boxes of the map's 20 NCut clusters, ~40 boxes) and over R-MAC's grid alone;
- ``region_mac`` over the paper's three partitions (5 and 20 feature clusters, 5 RGB clusters);
- as the reference an expert would write, NumPy's ``fmap[:, y0:y1, x0:x1].max(axis=(1, 2))`` per
  box, checked to give the same values.

``--baseline-python PY`` also runs the same timing in that interpreter (e.g. one with an earlier
build of clustermac installed), alternating with this build round by round, and prints this
build's speed-up over it: the same-run ratio for a change to the kernels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

TIMING_CHILD = r"""
import sys, time, numpy as np
from clustermac import _core
data = np.load(sys.argv[1]); repeats = int(sys.argv[2])
count = len([k for k in data.files if k.startswith("f")])
maps = [np.ascontiguousarray(data[f"f{i}"]) for i in range(count)]
boxes = [np.ascontiguousarray(data[f"b{i}"]) for i in range(count)]
grid = [np.ascontiguousarray(data[f"g{i}"]) for i in range(count)]
labels = [[np.ascontiguousarray(data[f"l{i}_{j}"]) for j in range(3)] for i in range(count)]
calls = {
    "grid_mac, clustermac-box regions": lambda i: _core.grid_mac(maps[i], boxes[i]),
    "grid_mac, R-MAC grid": lambda i: _core.grid_mac(maps[i], grid[i]),
    "region_mac, the paper's 3 partitions": lambda i: [_core.region_mac(maps[i], lab) for lab in labels[i]],
}
for name, call in calls.items():
    call(0)  # warm-up
    times = []
    for _ in range(repeats):
        for i in range(count):
            start = time.thread_time()
            call(i)
            times.append(time.thread_time() - start)
    print(name, "=", np.median(times))
"""


def load_maps(images: int, max_size: int):
    """(feature map, clustermac-box regions, R-MAC grid, the paper's partitions) of `images` photos."""
    from extraction import photos  # benchmarks/extraction.py, beside this script

    import clustermac
    from clustermac.descriptors.base import cluster_boxes

    extractor = clustermac.Extractor(method="clustermac-box", max_size=max_size)
    paper = clustermac.Extractor(extractor.backbone, "clustermac", max_size=max_size)
    out = []
    for image in photos(images, max_size):
        fmap, rgb = extractor.feature_map(extractor.prepare(image), with_rgb=True)
        height, width = fmap.shape[1:]
        grid = np.asarray(clustermac.rmac_regions(height, width, 3), dtype=np.int32)
        (twenty,) = extractor.cluster_labels(fmap, None)
        boxes = np.concatenate([grid, np.asarray(cluster_boxes(twenty), dtype=np.int32)])
        out.append((fmap, boxes, grid, paper.cluster_labels(fmap, rgb)))
    return out


def numpy_reference(fmap: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """What an expert would write: one NumPy max per box."""
    return np.stack([fmap[:, y0:y1, x0:x1].max(axis=(1, 2)) for x0, y0, x1, y1 in boxes])


def time_children(path: str, pythons: dict[str, str], rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per call of each timed kernel, for each interpreter; the interpreters take turns."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in pythons}
    for _ in range(rounds):
        for name, python in pythons.items():
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if python != sys.executable:  # its own installed clustermac, not a worktree's
                env.pop("PYTHONPATH", None)
            out = subprocess.run(
                [python, "-c", TIMING_CHILD, path, str(repeats)], env=env, capture_output=True, text=True, check=True
            ).stdout
            for line in out.splitlines():
                kernel, value = line.rsplit("=", 1)
                times[name].setdefault(kernel.strip(), []).append(float(value))
    return {name: {k: float(np.median(v)) for k, v in kernels.items()} for name, kernels in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="calls per map in each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each build once per round)")
    parser.add_argument("--baseline-python", default=None, help="an interpreter with another build to compare")
    args = parser.parse_args()

    from search import cpu_name

    maps = load_maps(args.images, args.max_size)
    shapes = sorted({f.shape for f, *_ in maps})
    regions = np.mean([len(b) for _, b, _, _ in maps])
    print(f"{len(maps)} maps {shapes}, {regions:.0f} clustermac-box regions on average, CPU {cpu_name()}")

    from clustermac import _core

    reference = []
    for fmap, boxes, _, _ in maps:
        expected = numpy_reference(fmap, boxes)
        if not np.array_equal(_core.grid_mac(fmap, boxes), expected):
            raise SystemExit("grid_mac differs from the NumPy reference")
        reference.append(min(_timed(numpy_reference, fmap, boxes) for _ in range(args.repeats)))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maps.npz")
        arrays = {}
        for i, (fmap, boxes, grid, partitions) in enumerate(maps):
            arrays.update({f"f{i}": fmap, f"b{i}": boxes, f"g{i}": grid})
            arrays.update({f"l{i}_{j}": labels for j, labels in enumerate(partitions)})
        np.savez(path, **arrays)
        pythons = {"this build": sys.executable}
        if args.baseline_python:
            pythons["baseline build"] = args.baseline_python
        medians = time_children(path, pythons, args.rounds, args.repeats)

    ours = medians["this build"]
    numpy_ms = 1e3 * float(np.median(reference))
    box_ms = 1e3 * ours["grid_mac, clustermac-box regions"]
    print(
        f"NumPy reference, clustermac-box regions: {numpy_ms:.2f} ms/map; grid_mac {box_ms:.2f} ms "
        f"({numpy_ms / box_ms:.1f}x)"
    )
    for kernel, seconds in ours.items():
        line = f"{kernel}: {seconds * 1e3:.2f} ms/map"
        if "baseline build" in medians:
            base = medians["baseline build"][kernel]
            line += f"; baseline build {base * 1e3:.2f} ms ({base / seconds:.2f}x)"
        print(line)


def _timed(call, *arguments) -> float:
    """Thread CPU seconds of one call."""
    start = time.thread_time()
    call(*arguments)
    return time.thread_time() - start


if __name__ == "__main__":
    main()
