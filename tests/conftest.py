"""Shared settings and fixtures of the test suite.

- ``CLUSTERMAC_CACHE`` points at a folder made for this session (removed at its end) unless the
  caller set it: the embedded backbone builds its ONNX file there on first use (a few seconds,
  once per session) instead of in ``$HOME/.cache``.
- The ``network`` marker tags tests that run a CNN backbone (the embedded EfficientNet-Lite0 or
  an exported VGG16 / ResNet101): ``pytest -m "not network"`` is the fast core run. The ``bf16``
  marker skips a test where the CPU lacks AVX512-BF16.
- Data helpers written once for every folder, as fixtures that return the function (fixtures
  work whatever pytest's import mode, test modules need not import each other).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

_SESSION_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "network: runs a CNN backbone (ONNX Runtime or torch); deselect with -m 'not network'"
    )
    config.addinivalue_line("markers", "bf16: needs AVX512-BF16; skipped on CPUs without it")
    if not os.environ.get("CLUSTERMAC_CACHE"):
        folder = tempfile.mkdtemp(prefix="clustermac-test-cache-")
        os.environ["CLUSTERMAC_CACHE"] = folder
        config.stash[_SESSION_CACHE] = folder


def pytest_unconfigure(config):
    folder = config.stash.get(_SESSION_CACHE, None)
    if folder is not None:
        os.environ.pop("CLUSTERMAC_CACHE", None)
        shutil.rmtree(folder, ignore_errors=True)


# --- feature maps -------------------------------------------------------------------------------


def _planted_map(d=48, h=20, w=28, noise=0.15, seed=0):
    """D x H x W activations with 4 planted regions (background, two rectangles, a disc), the
    matching H x W x 3 colours and the H x W truth labels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int32)
    truth[2:9, 3:12] = 1
    truth[11:18, 16:26] = 2
    yy, xx = np.mgrid[:h, :w]
    truth[(yy - 5) ** 2 + (xx - 21) ** 2 <= 9] = 3
    patterns = np.maximum(rng.normal(size=(4, d)) * 2.0, 0.0)
    features = patterns[truth].transpose(2, 0, 1) + noise * rng.normal(size=(d, h, w))
    colours = np.array([[0.1, 0.2, 0.3], [0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.9, 0.9, 0.2]])
    rgb = colours[truth] + 0.02 * rng.normal(size=(h, w, 3))
    return np.ascontiguousarray(features, np.float32), np.ascontiguousarray(rgb, np.float32), truth


def _planted_object_map(rng, channels=24, height=11, width=13, box=(3, 2, 9, 7)):
    """An 'object' firing the first half of the channels inside `box`, clutter firing the other
    half everywhere else: the best-matching box for the object's MAC is `box` itself.
    Returns (D x H x W map, the object's MAC as the query)."""
    half = channels // 2
    fmap = np.zeros((channels, height, width), np.float32)
    fmap[half:] = np.maximum(rng.standard_normal((channels - half, height, width)), 0) * 2.0
    x0, y0, x1, y1 = box
    fmap[half:, y0:y1, x0:x1] = 0.0
    pattern = np.maximum(rng.standard_normal((half, y1 - y0, x1 - x0)), 0).astype(np.float32) * 2.0 + 0.1
    fmap[:half, y0:y1, x0:x1] = pattern
    query = np.concatenate([pattern.max(axis=(1, 2)), np.zeros(channels - half, np.float32)])
    return fmap, query


def _random_codes(rng, height, width, channels):
    """H x W x D 8-bit codes, 80 % zeros (sparse, like post-ReLU activations)."""
    codes = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    codes[rng.random(codes.shape) < 0.8] = 0
    return codes


@pytest.fixture
def planted_map():
    """``planted_map(d, h, w, noise, seed) -> (features, rgb, truth)``: regions for clustering."""
    return _planted_map


@pytest.fixture
def planted_object_map():
    """``planted_object_map(rng, channels, height, width, box) -> (fmap, query)``: for AML."""
    return _planted_object_map


@pytest.fixture
def random_codes():
    """``random_codes(rng, height, width, channels) -> uint8 H x W x D``."""
    return _random_codes


# --- backbones ----------------------------------------------------------------------------------


def _pooling_model(
    path,
    dim: int,
    stride: int,
    seed: int = 0,
    preset: str | None = None,
    dynamic_dim: bool = False,
    weights_id: str | None = None,
):
    """A stand-in backbone: average-pool stride×stride blocks, then a 1×1 conv 3 → dim.

    Its output is easy to compute in NumPy from the network input, which is what lets the
    tests check preprocessing exactly. Returns (path, weight, bias).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((dim, 3, 1, 1)).astype(np.float32)
    bias = rng.standard_normal(dim).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[stride, stride], strides=[stride, stride]),
        helper.make_node("Conv", ["pooled", "weight", "bias"], ["features"]),
    ]
    channels = "channels" if dynamic_dim else dim
    graph = helper.make_graph(
        nodes,
        "pooling",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, channels, "h", "w"])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    properties = {}
    if preset:
        properties["clustermac.preset"] = preset
    if weights_id:
        properties["clustermac.weights"] = weights_id
    if properties:
        helper.set_model_props(model, properties)
    onnx.save(model, str(path))
    return path, weight, bias


@pytest.fixture(scope="session")  # a plain function: shareable by module-scoped fixtures
def pooling_model():
    """``pooling_model(path, dim, stride, seed=0, preset=None, dynamic_dim=False, weights_id=None)
    -> (path, weight, bias)``: a tiny ONNX stand-in backbone (average pool, then a 1x1 conv)."""
    return _pooling_model


# --- images -------------------------------------------------------------------------------------


def _photos(folder, n=5, size=160):
    """Save ``n`` JPEG crops of scikit-image's bundled photographs in ``folder``; return the names."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.stereo_motorcycle()[0]]
    names = []
    for i in range(n):
        img = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        img.thumbnail((size + 16 * i, size + 16 * i))
        names.append(f"photo{i}.jpg")
        img.save(folder / names[-1], quality=90)
    return names


@pytest.fixture(scope="session")  # a plain function: shareable by module-scoped fixtures
def write_photos():
    """``write_photos(folder, n=5, size=160) -> [names]``: small real photographs written to a folder."""
    return _photos


# --- CPU features -------------------------------------------------------------------------------

_BF16: list[bool] = []


def _cpu_has_bf16() -> bool:
    """Whether the core accepts similarity_precision="bfloat16" here (AVX512-BF16, not turned off)."""
    if not _BF16:
        import clustermac

        try:
            clustermac.ncut_embedding(np.eye(3, dtype=np.float32) + 0.5, 1, similarity_precision="bfloat16")
            _BF16.append(True)
        except ValueError:
            _BF16.append(False)
    return _BF16[0]


def pytest_runtest_setup(item):
    if item.get_closest_marker("bf16") is not None and not _cpu_has_bf16():
        pytest.skip("the CPU lacks AVX512-BF16 (or CLUSTERMAC_NO_BF16 is set)")


# --- evaluation ---------------------------------------------------------------------------------


def _reference_classic_map(ranks, gnd_file):
    """Classic mAP (%) of ``ranks`` (n_database x n_queries) from a revisited ground-truth pickle,
    independently of clustermac.evaluate: positives = easy + hard, junk dropped from the list, AP
    as the mean over positives of precision at each hit (Oxford's trapezoid, written per hit).
    Returns (mAP, list of per-query AP)."""
    import pickle

    with open(gnd_file, "rb") as f:
        gnd = pickle.load(f)["gnd"]
    aps = []
    for q, entry in enumerate(gnd):
        positives, junk = set(entry["easy"]) | set(entry["hard"]), set(entry["junk"])
        if not positives:
            continue
        kept = [i for i in ranks[:, q] if i not in junk]
        hits = [rank for rank, i in enumerate(kept) if i in positives]  # 0-based ranks of the hits
        # Trapezoid between the precision before and at each hit: (j/r + (j+1)/(r+1)) / 2 per hit j.
        ap = sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(hits)) / len(positives)
        aps.append(ap)
    return 100.0 * float(np.mean(aps)), aps


@pytest.fixture
def reference_classic_map():
    """``reference_classic_map(ranks, gnd_pickle) -> (mAP %, per-query APs)``, plain Python."""
    return _reference_classic_map


def _run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh interpreter with extra environment variables; bounded in time."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def run_python():
    """``run_python(code, env=None)``: a child interpreter's CompletedProcess (for kills and crash points)."""
    return _run_python


def _run_cli(*args, env: dict | None = None, crash_at: str | None = None, timeout: float = 120):
    """The real `clustermac` command in a child interpreter: its CompletedProcess. ``env`` adds
    environment variables; ``crash_at`` sets CLUSTERMAC_CRASH_AT (otherwise it is removed)."""
    environment = {k: v for k, v in os.environ.items() if k != "CLUSTERMAC_CRASH_AT"}
    environment.update(env or {})
    if crash_at:
        environment["CLUSTERMAC_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "clustermac.cli", *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_cli():
    """``run_cli(*args, env=None, crash_at=None, timeout=120)``: the `clustermac` command in a child process."""
    return _run_cli


def _check_aml_golden(script, expected_files: dict, tmp_path) -> None:
    """Run the golden-box ``script`` (which writes {case: [x0, y0, x1, y1, score]} to the .npz path it
    is given and prints its SIMD level) at every level of ``expected_files`` ({"avx512" | "avx2":
    .npz}) that this CPU runs (AVX2 on an AVX-512 CPU through CLUSTERMAC_NO_AVX512), and require
    the same boxes and scores; skip if it runs none of them."""
    from clustermac import _core

    native = _core.simd_level()
    runnable = {"avx512": native == "avx512", "avx2": native in ("avx2", "avx512")}
    checked = []
    for level, expected_file in expected_files.items():
        if not runnable[level]:
            continue
        got_file = tmp_path / f"{level}.npz"
        env = {"CLUSTERMAC_NO_AVX512": "1"} if level == "avx2" else {}
        run = subprocess.run(
            [sys.executable, str(script), str(got_file)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **env},
        )
        assert run.returncode == 0, run.stderr
        assert f"at SIMD level {level}" in run.stdout, run.stdout
        with np.load(expected_file) as expected_data, np.load(got_file) as got_data:
            expected = {key: expected_data[key] for key in expected_data.files}
            got = {key: got_data[key] for key in got_data.files}
        assert sorted(got) == sorted(expected), level
        for key, value in got.items():
            np.testing.assert_array_equal(value[:4], expected[key][:4], err_msg=f"{level} {key}")  # the same box
            assert value[4] == pytest.approx(expected[key][4], rel=0, abs=1e-12), f"{level} {key}"  # the same score
        checked.append(level)
    if not checked:
        levels = sorted(expected_files)
        pytest.skip(f"the expected boxes are for the SIMD levels {levels}; this CPU or build runs {native}")


@pytest.fixture
def check_aml_golden():
    """``check_aml_golden(script, {level: expected .npz}, tmp_path)``: AML's boxes against a reference build's."""
    return _check_aml_golden


# --- an index as `clustermac serve` needs it ----------------------------------------------------


@pytest.fixture(scope="session")
def serve_index(tmp_path_factory):
    """``(index folder, image root)``: 8 photos, a copy named with HTML markup and a symbolic link
    to a photo outside the root, indexed by ``clustermac index … --whitening --store --write-store``
    (embedded backbone at max size 192; whitening learned on 5 other photos)."""
    from clustermac.cli import main

    base = tmp_path_factory.mktemp("serve")
    photos = base / "photos"
    names = _photos(photos, n=8, size=160)
    _photos(base / "outside", n=1, size=150)
    (photos / "link-out.jpg").symlink_to(base / "outside" / "photo0.jpg")
    shutil.copy(photos / names[1], photos / "<img src=x onerror=alert(1)>.jpg")
    _photos(base / "whitening", n=5, size=176)
    size = ["--max-size", "192"]
    whitening, descriptors, index = base / "w.npz", base / "d.npy", base / "idx"
    assert main(["fit-whitening", str(base / "whitening"), "--out", str(whitening), "--quiet", *size]) == 0
    extract = ["extract", str(photos), "--out", str(descriptors), "--whitening", str(whitening), "--quiet"]
    assert main([*extract, *size]) == 0
    command = ["index", str(descriptors), "--out", str(index), "--image-root", str(photos), "--whitening"]
    assert main([*command, str(whitening), "--store", str(base / "db.cmfm"), "--write-store"]) == 0
    return index, photos
