"""Issue 12 on the descriptor store: chunks of another run are never adopted, the data and the
manifest are never read mixed, every malformed pair is a CorruptFileError, bad settings are
refused before any image is read, and a non-finite descriptor is never written.

Kills are real (``CLUSTERMAC_CRASH_AT`` in a subprocess), each bounded by ``timeout=``; the
backbone is a tiny ONNX stand-in (tests/conftest.py ``pooling_model``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.descriptors.store import manifest_path

FORMAT_VERSION = 2

LEGACY = Path(__file__).resolve().parents[1] / "data" / "v0.1.0"


@pytest.fixture
def model(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    return path


def extractor(model, method="mac"):
    return clustermac.Extractor(clustermac.Backbone(model, n_threads=1), method)


def write_images(folder, n=6, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return [f"img{i}.png" for i in range(n)]


# --- 2. resume only what matches ----------------------------------------------------------------


def test_chunks_of_a_run_with_other_settings_are_discarded_even_without_run_json(tmp_path, model, run_cli):
    names = write_images(tmp_path / "images")
    out = tmp_path / "d.npy"
    # A GeM run killed after its second finished chunk (the loser of issue 12, item 1).
    run = run_cli(
        "extract", tmp_path / "images", "--out", out, "--quiet", "--backbone", model, "--method", "gem",
        "--chunk-size", "2", crash_at="extract.chunk_json:2",
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr
    parts = tmp_path / "d.npy.parts"
    assert sorted(p.name for p in parts.glob("chunk_*.json")) == ["chunk_000000.json", "chunk_000001.json"]
    (parts / "run.json").unlink()  # as a kill during the old clean-up left it
    mac = extractor(model, "mac")
    with pytest.warns(UserWarning, match=r"discarded 2 finished chunks \(left by a run with other settings"):
        clustermac.extract_folder(mac, tmp_path / "images", out, progress=False, chunk_size=2)
    vectors, manifest = clustermac.load_descriptors(out, mmap=False)
    assert manifest["settings"]["method"] == "mac" and manifest["images"] == names
    expected = mac.extract_many([str(tmp_path / "images" / n) for n in names], progress=False)
    np.testing.assert_array_equal(vectors, expected)
    assert not parts.exists()


def test_chunks_without_a_fingerprint_are_discarded(tmp_path, model):
    names = write_images(tmp_path / "images", n=3)
    parts = tmp_path / "d.npy.parts"
    parts.mkdir()
    # A finished chunk as clustermac 0.1.0 wrote it: no fingerprint, zero rows.
    np.save(parts / "chunk_000000.npy", np.zeros((3, 512), np.float32))
    (parts / "chunk_000000.json").write_text(json.dumps({"names": names, "failed": {}}))
    ex = extractor(model)
    with pytest.warns(UserWarning, match="discarded 1 finished chunk .no fingerprint"):
        clustermac.extract_folder(ex, tmp_path / "images", tmp_path / "d.npy", progress=False)
    vectors, _ = clustermac.load_descriptors(tmp_path / "d.npy")
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_the_fingerprint_covers_settings_images_and_chunk_size(tmp_path, model):
    from clustermac.descriptors.store import settings_fingerprint

    settings = {"method": "mac", "dim": 512}
    base = settings_fingerprint(settings, ["a.png", "b.png"], 64)
    assert len(base) == 64 and base == settings_fingerprint(dict(reversed(settings.items())), ["a.png", "b.png"], 64)
    assert base != settings_fingerprint({**settings, "method": "gem"}, ["a.png", "b.png"], 64)
    assert base != settings_fingerprint(settings, ["a.png", "c.png"], 64)
    assert base != settings_fingerprint(settings, ["a.png", "b.png"], 2)
    write_images(tmp_path / "images", n=2)
    manifest = clustermac.extract_folder(extractor(model), tmp_path / "images", tmp_path / "d.npy", progress=False)
    assert manifest["fingerprint"] == settings_fingerprint(manifest["settings"], manifest["images"], 64)


# --- 4. data first, manifest last; a mixed pair is refused --------------------------------------


def test_a_crash_between_data_and_manifest_is_refused_then_repaired(tmp_path, model, run_cli):
    write_images(tmp_path / "images")
    out = tmp_path / "d.npy"
    clustermac.extract_folder(extractor(model, "mac"), tmp_path / "images", out, progress=False)
    common = ["extract", tmp_path / "images", "--out", out, "--quiet", "--backbone", model, "--method", "gem"]
    run = run_cli(*common, crash_at="extract.after_npy_rename:1")
    assert run.returncode == -signal.SIGKILL, run.stderr
    # GeM rows under the MAC manifest: refused, naming the file and the problem.
    with pytest.raises(clustermac.CorruptFileError, match=r"d\.npy: its SHA-256 does not match") as caught:
        clustermac.load_descriptors(out)
    assert caught.value.path == out
    assert run_cli(*common).returncode == 0  # the same command again repairs it
    vectors, manifest = clustermac.load_descriptors(out)
    assert manifest["settings"]["method"] == "gem" and vectors.shape == (6, 512)


def test_manifest_holds_version_rows_dim_size_and_checksum(tmp_path, model):
    write_images(tmp_path / "images", n=3)
    out = tmp_path / "d.npy"
    clustermac.extract_folder(extractor(model), tmp_path / "images", out, progress=False)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["format"] == "clustermac.descriptors" and manifest["version"] == FORMAT_VERSION
    import hashlib

    data = out.read_bytes()
    assert manifest["data"] == {
        "dtype": "<f4",
        "rows": 3,
        "dim": 512,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert np.load(out).dtype == np.float32  # still a plain .npy


def valid_pair(tmp_path, model, n=3):
    write_images(tmp_path / "images", n=n)
    out = tmp_path / "d.npy"
    clustermac.extract_folder(extractor(model), tmp_path / "images", out, progress=False)
    return out, json.loads(manifest_path(out).read_text())


def write_manifest(out, manifest):
    manifest_path(out).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "zero-byte npy": (lambda out, m: out.write_bytes(b""), "empty file"),
    "truncated npy": (lambda out, m: out.write_bytes(out.read_bytes()[:-5]), "truncated"),
    "padded npy": (lambda out, m: out.write_bytes(out.read_bytes() + b"\0" * 4), "too long"),
    "not an npy": (lambda out, m: out.write_bytes(b"hello world" * 30), "not a readable .npy"),
    "float64 npy": (lambda out, m: np.save(out, np.zeros((3, 512))), "float64"),
    "1-D npy": (lambda out, m: np.save(out, np.zeros(3 * 512, np.float32)), "shape"),
    "fortran npy": (lambda out, m: np.save(out, np.asfortranarray(np.ones((3, 512), np.float32))), "Fortran"),
    "NaN row": (
        lambda out, m: (
            np.save(out, np.where(np.arange(3)[:, None] == 1, np.nan, 1.0).repeat(512, 1).astype(np.float32)),
            write_manifest(out, {k: v for k, v in m.items() if k not in ("version", "data", "format")}),
        ),
        "row 1 holds NaN",
    ),
    "flipped data byte": (
        lambda out, m: out.write_bytes(out.read_bytes()[:-1] + bytes([out.read_bytes()[-1] ^ 1])),
        "SHA-256 does not match",
    ),
    "manifest is a list": (lambda out, m: manifest_path(out).write_text("[1, 2]"), "is a JSON list"),
    "manifest without images": (lambda out, m: write_manifest(out, {**m, "images": None} | {}), "'images'"),
    "manifest lacks settings": (
        lambda out, m: write_manifest(out, {k: v for k, v in m.items() if k != "settings"}),
        "lacks 'settings'",
    ),
    "manifest not UTF-8": (lambda out, m: manifest_path(out).write_bytes(b'{"images": "\xff\xfe"}'), "not UTF-8"),
    "manifest not JSON": (lambda out, m: manifest_path(out).write_text("{ not json"), "not valid JSON"),
    "manifest nested deeply": (lambda out, m: manifest_path(out).write_text("[" * 100000), "not valid JSON"),
    "newer version": (lambda out, m: write_manifest(out, {**m, "version": 99}), "newer clustermac"),
    "rows forged": (lambda out, m: write_manifest(out, {**m, "data": {**m["data"], "rows": 2}}), "2 rows"),
    "size forged": (lambda out, m: write_manifest(out, {**m, "data": {**m["data"], "bytes": 12}}), "manifest says 12"),
    "checksum missing": (
        lambda out, m: write_manifest(out, {**m, "data": {k: v for k, v in m["data"].items() if k != "sha256"}}),
        "not a SHA-256",
    ),
    "an image too many": (lambda out, m: write_manifest(out, {**m, "images": m["images"] + ["x.png"]}), "rows"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_pair_is_a_corrupt_file_error(tmp_path, model, case):
    out, manifest = valid_pair(tmp_path, model)
    corrupt, message = CORRUPTIONS[case]
    corrupt(out, manifest)
    for mmap in (True, False):
        with pytest.raises(clustermac.CorruptFileError, match=message) as caught:
            clustermac.load_descriptors(out, mmap=mmap)
        assert caught.value.path in (out, manifest_path(out)) and str(caught.value.path) in str(caught.value)


def test_verify_false_skips_only_the_full_read(tmp_path, model):
    out, manifest = valid_pair(tmp_path, model)
    data = bytearray(out.read_bytes())
    data[-1] ^= 1  # a flipped bit in the last value: the header and the size still agree
    out.write_bytes(bytes(data))
    vectors, _ = clustermac.load_descriptors(out, verify=False)
    assert vectors.shape == (3, 512)
    with pytest.raises(clustermac.CorruptFileError, match="SHA-256"):
        clustermac.load_descriptors(out)
    out.write_bytes(bytes(data[:-4]))  # truncation is caught without the full read
    with pytest.raises(clustermac.CorruptFileError, match="truncated"):
        clustermac.load_descriptors(out, verify=False)


def test_files_of_0_1_0_load_with_every_option():
    reference, _ = clustermac.load_descriptors(LEGACY / "desc.npy", mmap=False)
    for mmap in (True, False):
        for verify in (True, False):
            vectors, manifest = clustermac.load_descriptors(LEGACY / "desc.npy", mmap=mmap, verify=verify)
            np.testing.assert_array_equal(np.asarray(vectors), reference)
            assert "version" not in manifest and manifest["settings"]["dim"] == 6


# --- 9. fuzz: >= 1000 malformed pairs, one subprocess ------------------------------------------

FUZZ = textwrap.dedent(
    r"""
    import hashlib, json, random, shutil, sys, traceback
    from pathlib import Path
    import numpy as np
    import clustermac
    from clustermac.descriptors.store import load_descriptors

    seed, cases, folder, legacy = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((5, 8)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "base.npy", vectors)
    data = (folder / "base.npy").read_bytes()
    manifest = {
        "format": "clustermac.descriptors", "version": 2, "images": [f"i{k}.png" for k in range(5)],
        "failed": {"bad.png": "ImageLoadError: x"}, "settings": {"method": "mac", "dim": 8},
        "fingerprint": "0" * 64,
        "data": {"dtype": "<f4", "rows": 5, "dim": 8, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    legacy_pair = ((legacy / "desc.npy").read_bytes(), (legacy / "desc.json").read_bytes())
    ODD = [None, True, -1, 0, 2**63, 1.5, float("inf"), "x", "", [], {}, [1], {"a": 1}, "f" * 64, "<f8", [None] * 3]

    def forge(value, depth=0):
        if isinstance(value, dict) and value and rng.random() < 0.7:
            value = dict(value)
            key = rng.choice(sorted(value))
            if rng.random() < 0.3:
                del value[key]
            else:
                value[key] = forge(value[key], depth + 1)
            return value
        if isinstance(value, list) and value and rng.random() < 0.5:
            value = list(value)
            value[rng.randrange(len(value))] = rng.choice(ODD)
            return value
        if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
            return value + rng.choice([-1, 1, 4, -4, 10**6])
        return rng.choice(ODD)

    def flip(raw, n):
        raw = bytearray(raw)
        for _ in range(n):
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)

    def mutate():
        npy, text = (data, json.dumps(manifest).encode()) if rng.random() < 0.8 else legacy_pair
        kind = rng.randrange(9)
        if kind == 0:
            npy = npy[: rng.randrange(len(npy) + 1)]
        elif kind == 1:
            npy = flip(npy, rng.randint(1, 4))
        elif kind == 2:
            npy = flip(npy[:128], rng.randint(1, 3)) + npy[128:]  # the header
        elif kind == 3:
            text = text[: rng.randrange(len(text) + 1)]
        elif kind == 4:
            text = flip(text, rng.randint(1, 4))
        elif kind == 5:
            text = json.dumps(forge(json.loads(text))).encode()
        elif kind == 6:
            header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
                rng.choice(["<f4", ">f4", "<f8", "|O", "<i4", "zz"]),
                rng.choice(["False", "True", "0"]),
                rng.choice(["(5, 8)", "(5,)", "(10**12, 8)", "(-1, 8)", "(5, 0)", "()", "'x'", "(5, 8, 1)"]),
            )
            npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + npy[128:]
        elif kind == 7:
            text = rng.choice([b"", b"null", b"[]", b"7", b'"x"', b"[" * 5000, b'{"images": {}}', b"\xff\xfe\x00"])
        else:
            npy = flip(npy, 1)
            text = json.dumps(forge(json.loads(text))).encode()
        return npy, text

    for case in range(cases):
        npy, text = mutate()
        (folder / "d.npy").write_bytes(npy)
        (folder / "d.json").write_bytes(text)
        mmap, verify = rng.random() < 0.5, rng.random() < 0.7
        try:
            loaded, m = load_descriptors(folder / "d.npy", mmap=mmap, verify=verify)
            loaded = np.array(loaded)
            if verify and isinstance(m, dict) and "data" in m and npy != data:
                print(f"case {case}: a changed data file was accepted", flush=True)
                sys.exit(1)
            if verify and not np.isfinite(loaded).all():
                print(f"case {case}: non-finite values were accepted", flush=True)
                sys.exit(1)
        except clustermac.CorruptFileError:
            pass
        except BaseException:
            print(f"case {case} (seed {seed}) raised something else than CorruptFileError:", flush=True)
            traceback.print_exc()
            sys.exit(1)
    print(f"{cases} cases, only CorruptFileError", flush=True)
    """
)


def test_fuzz_load_descriptors(tmp_path):
    seed = int(os.environ.get("CLUSTERMAC_FUZZ_SEED", "12"))
    run = subprocess.run(
        [sys.executable, "-c", FUZZ, str(seed), "1500", str(tmp_path / "fuzz"), str(LEGACY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert f"seed {seed}" in run.stdout and "1500 cases, only CorruptFileError" in run.stdout


# --- 6. settings checked before any image is touched --------------------------------------------


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("max_size", 0),
        ("max_size", -5),
        ("max_size", 3.5),
        ("pca_dim", 0),
        ("pca_dim", 100000),
        ("n_clusters", (5, 0)),
        ("n_clusters", (2.5,)),
        ("n_clusters", ()),
        ("rgb_clusters", -1),
        ("rmac_levels", 0),
        ("whitening_dim", 0),
        ("whitening_dim", "6"),
        ("z_ratio", float("nan")),
        ("gem_p", 0.0),
        ("whitening_shrinkage", -1.0),
        ("normalization", "none"),
        ("seed", 1.5),
    ],
)
def test_a_bad_setting_is_refused_by_name(model, keyword, value):
    with pytest.raises(ValueError, match=f"^{keyword}:"):
        clustermac.Extractor(clustermac.Backbone(model, n_threads=1), "clustermac", **{keyword: value})


# --- 7. a non-finite descriptor is never written ------------------------------------------------


def log_model(path):
    """Average pool, log, 1x1 conv: finite features on bright images, NaN on dark ones (the log
    of a negative normalised value)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.abs(np.random.default_rng(0).standard_normal((512, 3, 1, 1))).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Log", ["pooled"], ["logged"]),
        helper.make_node("Conv", ["logged", "weight"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "log",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 512, "h", "w"])],
        initializer=[numpy_helper.from_array(weight, "weight")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"clustermac.preset": "vgg16"})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("method", ["mac", "clustermac"])
def test_a_non_finite_descriptor_is_recorded_as_failed(tmp_path, method):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 48), (230, 230, 230)).save(folder / "bright.png")
    Image.new("RGB", (64, 48), (0, 0, 0)).save(folder / "dark.png")
    ex = clustermac.Extractor(clustermac.Backbone(log_model(tmp_path / "log.onnx"), n_threads=1), method)
    manifest = clustermac.extract_folder(ex, folder, tmp_path / "d.npy", progress=False)
    assert manifest["images"] == ["bright.png"] and list(manifest["failed"]) == ["dark.png"]
    assert "NaN" in manifest["failed"]["dark.png"]
    vectors, _ = clustermac.load_descriptors(tmp_path / "d.npy")
    assert vectors.shape == (1, 512) and np.isfinite(vectors).all()


# --- 3. colliding outputs refused before any work -----------------------------------------------


def test_colliding_outputs_are_refused_before_any_work(tmp_path, model):
    names = write_images(tmp_path / "images", n=2)
    before = (tmp_path / "images" / names[0]).read_bytes()
    ex = extractor(model)
    for out, message in [
        (tmp_path / "x.json", "manifest would be written over the descriptors"),
        (tmp_path / "images" / names[0], "would overwrite the input image"),
        (tmp_path / "images", "is a directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            clustermac.extract_folder(ex, tmp_path / "images", out, progress=False)
        assert not Path(str(out) + ".parts").exists()
    assert (tmp_path / "images" / names[0]).read_bytes() == before
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob(".*.lock"))
