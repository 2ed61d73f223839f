"""The eigensolvers' dense products (linalg/dense_kernels.hpp) and the affinity of Eq. (3)
(clustering/affinity.hpp) give the same bits with AVX-512 registers as with AVX2 ones: the
affinity, the PCA, the NCut embedding and the partitions of cluster_feature_map at the paper's
map sizes are compared bit for bit between a default run and one capped at AVX2
(CLUSTERMAC_NO_AVX512), each in its own subprocess, and checked against NumPy references."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from clustermac import _core

SCRIPT = r"""
import sys
import numpy as np
import clustermac as cm
from clustermac import _core

rng = np.random.default_rng(3)
out = {}
# N = 768 (24 x 32) and N = 3072 (48 x 64), the paper's sizes, N = 667 (23 x 29, C = 5: rows and
# columns that leave partial tiles) and N = 247 (13 x 19, C = 3: rows padded to 248 floats, so the
# affinity's 16-lane steps end on 8 lanes), planted regions.
for h, w, c in ((24, 32, 7), (48, 64, 4), (23, 29, 5), (13, 19, 3)):
    d = 96
    yy, xx = np.mgrid[:h, :w]
    truth = ((yy // (h // 3)) * 3 + xx // (w // 3)).clip(0, 8)
    patterns = np.maximum(rng.normal(size=(9, d)), 0)
    fmap = patterns[truth].transpose(2, 0, 1) + 0.3 * rng.random((d, h, w))
    fmap = np.ascontiguousarray(fmap, dtype=np.float32)
    rgb = np.ascontiguousarray(rng.random((9, 3))[truth] + 0.05 * rng.random((h, w, 3)), dtype=np.float32)
    n = h * w
    for i, labels in enumerate(cm.cluster_feature_map(fmap, rgb, pca_dim=c)):
        out[f"labels_{n}_{i}"] = labels
    flat = np.ascontiguousarray(fmap.reshape(d, -1).T)
    projected, variances = cm.pca_project(flat, c)
    out[f"flat_{n}"], out[f"pca_{n}"], out[f"variances_{n}"] = flat, projected, variances
    s = cm.affinity(projected)
    out[f"affinity_{n}"] = s
    for k in (5, 20):
        out[f"embedding_{n}_{k}"] = cm.ncut_embedding(s, k)
out["simd_level"] = np.array(_core.simd_level())
out["kernel_choices"] = np.array(sorted(_core.kernel_choices().items()))
np.savez(sys.argv[1], **out)
"""


def run_with(environment: dict, path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERMAC_NO_AVX2", "CLUSTERMAC_NO_AVX512")}
    env.update(environment)
    subprocess.run([sys.executable, "-c", SCRIPT, path], env=env, check=True, timeout=300)
    with np.load(path) as data:
        return dict(data)


def test_avx512_products_give_the_bits_of_the_avx2_ones(tmp_path):
    if _core.simd_level() != "avx512":
        pytest.skip(f"this CPU's best level is {_core.simd_level()!r}: there is no AVX-512 path to compare")
    default = run_with({}, str(tmp_path / "default.npz"))
    capped = run_with({"CLUSTERMAC_NO_AVX512": "1"}, str(tmp_path / "capped.npz"))
    assert str(default["simd_level"]) == "avx512" and str(capped["simd_level"]) == "avx2"
    assert default.keys() == capped.keys()
    # Which width each kernel runs at is timed in each process (the bits are the same either way).
    assert set(default["kernel_choices"][:, 0]) == {"dense_products", "affinity"}
    assert set(default["kernel_choices"][:, 1]) <= {"avx512", "avx2"}
    assert set(capped["kernel_choices"][:, 1]) == {"avx2"}
    for key in default:
        if key not in ("simd_level", "kernel_choices"):
            np.testing.assert_array_equal(capped[key], default[key], err_msg=key)

    # And the results are right: the PCA against NumPy's SVD, the embedding against eigh.
    for n in (768, 3072, 667, 247):
        flat = default[f"flat_{n}"].astype(np.float64)
        projected, variances = default[f"pca_{n}"], default[f"variances_{n}"]
        singular = np.linalg.svd(flat - flat.mean(axis=0), compute_uv=False)
        np.testing.assert_allclose(variances, singular[: len(variances)] ** 2 / (n - 1), rtol=1e-2)
        np.testing.assert_allclose(projected.var(axis=0, ddof=1), variances, rtol=1e-3)
        s = default[f"affinity_{n}"].astype(np.float64)
        np.fill_diagonal(s, 0.0)
        inverse_sqrt = 1.0 / np.sqrt(s.sum(axis=1))
        _, vectors = np.linalg.eigh(inverse_sqrt[:, None] * s * inverse_sqrt[None, :])
        # The planted maps have 9 groups: the top-9 eigenvectors span their indicators, well
        # separated from the rest; the K = 5 embedding lies in that span, and so do K = 20's first 9.
        q_ref, _ = np.linalg.qr(inverse_sqrt[:, None] * vectors[:, ::-1][:, :9])
        for k, columns in ((5, 5), (20, 9)):
            q_got, _ = np.linalg.qr(default[f"embedding_{n}_{k}"][:, :columns].astype(np.float64))
            distance = np.linalg.norm(q_got - q_ref @ (q_ref.T @ q_got), 2)
            assert distance < 5e-2, (n, k, distance)
