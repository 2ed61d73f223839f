"""extract_folder / load_descriptors: progress output, leftovers of another run, failed writes and
the errors that name what is wrong (on a tiny ONNX backbone)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.images import list_images


@pytest.fixture
def extractor(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    return clustermac.Extractor(clustermac.Backbone(path, n_threads=1), "mac")


def write_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return [f"img{i}.png" for i in range(n)]


def test_list_images_recurses_and_refuses_a_file(tmp_path):
    names = write_images(tmp_path / "a", 2)
    write_images(tmp_path / "a" / "sub", 1)
    assert list_images(tmp_path / "a") == [*names, "sub/img0.png"]
    with pytest.raises(ValueError, match="not a directory"):
        list_images(tmp_path / "a" / "img0.png")


def test_progress_bar_reports_the_skipped_file(tmp_path, extractor, capsys):
    names = write_images(tmp_path / "images", 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = clustermac.extract_folder(extractor, tmp_path / "images", tmp_path / "d.npy", progress=True)
    assert manifest["images"] == names and list(manifest["failed"]) == ["broken.png"]
    captured = capsys.readouterr()
    assert "skipped broken.png" in captured.out + captured.err and "extract: 100%" in captured.err
    vectors, _ = clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)
    np.testing.assert_allclose(vectors[2], extractor.extract(str(tmp_path / "images" / names[2])), rtol=1e-6)


def test_leftovers_of_another_run_are_discarded(tmp_path, extractor, monkeypatch):
    names = write_images(tmp_path / "images", 3)
    parts = tmp_path / "d.npy.parts"
    parts.mkdir()
    # A finished chunk of a run with other settings: its zero vectors must not be reused.
    (parts / "run.json").write_text(json.dumps({"settings": {"method": "gem"}, "images": names, "chunk_size": 64}))
    np.save(parts / "chunk_000000.npy", np.zeros((3, 512), np.float32))
    (parts / "chunk_000000.json").write_text(json.dumps({"names": names, "failed": {}}))
    clustermac.extract_folder(extractor, tmp_path / "images", tmp_path / "d.npy", progress=False)
    vectors, _ = clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # An unreadable run.json is another run's too.
    parts.mkdir()
    (parts / "run.json").write_text("{ not json")
    clustermac.extract_folder(extractor, tmp_path / "images", tmp_path / "d.npy", progress=False)
    assert not parts.exists()
    np.testing.assert_array_equal(clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)[0], vectors)


def test_failed_write_keeps_the_previous_descriptors(tmp_path, extractor, monkeypatch):
    write_images(tmp_path / "images", 2)
    out = tmp_path / "d.npy"
    clustermac.extract_folder(extractor, tmp_path / "images", out, progress=False)
    before = np.load(out)
    write_images(tmp_path / "images", 3, seed=1)  # new content: the next run rewrites

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", full_disk)  # every rename fails
    with pytest.raises(OSError, match="no space left"):
        clustermac.extract_folder(extractor, tmp_path / "images", out, progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out), before)  # untouched, and no temporary file beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d.")) == ["d.json", "d.npy", "d.npy.parts"]


def test_load_descriptors_names_what_is_missing_or_inconsistent(tmp_path, extractor):
    with pytest.raises(ValueError, match=r"d.npy: expected a descriptor file and its manifest d.json"):
        clustermac.load_descriptors(tmp_path / "d.npy")
    write_images(tmp_path / "images", 2)
    clustermac.extract_folder(extractor, tmp_path / "images", tmp_path / "d.npy", progress=False)
    np.save(tmp_path / "d.npy", np.zeros((3, 512), np.float32))
    with pytest.raises(ValueError, match="3 rows but the manifest lists 2 images"):
        clustermac.load_descriptors(tmp_path / "d.npy")
