"""AML returns the boxes and scores of a reference build on maps of kinds the first golden test
(test_aml_same_boxes.py) does not make: smooth, sparse, non-negative maps like real conv5
activations, constant maps, maps whose channels are constant over space (every box ties), dense
uniform maps, at D = 16…512 and VGG16's 512×64×48. A later speed-up must keep every box and score.

The expected values were computed with ``python tests/search/test_aml_same_boxes_more_kinds.py
FILE`` by clustermac at commit c704006 with the AVX-512 kernels (``boxes_c704006_kinds.npz``) and
at commit b4541c5 with the AVX2 kernels (``boxes_b4541c5_kinds_avx2.npz``, CLUSTERMAC_NO_AVX512=1,
an AVX2-only AMD EPYC). Each level this CPU runs is checked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import clustermac as cm
from clustermac import _core

DATA = Path(__file__).resolve().parents[1] / "data" / "aml"
EXPECTED = {"avx512": DATA / "boxes_c704006_kinds.npz", "avx2": DATA / "boxes_b4541c5_kinds_avx2.npz"}


def smooth(values: np.ndarray, axis: int, width: int = 4) -> np.ndarray:
    """Means over windows of `width` along `axis` (the axis shrinks by width - 1)."""
    sums = np.cumsum(values, axis=axis, dtype=np.float64)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    n = values.shape[axis]
    return np.take(sums, range(width, n + 1), axis=axis) - np.take(sums, range(n + 1 - width), axis=axis)


def cnn_like(rng, shape):
    d, h, w = shape
    field = rng.standard_normal((d, h + 3, w + 3))
    field = smooth(smooth(field, 1), 2) / 4.0
    return (np.maximum(field - 0.8, 0.0) * 10.0).astype(np.float32)


KINDS = {
    "cnn": cnn_like,
    "constant": lambda rng, shape: np.ones(shape, np.float32),
    "tied": lambda rng, shape: np.tile((rng.random((shape[0], 1, 1)) > 0.5).astype(np.float32), (1, *shape[1:])),
    "dense": lambda rng, shape: rng.random(shape, dtype=np.float32),
}
SETTINGS = [{}, {"query_aspect": 0.8}, {"query_aspect": 1.7, "step": 2}, {"p": 6.0, "query_aspect": 1.2}]


def localise_all() -> dict[str, np.ndarray]:
    """{name: [x0, y0, x1, y1, score]} from the 8-bit path ("codes/…") and the float path ("float/…")."""
    rng = np.random.default_rng(77)
    shapes = [(512, 64, 48), (512, 30, 40), (64, 17, 23), (48, 33, 9), (16, 8, 8), (20, 12, 14), (512, 5, 7)]
    out = {}
    for number, shape in enumerate(shapes):
        for kind, make in KINDS.items():
            fmap = make(rng, shape)
            query = np.maximum(rng.random(shape[0], dtype=np.float32), 0.01)
            codes, _ = cm.quantize_feature_map(fmap)
            codes = np.ascontiguousarray(codes.transpose(1, 2, 0))
            for setting, kwargs in enumerate(SETTINGS):
                box, score = _core.aml_localize_codes(codes, query, **kwargs)
                out[f"codes/{kind}/{number}/{setting}"] = np.array([*box, score])
            box, score = cm.aml_localize(fmap, query, query_aspect=0.8)
            out[f"float/{kind}/{number}"] = np.array([*box, score])
    return out


def test_aml_returns_the_boxes_of_the_reference_build_on_more_kinds_of_maps(check_aml_golden, tmp_path):
    check_aml_golden(Path(__file__), EXPECTED, tmp_path)


if __name__ == "__main__":
    values = localise_all()
    np.savez_compressed(sys.argv[1], **values)
    print(
        f"{len(values)} cases written to {sys.argv[1]} with clustermac from {cm.__file__} "
        f"at SIMD level {_core.simd_level()}"
    )
