"""The exact search keeps its bits across speed work: top-k scores and indices of `topk_search` at the
AVX2 level (capped with CLUSTERMAC_NO_AVX512, so the same kernels run on AVX2-only and AVX-512 CPUs),
pinned as SHA-256 digests written by the build of commit 6d74c91, before the float32 kernel read
packed operands. Every path must give them (the scans re-score their candidates with that kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clustermac import _core

# Computed with 6d74c91's build (topk_search had only the float32 path then) on an AMD EPYC, AVX2 level.
PINNED = {
    "1000x512_q13_k20": "d3f21a9a1bc2bc5c52394f25c5d4e2fc3deee07b430f01488e745a27dd6e5383",
    "777x33_q7_k777": "daf75629e15543d535ff70ac5550aeff63ed464875721d176b677fac33744baf",
    "3001x128_q20_k100": "59741d6b2c476d5992c6ca4a50a787dc69965fd407039fa39d2f0ab60032fca6",
    "300x1280_q1_k5": "efa9c64c0a19016c0cecdef78256576bec4c7c62c43fb161ff07efd86643ba15",
}

# Values from integer arithmetic and one IEEE division each: the same floats on every machine and
# NumPy version, and not exactly summable, so a change in the order of the multiply-adds shows.
SCRIPT = r"""
import hashlib, json, sys
import numpy as np
from clustermac import _core

def values(count, seed):
    i = np.arange(count, dtype=np.int64)
    return ((((i * 1103515245 + 12345 + seed * 7919) % 2147483648) % 2001 - 1000) / 997.0).astype(np.float32)

out = {"level": _core.simd_level()}
for n, d, q, k in [(1000, 512, 13, 20), (777, 33, 7, 777), (3001, 128, 20, 100), (300, 1280, 1, 5)]:
    db, qs = values(n * d, 1).reshape(n, d), values(q * d, 2).reshape(q, d)
    for path in ("float32", "f32scan", "auto"):
        for threads in (1, 2):
            s, idx = _core.topk_search(db, qs, k, n_threads=threads, path=path)
            digest = hashlib.sha256(s.tobytes() + idx.astype(np.int64).tobytes()).hexdigest()
            out[f"{n}x{d}_q{q}_k{k} {path} {threads}"] = digest
print(json.dumps(out))
"""


def test_topk_search_gives_the_pinned_bits_at_the_avx2_level():
    if _core.simd_level() not in ("avx2", "avx512"):
        pytest.skip(f"the digests are of the AVX2 kernels; this CPU's level is {_core.simd_level()!r}")
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERMAC_NO_AVX2"}
    env["CLUSTERMAC_NO_AVX512"] = "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    digests = json.loads(run.stdout)
    assert digests.pop("level") == "avx2"
    assert len(digests) == 3 * 2 * len(PINNED)
    for key, digest in digests.items():
        assert digest == PINNED[key.split()[0]], key
