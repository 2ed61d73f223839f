"""What `clustermac index` records for the server (search/index_info.py), and its checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clustermac.cli import main
from clustermac.descriptors import load_descriptors
from clustermac.errors import CorruptFileError
from clustermac.search import FeatureMapStore, FeatureMapStoreWriter, Index
from clustermac.search.index_info import checked_file, extractor_from_info, file_record, record_query_setup

pytestmark = pytest.mark.network  # runs the embedded backbone


def _base(serve_index):
    index, photos = serve_index
    return index.parent, photos


def test_the_recorded_setup_describes_queries_like_the_index(serve_index):
    index, photos = serve_index
    loaded = Index.load(index)
    extractor = extractor_from_info(loaded.info)
    assert extractor.is_whitened and extractor.max_size == 192 and extractor.dim == loaded.dim
    query = extractor.extract(photos / "photo3.jpg")
    row = loaded.names.index("photo3.jpg")
    assert float(query @ loaded.vectors([row])[0]) > 0.999
    store = FeatureMapStore(loaded.info["feature_map_store"]["path"])
    assert store.names == loaded.names and len(store.labels(row)) == 1  # clustermac-box: 20 feature clusters


def test_search_uses_the_recorded_whitening(serve_index, capsys):
    index, photos = serve_index
    assert main(["search", str(photos / "photo3.jpg"), "--index", str(index), "-k", "1"]) == 0
    assert "photo3.jpg" in capsys.readouterr().out


def test_a_changed_or_missing_recorded_file_is_refused(tmp_path, serve_index):
    base, _ = _base(serve_index)
    copy = tmp_path / "w.npz"
    shutil.copy(base / "w.npz", copy)
    record = file_record(copy)
    assert checked_file(record, "whitening") == copy.resolve()
    with open(copy, "ab") as file:
        file.write(b"\0")
    with pytest.raises(CorruptFileError, match="whitening has changed"):
        checked_file(record, "whitening")
    copy.unlink()
    with pytest.raises(CorruptFileError, match="whitening recorded with the index is missing"):
        checked_file(record, "whitening")
    with pytest.raises(CorruptFileError, match="no usable whitening"):
        checked_file({"path": str(copy)}, "whitening")
    with pytest.raises(ValueError, match="no such file"):
        file_record(tmp_path / "nothing.npz")


def test_an_info_without_what_queries_need_is_refused(serve_index):
    info = Index.load(serve_index[0]).info
    with pytest.raises(ValueError, match="no extractor settings"):
        extractor_from_info({"settings": None})
    with pytest.raises(ValueError, match="records no whitening"):
        extractor_from_info({**info, "whitening": None})
    with pytest.raises(ValueError, match="backbone"):
        extractor_from_info({**info, "settings": {**info["settings"], "backbone": "vgg16-0123"}})


def test_index_refuses_a_setup_that_does_not_reproduce_the_descriptors(tmp_path, serve_index, capsys):
    base, photos = _base(serve_index)
    # Descriptors extracted without whitening, indexed with a whitening: the check fails.
    assert main(["extract", str(photos), "--out", str(tmp_path / "raw.npy"), "--max-size", "192", "--quiet"]) == 0
    command = ["index", str(tmp_path / "raw.npy"), "--out", str(tmp_path / "idx"), "--image-root", str(photos)]
    assert main([*command, "--whitening", str(base / "w.npz")]) == 2
    assert "1280-d ones: pass the --whitening" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    # Without whitening it is consistent: indexed, no whitening recorded.
    assert main(command) == 0
    assert Index.load(tmp_path / "idx").info["whitening"] is None


def test_index_store_options_are_checked(tmp_path, serve_index, capsys):
    base, photos = _base(serve_index)
    descriptors = str(base / "d.npy")
    out = ["--out", str(tmp_path / "idx"), "--whitening", str(base / "w.npz")]
    assert main(["index", descriptors, *out, "--store", str(tmp_path / "s.cmfm"), "--write-store"]) == 2
    assert "--write-store needs --image-root" in capsys.readouterr().err
    with FeatureMapStoreWriter(tmp_path / "other.cmfm") as writer:
        writer.add(np.ones((4, 2, 2), np.float32), "somewhere-else.jpg")
    root = ["--image-root", str(photos)]
    assert main(["index", descriptors, *out, *root, "--store", str(tmp_path / "other.cmfm")]) == 2
    assert "not the index's images" in capsys.readouterr().err
    # An existing store of the right images is recorded as it is.
    assert main(["index", descriptors, *out, *root, "--store", str(base / "db.cmfm")]) == 0
    info = json.loads(json.dumps(Index.load(tmp_path / "idx").info))
    assert info["feature_map_store"]["sha256"] == file_record(base / "db.cmfm")["sha256"]


def test_descriptors_that_the_setup_does_not_reproduce_are_refused(serve_index):
    base, photos = _base(serve_index)
    vectors, manifest = load_descriptors(base / "d.npy")
    record = {"whitening": base / "w.npz", "store": None}
    info = record_query_setup(manifest["settings"], manifest["images"], vectors, photos, **record)
    assert info["whitening"]["sha256"] == file_record(base / "w.npz")["sha256"]
    other = np.roll(np.asarray(vectors), 1, axis=0)  # row 0 is now another image's descriptor
    with pytest.raises(ValueError, match="does not reproduce the indexed descriptor"):
        record_query_setup(manifest["settings"], manifest["images"], other, photos, **record)


def test_whitened_descriptors_indexed_without_whitening_are_indexed_as_before(tmp_path, serve_index):
    base, photos = _base(serve_index)
    out = tmp_path / "idx"
    assert main(["index", str(base / "d.npy"), "--out", str(out), "--image-root", str(photos)]) == 0
    info = Index.load(out).info
    assert info["whitening"] is None and info["settings"]["whitened"] is True
    with pytest.raises(ValueError, match="records no whitening"):
        extractor_from_info(info)
