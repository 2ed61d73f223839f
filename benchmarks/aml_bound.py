"""Would a bounded (branch-and-bound) AML search pay? Counts what an exact one needs, in NumPy.

    python benchmarks/aml_bound.py [--maps 3] [--kinds cnn blobs noise]

Issue 17 asks for an AML search that returns exactly the exhaustive grid search's box in less
time. This runs the classic exact scheme, best-first branch-and-bound over sets of grid boxes
(efficient subwindow search: a set is every box whose four grid edges lie in four index ranges),
on the maps of ``benchmarks/rerank.py`` (512×64×48, step 3, the query's aspect ±10 %), with the
tightest bound a set allows: every box of a set has f_R between f(inner box) and f(outer box)
channel by channel (sums of non-negative powers are monotone), so its cosine is at most
max q·f/‖f‖ over that hyper-rectangle of f, bounded from above by a Dinkelbach step with the
direction u of the rectangle's best clipped point (‖f‖ ≥ u·f). Each set's inner and outer boxes are
real boxes, so their scores raise the best score found as the search goes. The search stops when
no set left can beat the best score; the script checks that the box it certifies is the
exhaustive search's.

It prints, per map, the grid boxes the exhaustive search scores and the bound evaluations the
exact search needed. A bound costs two sets of channel roots (inner and outer box) and a few
passes over the channels, i.e. at least two box scores, so the bounded search pays only where
it needs fewer than about half as many bounds as there are boxes. Maps are scored against an
unrelated query (most of a top 1,000) and against a crop of themselves (a true match).
Everything is float64 here: this counts work, it does not time the C++ kernel.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank import MAKERS  # the maps of the re-ranking benchmark

STEP, P, ASPECT, TOLERANCE = 3, 10.0, 16 / 20, 1.1


class GridBoxes:
    """The grid boxes of one map: block-level integral image of x^p, scores, validity."""

    def __init__(self, fmap: np.ndarray, query: np.ndarray) -> None:
        d, h, w = fmap.shape
        powered = (fmap.astype(np.float64) / fmap.max()) ** P
        self.xs = list(range(0, w, STEP)) + [w]
        self.ys = list(range(0, h, STEP)) + [h]
        cells = np.zeros((d, h + 1, w + 1))
        cells[:, 1:, 1:] = powered.cumsum(1).cumsum(2)
        self.integral = cells[:, self.ys][:, :, self.xs].transpose(1, 2, 0)  # (rows + 1, cols + 1, D)
        self.query = query / np.linalg.norm(query)
        self.rows, self.cols = len(self.ys) - 1, len(self.xs) - 1

    def valid(self, j0: int, j1: int, i0: int, i1: int) -> bool:
        width, height = self.xs[i1] - self.xs[i0], self.ys[j1] - self.ys[j0]
        return ASPECT / TOLERANCE * height <= width <= ASPECT * TOLERANCE * height

    def roots(self, j0: int, j1: int, i0: int, i1: int) -> np.ndarray:
        g = self.integral
        return np.maximum(g[j1, i1] - g[j0, i1] - g[j1, i0] + g[j0, i0], 0.0) ** (1 / P)

    def cosine(self, f: np.ndarray) -> float:
        norm = np.linalg.norm(f)
        return float(self.query @ f / norm) if norm > 0 else 0.0

    def all_boxes(self) -> list[tuple[int, int, int, int]]:
        r, c = self.rows, self.cols
        return [
            (j0, j1, i0, i1)
            for j0 in range(r)
            for j1 in range(j0 + 1, r + 1)
            for i0 in range(c)
            for i1 in range(i0 + 1, c + 1)
            if self.valid(j0, j1, i0, i1)
        ]


def rectangle_bound(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """An upper bound of q·f/‖f‖ over lo <= f <= hi (f >= 0); 1 when lo is 0 (scale is then free)."""
    if not lo.any():
        return 1.0
    positive = np.maximum(q, 0.0)
    t = (positive @ hi) / (positive @ positive)
    for _ in range(3):  # the KKT point clip(t·q, lo, hi): t = (sum of fixed f²) / (q · fixed f)
        f = np.clip(t * positive, lo, hi)
        fixed = f != t * positive
        a, c = float(q[fixed] @ f[fixed]), float(f[fixed] @ f[fixed])
        if a <= 0.0:
            break
        t = c / a
    u = np.clip(t * positive, lo, hi)
    u /= np.linalg.norm(u)
    rho = float(q @ np.clip(t * positive, lo, hi)) / float(u @ np.clip(t * positive, lo, hi))
    for _ in range(3):  # Dinkelbach on q·f / u·f over the rectangle (its vertices)
        vertex = np.where(q - rho * u > 0, hi, lo)
        rho = max(rho, float(q @ vertex) / float(u @ vertex))
    gap = q - rho * u
    return rho + max(float(np.maximum(gap * lo, gap * hi).sum()), 0.0) / float(u @ lo)


def bounded_search(grid: GridBoxes) -> tuple[tuple[int, int, int, int], float, int]:
    """Best-first branch-and-bound: (certified best box, its score, bound evaluations)."""
    best_box, best = None, -np.inf
    evaluations = 0

    def consider(box) -> None:
        nonlocal best_box, best
        if grid.valid(*box):
            score = grid.cosine(grid.roots(*box))
            if score > best:
                best_box, best = box, score

    def bound(ranges) -> float:
        nonlocal evaluations
        evaluations += 1
        (a0, a1), (b0, b1), (c0, c1), (d0, d1) = ranges
        outer, inner = (a0, b1, c0, d1), (a1, b0, c1, d0)
        consider(outer)
        hi = grid.roots(*outer)
        if a1 < b0 and c1 < d0:
            consider(inner)
            lo = grid.roots(*inner)
        else:
            lo = np.zeros_like(hi)
        return rectangle_bound(grid.query, lo, hi)

    def has_valid_box(ranges) -> bool:
        (a0, a1), (b0, b1), (c0, c1), (d0, d1) = ranges
        return any(
            grid.valid(j0, j1, i0, i1)
            for j0 in range(a0, a1 + 1)
            for j1 in range(max(b0, j0 + 1), b1 + 1)
            for i0 in range(c0, c1 + 1)
            for i1 in range(max(d0, i0 + 1), d1 + 1)
        )

    root = ((0, grid.rows - 1), (1, grid.rows), (0, grid.cols - 1), (1, grid.cols))
    heap = [(-bound(root), root)]
    while heap:
        negative_bound, ranges = heapq.heappop(heap)
        if -negative_bound <= best:
            break  # no set left can beat the best box found
        widths = [high - low for low, high in ranges]
        k = int(np.argmax(widths))
        if widths[k] == 0:
            continue  # a single box: already scored as its own inner and outer box
        low, high = ranges[k]
        for half in ((low, (low + high) // 2), ((low + high) // 2 + 1, high)):
            part = tuple(half if i == k else r for i, r in enumerate(ranges))
            if part[0][0] < part[1][1] and part[2][0] < part[3][1] and has_valid_box(part):
                heapq.heappush(heap, (-bound(part), part))
    return best_box, best, evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=3, help="maps per kind and query")
    parser.add_argument("--kinds", nargs="+", choices=tuple(MAKERS), default=["cnn", "blobs", "noise"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("kind   query      grid boxes  bound evaluations  ratio  same box as exhaustive")
    for kind in args.kinds:
        unrelated = MAKERS[kind](np.random.default_rng(1), (512, 20, 16)).max(axis=(1, 2))
        for query_kind in ("unrelated", "matching"):
            for _ in range(args.maps):
                fmap = MAKERS[kind](rng, (512, 64, 48))
                query = unrelated if query_kind == "unrelated" else fmap[:, 20:40, 10:26].max(axis=(1, 2))
                grid = GridBoxes(fmap, query.astype(np.float64))
                boxes = grid.all_boxes()
                scores = [grid.cosine(grid.roots(*b)) for b in boxes]
                exhaustive = boxes[int(np.argmax(scores))]
                box, _, evaluations = bounded_search(grid)
                print(
                    f"{kind:6} {query_kind:10} {len(boxes):10d}  {evaluations:17d}  {evaluations / len(boxes):5.2f}  "
                    f"{box == exhaustive}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
