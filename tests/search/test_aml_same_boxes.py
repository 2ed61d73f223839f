"""AML returns the boxes and scores of a reference build on maps of many kinds: any later
speed-up of the localisation must keep every box (and, with the same kernels, every score).

The expected boxes were computed on the maps that :func:`aml_cases` makes, with
``python tests/search/test_aml_same_boxes.py FILE`` run against a reference build: by clustermac
0.1.0 at commit 3466949 with the AVX-512 kernels (``boxes_3466949.npz``), and at commit b4541c5
with the AVX2 kernels (``boxes_b4541c5_avx2.npz``, written with CLUSTERMAC_NO_AVX512=1 on an
AVX2-only AMD EPYC; the levels round differently). Each level this CPU runs is checked.
Both the float path (:func:`clustermac.aml_localize`) and the 8-bit path
(``_core.aml_localize_codes``) are checked, with Tolias' p = 10 (the dedicated 10th root) and
another p (the general root and the power table), with and without the aspect constraint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import clustermac as cm
from clustermac import _core

DATA = Path(__file__).resolve().parents[1] / "data" / "aml"
EXPECTED = {"avx512": DATA / "boxes_3466949.npz", "avx2": DATA / "boxes_b4541c5_avx2.npz"}


def sparse_noise(rng, shape):
    u = rng.random(shape, dtype=np.float32)
    return np.maximum(u - 0.85, 0.0) ** 2 * 400.0


def blobs_on_noise(rng, shape):
    d, h, w = shape
    fmap = 0.2 * sparse_noise(rng, shape)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.5, h / 3 + 0.5), rng.uniform(0.5, w / 3 + 0.5)
        y, x = np.mgrid[0:h, 0:w]
        bump = np.exp(-(((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2))
        fmap += (rng.random(d, dtype=np.float32) * 30.0)[:, None, None] * bump[None].astype(np.float32)
    return fmap.astype(np.float32)


def hot_pixel(rng, shape):
    fmap = np.zeros(shape, np.float32)
    fmap[:, int(rng.integers(shape[1])), int(rng.integers(shape[2]))] = rng.random(shape[0], dtype=np.float32) + 0.1
    return fmap


def aml_cases():
    """(name, float D×H×W map, query MAC vector, AML keyword arguments) for every checked case."""
    rng = np.random.default_rng(2026)
    shapes = [(5, 1, 1), (3, 1, 7), (16, 5, 3), (19, 13, 11), (24, 9, 16), (40, 20, 15), (64, 30, 22), (512, 21, 16)]
    kinds = {"noise": sparse_noise, "blobs": blobs_on_noise, "hot_pixel": hot_pixel}
    settings = [
        {},
        {"query_aspect": 0.8},
        {"query_aspect": 1.5, "step": 2},
        {"p": 7.0, "query_aspect": 1.0},
        {"step": 1, "refine_iterations": 0},
    ]
    cases = []
    for shape in shapes:
        for kind, make in kinds.items():
            fmap = make(rng, shape)
            query = sparse_noise(rng, (shape[0], 4, 3)).max(axis=(1, 2)) + 0.01
            for number, kwargs in enumerate(settings):
                if kwargs.get("step") == 1 and shape[1] * shape[2] > 400:
                    continue  # every box of a large map: slow in the old code too, nothing new
                cases.append((f"{kind}-{'x'.join(map(str, shape))}-{number}", fmap, query.astype(np.float32), kwargs))
    cases.append(("zeros-8x6x7", np.zeros((8, 6, 7), np.float32), np.ones(8, np.float32), {}))
    cases.append(("constant-8x6x7", np.ones((8, 6, 7), np.float32), np.ones(8, np.float32), {"query_aspect": 0.5}))
    return cases


def localise_all():
    """{name: [x0, y0, x1, y1, score]} from the float path ("float/…") and the 8-bit path ("codes/…")."""
    out = {}
    for name, fmap, query, kwargs in aml_cases():
        box, score = cm.aml_localize(fmap, query, **kwargs)
        out[f"float/{name}"] = np.array([*box, score])
        codes, _ = cm.quantize_feature_map(fmap)
        box, score = _core.aml_localize_codes(np.ascontiguousarray(codes.transpose(1, 2, 0)), query, **kwargs)
        out[f"codes/{name}"] = np.array([*box, score])
    return out


def test_aml_returns_the_boxes_of_the_previous_implementation(check_aml_golden, tmp_path):
    check_aml_golden(Path(__file__), EXPECTED, tmp_path)


if __name__ == "__main__":
    values = localise_all()
    np.savez_compressed(sys.argv[1], **values)
    print(
        f"{len(values)} cases written to {sys.argv[1]} with clustermac from {cm.__file__} "
        f"at SIMD level {_core.simd_level()}"
    )
