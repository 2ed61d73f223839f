"""The NCut embedding and the per-image clustering keep the bits of a reference build.

Eigen's symmetric eigensolver, which the Krylov solver calls for its Rayleigh-Ritz step, applies
its Givens rotations one float at a time; ``linalg/givens_rotations.hpp`` does the same arithmetic
8 floats at a time. The expected digests were computed at commit 1f5e0b0 (Eigen's scalar
rotations, AVX-512 product kernels) with ``python tests/core/test_givens_rotations.py`` run against
that build, on matrices made here with IEEE operations only (no library exp), so that any change
of a single bit in an eigenvector or a label shows up.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import clustermac as cm
from clustermac import _core

EXPECTED = Path(__file__).resolve().parents[1] / "data" / "eigen" / "digests_1f5e0b0.json"


def similarity(seed: int, n: int) -> np.ndarray:
    """A dense NCut similarity 1 / (1 + d^2 / s^2) of clustered points (float64 arithmetic, then float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(6, 4))
    points = centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 4)) * rng.gamma(2.0, 0.5, size=(n, 1))
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    return (1.0 / (1.0 + squared / 4.0)).astype(np.float32)


def feature_map(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fmap = np.maximum(rng.normal(size=(48, height, width)), 0.0).astype(np.float32)
    fmap[:, : height // 2] *= 3.0
    rgb = rng.random((height, width, 3), dtype=np.float32)
    return fmap, rgb


CASES = [(seed, n, k) for seed, n in ((0, 256), (1, 400), (2, 768)) for k in (5, 20)]
MAPS = [(seed, 24, 32) for seed in range(3)]


def digests() -> dict[str, str]:
    out = {}
    for seed, n, k in CASES:
        embedding = _core.ncut_embedding(similarity(seed, n), k, "sym", "float32")
        out[f"embedding_{seed}_{n}_{k}"] = hashlib.sha256(np.ascontiguousarray(embedding).tobytes()).hexdigest()
    for seed, height, width in MAPS:
        labels = cm.cluster_feature_map(*feature_map(seed, height, width), pca_dim=7)
        out[f"labels_{seed}"] = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in labels)).hexdigest()
    return out


def test_embeddings_and_partitions_keep_the_reference_bits():
    if _core.simd_level() == "scalar":
        pytest.skip("the reference was recorded with the AVX-512 / AVX2 product kernels; this run is at the baseline")
    expected = json.loads(EXPECTED.read_text())
    assert digests() == expected


if __name__ == "__main__":
    Path(sys.argv[1] if len(sys.argv) > 1 else EXPECTED).write_text(json.dumps(digests(), indent=1) + "\n")
