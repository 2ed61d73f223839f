"""`clustermac info PATH`: what each kind of file holds and which code computed it, on real files
written by the commands themselves; malformed and unknown paths are named. Also `search
--no-verify`, which skips the index's checksum read (the same files serve)."""

import json
import shutil

import numpy as np
import pytest

import clustermac
from clustermac.cli import main
from clustermac.file_info import describe_file, format_description


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_photos, pooling_model):
    """A descriptor file, a whitening file, an index and a feature-map store of five photos."""
    root = tmp_path_factory.mktemp("info")
    write_photos(root / "photos", n=5, size=96)
    onnx, _, _ = pooling_model(root / "backbone.onnx", 512, 16, preset="vgg16")
    common = ["--backbone", "vgg16", "--onnx", str(onnx), "--method", "rmac", "--max-size", "96"]
    assert main(["fit-whitening", str(root / "photos"), "--out", str(root / "w.npz"), "--quiet", *common]) == 0
    args = ["extract", str(root / "photos"), "--out", str(root / "desc.npy"), "--quiet"]
    assert main([*args, "--whitening", str(root / "w.npz"), *common]) == 0
    args = ["index", str(root / "desc.npy"), "--out", str(root / "index"), "--image-root", str(root / "photos")]
    assert (
        main(
            [
                *args,
                "--whitening",
                str(root / "w.npz"),
                "--onnx",
                str(onnx),
                "--store",
                str(root / "s.cmfm"),
                "--write-store",
            ]
        )
        == 0
    )
    return root


def test_descriptor_file_and_its_manifest(files, capsys):
    description = describe_file(files / "desc.npy")
    assert describe_file(files / "desc.json") == {**description, "path": str(files / "desc.json")}
    _, manifest = clustermac.load_descriptors(files / "desc.npy")
    assert description["kind"] == "descriptors" and description["count"] == 5 and description["failed"] == 0
    assert description["dim"] == manifest["settings"]["dim"] and description["settings"] == manifest["settings"]
    assert description["kernels"] == [clustermac.kernel_record()] and description["same_kernels_here"] is True
    assert main(["info", str(files / "desc.npy")]) == 0
    text = capsys.readouterr().out
    assert "5 images of dimension" in text and "method=rmac" in text and "this machine runs the same code" in text
    assert "add --verify" in text
    assert main(["info", str(files / "desc.npy"), "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out) == {**description, "verified": True}


def test_index_whitening_and_store(files, capsys):
    index = describe_file(files / "index")
    assert index["kind"] == "index" and index["count"] == 5 and index["backend"] == "exact"
    assert index["kernels"] == [clustermac.kernel_record()] and index["image_root"] == str((files / "photos").resolve())
    assert index["whitening"]["path"] == str((files / "w.npz").resolve())
    whitening = describe_file(files / "w.npz")
    assert whitening["kind"] == "whitening" and whitening["settings"]["method"] == "rmac"
    assert whitening["kernels"] == [clustermac.kernel_record()] and whitening["input_dim"] == 512
    assert whitening["dim"] == index["dim"] < 512  # learned on 5 photos: reduced
    store = describe_file(files / "s.cmfm")
    assert store["kind"] == "feature-map store" and store["count"] == 5 and store["dim"] == 512
    assert store["kernels"] == [{}] and store["same_kernels_here"] is None
    for path in ("index", "w.npz", "s.cmfm"):
        assert main(["info", str(files / path)]) == 0
    text = capsys.readouterr().out
    assert "backend exact" in text and "whitening:" in text and f"512 dimensions -> {index['dim']}" in text
    assert "maps (H×W×D:" in text and "this machine: clustermac" in text


def test_other_code_is_said(files, tmp_path):
    manifest = json.loads((files / "desc.json").read_text())
    other = {**clustermac.kernel_record(), "onnxruntime": "0.0.1"}
    copy = tmp_path / "desc.npy"
    copy.write_bytes((files / "desc.npy").read_bytes())
    (tmp_path / "desc.json").write_text(json.dumps({**manifest, "kernels": [other]}))
    description = describe_file(copy)
    assert description["same_kernels_here"] is False
    assert "this machine runs other code" in format_description(description)
    (tmp_path / "desc.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "kernels"}))
    description = describe_file(copy)
    assert description["kernels"] == [{}] and "not recorded" in format_description(description)


def test_unknown_missing_and_malformed_paths_are_named(files, tmp_path, capsys):
    with pytest.raises(ValueError, match="no such file or folder"):
        describe_file(tmp_path / "missing.npy")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: not a file clustermac writes"):
        describe_file(tmp_path / "notes.txt")
    np.save(tmp_path / "bare.npy", np.zeros((2, 3), np.float32))  # no manifest beside it
    assert main(["info", str(tmp_path / "bare.npy")]) != 0
    assert "bare.npy" in capsys.readouterr().err
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(clustermac.CorruptFileError) as caught:
        describe_file(tmp_path / "w.npz")
    assert caught.value.path == tmp_path / "w.npz"


def test_search_no_verify_skips_only_the_checksum_read(files, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(files / "index", index)
    vectors = index / (index / "CURRENT").read_text().strip() / "vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 1  # one bit of the last vector: same size, same header, another SHA-256
    vectors.write_bytes(bytes(data))
    query = sorted((files / "photos").iterdir())[0]
    args = ["search", str(query), "--index", str(index), "-k", "2", "--whitening", str(files / "w.npz")]
    args += ["--backbone", "vgg16", "--onnx", str(files / "backbone.onnx"), "--max-size", "96"]
    assert main(args) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert main([*args, "--no-verify"]) == 0
    ranked = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["1"]]
    assert ranked and ranked[0][2] == query.name
    vectors.write_bytes(bytes(data[:-4]))  # a truncated file is still refused without the read
    assert main([*args, "--no-verify"]) == 2
    assert "vectors.npy" in capsys.readouterr().err


def test_a_faiss_index(files, tmp_path):
    pytest.importorskip("faiss", reason="FAISS is not installed (pip install 'clustermac[faiss]')")
    out = tmp_path / "faiss-index"
    assert main(["index", str(files / "desc.npy"), "--out", str(out), "--backend", "faiss", "--factory", "Flat"]) == 0
    description = describe_file(out)
    assert description["backend"] == "faiss" and description["count"] == 5
    assert description["faiss"]["factory"] == "Flat" and description["same_kernels_here"] is True
    assert "backend faiss" in format_description(description)
