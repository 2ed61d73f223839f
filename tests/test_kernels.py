"""Files record which code computed their numbers (clustermac.kernels), and say so when rows mix.

"Another kind of machine" is made real here by capping the C++ core at its scalar level
(CLUSTERMAC_NO_AVX2=1) in a child process: on this CPU that level gives other bits than AVX2 for
the similarity, the eigenvectors and the whitening products (README), as another CPU would.
"""

import json
import os
import signal
import warnings
from importlib import metadata

import numpy as np
import onnxruntime
import pytest
from PIL import Image

import clustermac
from clustermac import _core
from clustermac.descriptors.store import manifest_path
from clustermac.distributed.shards import ShardWriter
from clustermac.kernels import (
    KERNEL_KEYS,
    describe_kernels,
    distinct_kernels,
    kernel_record,
    recorded_kernels,
    same_kernels,
    warn_if_mixed,
)

TIMEOUT = 120
SCALAR = {"CLUSTERMAC_NO_AVX2": "1"}

needs_simd = pytest.mark.skipif(
    _core.simd_level() == "scalar", reason="this CPU runs only the scalar level: no second kind of kernels to mix"
)


def _record_at(run_python, env: dict) -> dict:
    """kernel_record() of a child interpreter with the extra environment ``env``."""
    run = run_python("import json, clustermac; print(json.dumps(clustermac.kernel_record()))", env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture
def model(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    return path


# --- the record ----------------------------------------------------------------------------------


def test_the_record_describes_this_process():
    record = kernel_record()
    assert set(record) == {*KERNEL_KEYS, "cpu"}
    assert record["clustermac"] == clustermac.__version__ and record["simd_level"] == _core.simd_level()
    assert record["onnxruntime"] == onnxruntime.__version__ == metadata.version("onnxruntime")
    if os.path.exists("/proc/cpuinfo"):
        flags = set()
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        assert record["cpu_features"] and set(record["cpu_features"]) <= flags
        assert ("avx2" in record["cpu_features"]) == ("avx2" in flags)
    record["cpu_features"] = "changed"  # a copy: the next call is not affected
    assert kernel_record()["cpu_features"] != "changed"
    json.dumps(kernel_record(), allow_nan=False)  # what files store


@needs_simd
def test_the_record_follows_the_simd_cap(run_python):
    capped = _record_at(run_python, SCALAR)
    assert capped["simd_level"] == "scalar"
    assert not same_kernels(capped, kernel_record())
    assert same_kernels({**capped, "simd_level": _core.simd_level()}, kernel_record())


def test_comparison_ignores_the_model_name_and_knows_unrecorded_rows():
    record = kernel_record()
    assert same_kernels(record, {**record, "cpu": "another name"})
    assert not same_kernels(record, {**record, "onnxruntime": "0.0.1"})
    assert not same_kernels(record, {}) and same_kernels({}, {})
    assert distinct_kernels([record, None, {**record, "cpu": "x"}, "junk", {}]) == [record, {}]
    assert recorded_kernels(None) == recorded_kernels("junk") == recorded_kernels([]) == [{}]
    assert recorded_kernels([record, record]) == [record]
    assert describe_kernels({}).startswith("not recorded")
    assert f"core {record['simd_level']}" in describe_kernels(record)


def test_mixed_records_warn_naming_both_and_unrecorded_rows_do_not():
    record = kernel_record()
    other = {**record, "simd_level": "scalar" if record["simd_level"] != "scalar" else "avx2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_mixed([record], "one.npy")
        warn_if_mixed([record, {}], "old-and-new.npy")
    with pytest.warns(clustermac.MixedKernelsWarning, match=r"mixed\.npy: its rows were computed by 2 kinds") as got:
        warn_if_mixed([record, other], "mixed.npy")
    message = str(got[0].message)
    assert f"core {record['simd_level']}" in message and f"core {other['simd_level']}" in message


# --- descriptor files ----------------------------------------------------------------------------


def test_a_descriptor_manifest_records_the_kernels_and_older_manifests_still_load(tmp_path, model):
    _images(tmp_path / "images", 3)
    out = tmp_path / "d.npy"
    extractor = clustermac.Extractor(clustermac.Backbone(model, n_threads=1), "mac")
    manifest = clustermac.extract_folder(extractor, tmp_path / "images", out, progress=False)
    assert manifest["kernels"] == [kernel_record()]
    vectors, loaded = clustermac.load_descriptors(out)
    assert loaded["kernels"] == [kernel_record()]
    # A manifest written before kernels were recorded (no key) loads as before.
    stored = json.loads(manifest_path(out).read_text())
    del stored["kernels"]
    manifest_path(out).write_text(json.dumps(stored))
    again, loaded = clustermac.load_descriptors(out)
    assert "kernels" not in loaded and np.array_equal(again, vectors)
    # A malformed record is named.
    manifest_path(out).write_text(json.dumps({**stored, "kernels": "avx2"}))
    with pytest.raises(clustermac.CorruptFileError, match=r"manifest\['kernels'\] is not a list of records"):
        clustermac.load_descriptors(out)


@needs_simd
def test_a_run_resumed_with_other_kernels_keeps_its_rows_and_says_so(tmp_path, model, run_cli):
    _images(tmp_path / "images", 6)
    out = tmp_path / "d.npy"
    common = ["extract", tmp_path / "images", "--out", out, "--quiet", "--backbone", model, "--method", "clustermac"]
    common += ["--chunk-size", "2"]
    # Started with the core capped at its scalar level, killed (SIGKILL) after its first chunk ...
    run = run_cli(*common, env=SCALAR, crash_at="extract.chunk_json:1")
    assert run.returncode == -signal.SIGKILL, run.stderr
    first_chunk = json.loads((tmp_path / "d.npy.parts" / "chunk_000000.json").read_text())
    assert first_chunk["kernels"]["simd_level"] == "scalar"
    # ... resumed at this CPU's level: the finished chunk is adopted (same settings), and the mix is said.
    run = run_cli(*common)
    assert run.returncode == 0, run.stderr
    assert "MixedKernelsWarning" in run.stderr and "computed by 2 kinds of code" in run.stderr, run.stderr
    _, manifest = clustermac.load_descriptors(out)
    assert [r["simd_level"] for r in manifest["kernels"]] == ["scalar", _core.simd_level()]
    # The same command again from scratch, on one kind of code: one record, no warning.
    out.unlink()
    run = run_cli(*common)
    assert run.returncode == 0 and "MixedKernelsWarning" not in run.stderr, run.stderr
    assert clustermac.load_descriptors(out)[1]["kernels"] == [kernel_record()]


@needs_simd
def test_shards_from_workers_with_other_kernels_are_kept_and_said(tmp_path, run_python):
    other = _record_at(run_python, SCALAR)
    names = ["a.jpg", "b.jpg", "c.jpg"]
    settings = {"method": "mac", "dim": 4}
    writer = ShardWriter(tmp_path / "shards", names, settings, 2, "f" * 64)
    writer.write_shard(0, np.ones((2, 4), np.float32), {}, kernels=other)
    writer.write_shard(1, np.ones((1, 4), np.float32), {})  # this process's record
    with pytest.warns(clustermac.MixedKernelsWarning, match="shards: its rows were computed by 2 kinds"):
        manifest = writer.publish()
    assert manifest["kernels"] == [other, kernel_record()]
    assert clustermac.load_descriptors(tmp_path / "shards")[1]["kernels"] == [other, kernel_record()]


# --- index folders and whitening files -----------------------------------------------------------


@needs_simd
def test_an_index_records_the_kernels_of_its_rows_and_an_append_from_other_code_says_so(tmp_path, model, run_cli):
    _images(tmp_path / "images", 3)
    common = ["--quiet", "--backbone", model, "--method", "mac"]
    assert run_cli("extract", tmp_path / "images", "--out", tmp_path / "here.npy", *common).returncode == 0
    run = run_cli("extract", tmp_path / "images", "--out", tmp_path / "there.npy", *common, env=SCALAR)
    assert run.returncode == 0, run.stderr
    index = tmp_path / "index"
    run = run_cli("index", tmp_path / "here.npy", "--out", index)
    assert run.returncode == 0, run.stderr
    assert clustermac.Index.load(index).info["kernels"] == [kernel_record()]
    run = run_cli("index", tmp_path / "there.npy", "--out", index, "--append")
    assert run.returncode == 0 and "MixedKernelsWarning" in run.stderr, run.stderr
    loaded = clustermac.Index.load(index)
    assert len(loaded) == 6 and [r["simd_level"] for r in loaded.info["kernels"]] == [_core.simd_level(), "scalar"]


def test_a_whitening_file_records_the_kernels_that_learned_it(tmp_path):
    from clustermac.descriptors.whitening import save_whitening_file

    rng = np.random.default_rng(0)
    mean, projection = clustermac.fit_pca_whitening(rng.random((20, 8), dtype=np.float32), 4)
    save_whitening_file(tmp_path / "w.npz", {"mean": mean, "projection": projection}, {"method": "mac"})
    with np.load(tmp_path / "w.npz") as arrays:
        meta = json.loads(arrays["meta"].tobytes())
    assert meta["kernels"] == kernel_record() and meta["settings"] == {"method": "mac"}
