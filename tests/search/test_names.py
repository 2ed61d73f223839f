"""Compact index names (names.utf8 + names.offsets.npy): round trips, edge cases, damaged files, and
indexes whose names are a JSON list (formats 1 and 2) still loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clustermac import CorruptFileError, Index
from clustermac.search.names import BLOB_FILE, OFFSETS_FILE, NameList, read_names

ODD_NAMES = ["a.jpg", "", "ünïcödé/写真.jpg", "emoji 📷.png", "new\nline", "", "z" * 300]


def test_round_trip_with_non_ascii_empty_and_no_names(tmp_path):
    for i, names in enumerate([ODD_NAMES, [], [""], ["only"]]):
        folder = tmp_path / str(i)
        folder.mkdir()
        written = NameList(names)
        assert len(written) == len(names) and list(written) == names and written == names
        blob, offsets = written.write(folder)
        back = read_names(blob, offsets, len(names))
        assert back == written and list(back) == names
        if names:
            assert back[-1] == names[-1] and back[1:3] == names[1:3]
        np.testing.assert_array_equal(np.load(offsets), np.cumsum([0] + [len(n.encode()) for n in names]))


def test_extend_kept_and_bad_names():
    names = NameList(ODD_NAMES[:3])
    names.extend(ODD_NAMES[3:])
    assert names == ODD_NAMES
    keep = np.array([i % 2 == 0 for i in range(len(ODD_NAMES))])
    assert names.kept(keep) == [n for n, k in zip(ODD_NAMES, keep) if k]
    assert names.kept(np.zeros(len(ODD_NAMES), bool)) == []
    with pytest.raises(IndexError):
        names[len(ODD_NAMES)]
    with pytest.raises(ValueError, match="expected strings, got int"):
        NameList(["a", 3])
    with pytest.raises(ValueError, match="cannot be written as UTF-8"):
        NameList(["bad \udc80 surrogate"])
    assert names != ODD_NAMES[:-1] and names != "abc"


def test_damaged_names_files_are_errors_naming_the_file(tmp_path):
    blob, offsets = NameList(["ab", "é", "cd"]).write(tmp_path)
    cases = [
        (lambda: np.save(offsets, np.array([0, 2, 3, 5], "<u8")), OFFSETS_FILE, "end at 6"),
        (lambda: np.save(offsets, np.array([0, 3, 2, 6], "<u8")), OFFSETS_FILE, "never decrease"),
        (lambda: np.save(offsets, np.array([0, 2, 3, 6], "<i8")), OFFSETS_FILE, "uint64"),
        (lambda: np.save(offsets, np.array([0, 2, 6], "<u8")), OFFSETS_FILE, "expected 4"),
        (lambda: np.save(offsets, np.array([0, 3, 4, 6], "<u8")), OFFSETS_FILE, "splits a UTF-8 character"),
        (lambda: blob.write_bytes(b"ab\xff\xfecd"), BLOB_FILE, "not valid UTF-8"),
        (lambda: offsets.write_bytes(offsets.read_bytes()[:-3]), OFFSETS_FILE, "bytes"),
    ]
    good_blob, good_offsets = blob.read_bytes(), offsets.read_bytes()
    for change, name, problem in cases:
        blob.write_bytes(good_blob)
        offsets.write_bytes(good_offsets)
        change()
        with pytest.raises(CorruptFileError, match=problem) as error:
            read_names(blob, offsets, 3)
        assert error.value.path.name == name


def test_index_folders_with_json_names_still_load(tmp_path):
    """A format-2 index (names.json), made from today's save by rewriting its names and meta.json."""
    import hashlib

    index = Index(3)
    index.add(np.eye(3, dtype=np.float32), ODD_NAMES[:3])
    index.save(tmp_path / "idx")
    version = tmp_path / "idx" / (tmp_path / "idx" / "CURRENT").read_text().strip()
    assert (version / BLOB_FILE).is_file() and not (version / "names.json").exists()
    data = json.dumps(ODD_NAMES[:3], ensure_ascii=False).encode()
    (version / "names.json").write_bytes(data)
    meta = json.loads((version / "meta.json").read_text())
    for compact in (BLOB_FILE, OFFSETS_FILE):
        del meta["files"][compact]
        (version / compact).unlink()
    meta["files"]["names.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (version / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    loaded = Index.load(tmp_path / "idx")
    assert loaded.names == ODD_NAMES[:3]
    # Saving again writes format 3.
    loaded.save(tmp_path / "idx")
    again = tmp_path / "idx" / (tmp_path / "idx" / "CURRENT").read_text().strip()
    assert json.loads((again / "meta.json").read_text())["version"] == 3
    assert Index.load(tmp_path / "idx").names == ODD_NAMES[:3]
