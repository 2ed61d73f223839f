"""The hand-vectorised kernels give the same results on every instruction-set path.

The core picks AVX-512, AVX2 + FMA or the baseline once per process (clustermac's
``simd_level``); CLUSTERMAC_NO_AVX512 and CLUSTERMAC_NO_AVX2 cap the choice, so each path is run
in its own subprocess on the same data. On a CPU without AVX-512 (or AVX2) the capped runs take
the same path as the default one and the comparison is trivially true for that part.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r"""
import sys
import numpy as np
import clustermac as cm
from clustermac import _core

rng = np.random.default_rng(7)
out = {}
# AML on 8-bit codes (p = 10 has its own root; p = 7 the general one) and on a float map.
fmap = (np.maximum(rng.random((40, 13, 11), dtype=np.float32) - 0.7, 0.0) ** 2 * 50).astype(np.float32)
fmap[:, 3:8, 2:7] += rng.random((40, 5, 5), dtype=np.float32)
codes, scale = cm.quantize_feature_map(fmap)
codes = np.ascontiguousarray(codes.transpose(1, 2, 0))
query = fmap[:, 3:8, 2:7].max(axis=(1, 2))
for name, kwargs in {"p10": {}, "p7": {"p": 7.0}, "aspect": {"query_aspect": 1.0}, "step2": {"step": 2}}.items():
    box, score = _core.aml_localize_codes(codes, query, **kwargs)
    out[f"aml_codes_{name}"] = np.array([*box, score])
box, score = cm.aml_localize(fmap, query)
out["aml_float"] = np.array([*box, score])
# Max-pooling: R-MAC grid and clusters, on floats and on codes.
regions = cm.rmac_regions(13, 11)
labels = rng.integers(-1, 6, (13, 11)).astype(np.int32)
out["grid_mac"] = cm.grid_mac(fmap, regions)
out["region_mac"] = cm.region_mac(fmap, labels)
# Ties between +0 and -0: the bits, on 40 channels (five blocks of 8 on AVX2 and AVX-512, one by one on the baseline).
zeros = rng.choice(np.array([-0.0, 0.0, 1.0], dtype=np.float32), size=(40, 13, 11))
out["region_mac_signed_zeros"] = cm.region_mac(zeros, labels).view(np.uint32)
out["grid_mac_codes"] = _core.grid_mac_codes(codes, [1, 2, 10, 12], cm.rmac_regions(10, 9), scale)
out["region_mac_codes"] = _core.region_mac_codes(codes, labels, [1, 2, 10, 12], scale)
# Whitening and aggregation (the dense product kernel).
mean, projection = cm.fit_pca_whitening(rng.random((200, 40), dtype=np.float32), shrinkage=1e-2)
out["aggregate"] = cm.aggregate_regions(out["grid_mac"], mean, projection)
out["whitened"] = cm.apply_whitening(rng.random((7, 40), dtype=np.float32), mean, projection)
# Exact search.
database = rng.standard_normal((3000, 48)).astype(np.float32)
queries = rng.standard_normal((9, 48)).astype(np.float32)
scores, indices = cm.topk_search(database, queries, 15)
out["topk_scores"], out["topk_indices"] = scores, indices
# The active level after the caps ("avx512", "avx2" or "scalar"), where the build reports it.
if hasattr(_core, "simd_level"):
    out["simd_level"] = np.array(_core.simd_level())
np.savez(sys.argv[1], **out)
"""

# What each cap leaves active, given the level of an uncapped run on this CPU.
EXPECTED_LEVEL = {
    "CLUSTERMAC_NO_AVX512": {"avx512": "avx2", "avx2": "avx2", "scalar": "scalar"},
    "CLUSTERMAC_NO_AVX2": {"avx512": "scalar", "avx2": "scalar", "scalar": "scalar"},
}
NO_SIMD_LEVEL = "clustermac._core.simd_level() is absent in this build: cannot confirm the cap changed the code path"


def run_with(environment: dict, path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERMAC_NO_AVX2", "CLUSTERMAC_NO_AVX512")}
    env.update(environment)
    subprocess.run([sys.executable, "-c", SCRIPT, path], env=env, check=True)
    with np.load(path) as data:
        return dict(data)


@pytest.mark.parametrize("cap", [{"CLUSTERMAC_NO_AVX512": "1"}, {"CLUSTERMAC_NO_AVX2": "1"}])
def test_capped_instruction_set_gives_the_same_results(tmp_path, cap):
    default = run_with({}, str(tmp_path / "default.npz"))
    capped = run_with(cap, str(tmp_path / "capped.npz"))
    assert default.keys() == capped.keys()
    for key in default:
        if key == "simd_level":
            continue
        if key.startswith("aml_"):
            np.testing.assert_array_equal(capped[key][:4], default[key][:4], err_msg=key)  # the same box
            assert capped[key][4] == pytest.approx(default[key][4], abs=2e-5), key
        elif key in (
            "grid_mac",
            "region_mac",
            "region_mac_signed_zeros",
            "grid_mac_codes",
            "region_mac_codes",
            "topk_indices",
        ):
            np.testing.assert_array_equal(capped[key], default[key], err_msg=key)  # maxima and ranks: exact
        else:
            np.testing.assert_allclose(capped[key], default[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if "simd_level" in default:  # the capped run reports the level the cap leaves (see the test below)
        (name,) = cap
        assert str(capped["simd_level"]) == EXPECTED_LEVEL[name][str(default["simd_level"])]


@pytest.mark.parametrize("cap", ["CLUSTERMAC_NO_AVX512", "CLUSTERMAC_NO_AVX2"])
def test_cap_changes_the_active_simd_level(cap):
    """The comparison above only means something if the capped run took another code path."""
    from clustermac import _core

    if not hasattr(_core, "simd_level"):
        pytest.skip(NO_SIMD_LEVEL)
    code = "from clustermac import _core; print(_core.simd_level())"

    def level(environment):
        env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERMAC_NO_AVX2", "CLUSTERMAC_NO_AVX512")}
        env.update(environment)
        return subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    default = level({})
    assert default in ("avx512", "avx2", "scalar")
    capped = level({cap: "1"})
    assert capped == EXPECTED_LEVEL[cap][default], (default, capped)
    if capped == default:
        pytest.skip(f"this CPU's best level is {default!r}: {cap} leaves the code path unchanged")
