"""Index folder, format 2: published through a pointer file, checksummed, validated at load.

Each test reproduces a failure of 0.1.0 (issue 12): a kill during a save (real SIGKILL through
the named crash points, in a subprocess), a second writer, damaged or forged files, NaN vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clustermac as cm
from clustermac import CorruptFileError, Index, OutputLockedError

DATA = Path(__file__).resolve().parents[1] / "data" / "v0.1.0"
TIMEOUT = 120


def small_index(n: int = 5, dim: int = 4, seed: int = 0, backend: str = "exact", **kwargs) -> Index:
    rng = np.random.default_rng(seed)
    index = Index(dim, backend, **kwargs)
    index.add(cm.l2_normalize(rng.standard_normal((n, dim)).astype(np.float32)), [f"img{i}" for i in range(n)])
    return index


def version_folder(path: Path) -> Path:
    return path / (path / "CURRENT").read_text().strip()


def test_save_publishes_one_version_folder_with_sizes_and_checksums(tmp_path):
    index = small_index()
    path = tmp_path / "idx"
    index.save(path, info={"settings": {"method": "rmac"}, "image_root": None})
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "CURRENT",
        version_folder(path).name,
    ]
    folder = version_folder(path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "clustermac.json",
        "meta.json",
        "names.offsets.npy",
        "names.utf8",
        "vectors.npy",
    ]
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["dim"], meta["count"], meta["backend"]) == (
        "clustermac-index",
        3,
        4,
        5,
        "exact",
    )
    for name in ("names.utf8", "names.offsets.npy", "vectors.npy", "clustermac.json"):
        data = (folder / name).read_bytes()
        assert meta["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = Index.load(path)
    assert loaded.info == {"settings": {"method": "rmac"}, "image_root": None}
    assert loaded.names == index.names
    np.testing.assert_array_equal(loaded.vectors(range(5)), index.vectors(range(5)))
    assert small_index().info == {}
    index.save(tmp_path / "no_info")
    assert Index.load(tmp_path / "no_info").info == {}
    # Nothing but the lock file beside the index.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", ".no_info.lock", "idx", "no_info"]


@pytest.mark.parametrize("step", ["index_save_data", "index_save_meta", "publish_folder"])
def test_kill_during_save_leaves_the_previous_index_and_the_next_save_cleans_up(tmp_path, step, run_python):
    path = tmp_path / "idx"
    small_index(n=5, seed=1).save(path, info={"round": 1})
    before = Index.load(path)
    code = f"""
        import numpy as np, clustermac as cm
        index = cm.Index(4)
        index.add(np.ones((300, 4), np.float32), [f"new{{i}}" for i in range(300)])
        index.save({str(path)!r}, info={{"round": 2}})
    """
    result = run_python(code, {"CLUSTERMAC_CRASH_AT": f"{step}:1"})
    assert result.returncode == -9, result.stderr  # killed by SIGKILL at the crash point
    leftovers = [p.name for p in path.iterdir() if p.name not in ("CURRENT", version_folder(path).name)]
    assert leftovers  # the killed save left its staging (or unpublished) folder behind
    after = Index.load(path)
    assert after.names == before.names and after.info == {"round": 1}
    np.testing.assert_array_equal(after.vectors(range(5)), before.vectors(range(5)))
    # The next save cleans what the killed one left.
    small_index(n=7, seed=2).save(path, info={"round": 3})
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", version_folder(path).name]
    assert len(Index.load(path)) == 7 and Index.load(path).info == {"round": 3}


def test_a_second_writer_gets_output_locked_error(tmp_path):
    path = tmp_path / "idx"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from clustermac.files import output_lock\n"
            f"with output_lock({str(path)!r}, 'clustermac index'):\n"
            "    print('locked', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError) as error:
            small_index().save(path)
        assert error.value.holder["pid"] == holder.pid
        assert not path.exists()
    finally:
        holder.communicate("\n", timeout=TIMEOUT)
    small_index().save(path)  # the lock went with its holder
    assert len(Index.load(path)) == 5


def test_0_1_0_layout_loads_with_its_info_and_is_replaced_by_a_save(tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(DATA / "exact.index", legacy)
    assert Index.load(legacy).info == {}
    (legacy / "clustermac.json").write_text(json.dumps({"settings": {"method": "rmac"}, "image_root": "/x"}))
    loaded = Index.load(legacy)
    assert loaded.info["image_root"] == "/x" and len(loaded) == 4
    # A killed 0.1.0 save left a temporary folder beside the index: the next save removes it.
    (tmp_path / ".legacy.tmp-abc123").mkdir()
    (tmp_path / ".legacy.tmp-abc123" / "vectors.npy").write_bytes(b"\0" * 1000)
    loaded.save(legacy, info=loaded.info)
    assert sorted(p.name for p in legacy.iterdir()) == ["CURRENT", version_folder(legacy).name]
    assert not (tmp_path / ".legacy.tmp-abc123").exists()
    again = Index.load(legacy)
    assert again.info == loaded.info and again.names == loaded.names


def test_save_refuses_a_folder_that_is_not_an_index(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a clustermac index"):
        small_index().save(other)
    assert [p.name for p in other.iterdir()] == ["a.jpg"]
    with pytest.raises(ValueError, match="info"):
        small_index().save(tmp_path / "i", info={"x": object()})


def damaged_copy(tmp_path: Path, source: Path, name: str, change) -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder)
    change(folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is KeyError:
            data.pop(key)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def test_damaged_exact_index_files_are_corrupt_file_errors_naming_the_file(tmp_path):
    good = tmp_path / "good"
    small_index(n=6).save(good)
    v = version_folder(good).name

    def vectors_with_nan(f):  # consistent checksums, NaN inside: the finiteness check sees it
        file = f / v / "vectors.npy"
        array = np.load(file)
        array[3, 1] = np.nan
        np.save(file, array)
        data = file.read_bytes()
        edit_json(
            f / v / "meta.json",
            files={
                **json.loads((f / v / "meta.json").read_text())["files"],
                "vectors.npy": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
            },
        )

    cases = [
        (lambda f: edit_json(f / v / "meta.json", count=KeyError), "meta.json", "'count'"),
        (lambda f: edit_json(f / v / "meta.json", count=10**15), "meta.json", "beyond any real index"),
        (lambda f: edit_json(f / v / "meta.json", count=7), "names.offsets.npy", "expected 8 little-endian uint64"),
        (lambda f: edit_json(f / v / "meta.json", dim="4"), "meta.json", "'dim'"),
        (lambda f: edit_json(f / v / "meta.json", files=KeyError), "meta.json", "SHA-256"),
        (lambda f: (f / v / "names.utf8").write_text('{"a": 1}'), "names.utf8", "bytes; meta.json records"),
        (lambda f: (f / v / "meta.json").write_bytes(b"\xff\xfe"), "meta.json", "not readable JSON"),
        (lambda f: (f / "CURRENT").write_text("../../etc"), "CURRENT", "not a version folder"),
        (lambda f: (f / "CURRENT").write_text("v-gone"), "CURRENT", "missing"),
        (lambda f: os.truncate(f / v / "vectors.npy", 100), "vectors.npy", "bytes"),
        (vectors_with_nan, "vectors.npy", "vector 3 holds NaN"),
    ]
    for i, (change, file, problem) in enumerate(cases):
        folder = damaged_copy(tmp_path, good, f"bad{i}", change)
        with pytest.raises(CorruptFileError, match=problem) as error:
            Index.load(folder)
        assert error.value.path.name == file, (i, error.value)
    assert len(Index.load(good)) == 6


def test_damaged_0_1_0_index_files(tmp_path):
    """The 0.1.0 layout has no checksums: the header, sizes, names and values are still checked."""

    def names_not_strings(f):
        (f / "names.json").write_text(json.dumps([1, 2, 3, 4]))

    def forged_shape(f):
        data = bytearray((f / "vectors.npy").read_bytes())
        header = data[:128].replace(b"(4, 6)", b"(9, 6)")
        (f / "vectors.npy").write_bytes(bytes(header) + bytes(data[128:]))

    cases = [
        (lambda f: edit_json(f / "meta.json", count=KeyError), "meta.json", "'count'"),
        (names_not_strings, "names.json", "entry 0 is int"),
        (lambda f: (f / "names.json").write_bytes(b'["a", "\xff"]'), "names.json", "not readable JSON"),
        (lambda f: os.truncate(f / "vectors.npy", 150), "vectors.npy", "truncated"),
        (lambda f: os.truncate(f / "vectors.npy", 0), "vectors.npy", "not a readable .npy"),
        (forged_shape, "vectors.npy", "shape"),
        (lambda f: np.save(f / "vectors.npy", np.full((4, 6), np.inf, np.float32)), "vectors.npy", "NaN or Inf"),
    ]
    for i, (change, file, problem) in enumerate(cases):
        folder = damaged_copy(tmp_path, DATA / "exact.index", f"bad{i}", change)
        with pytest.raises(CorruptFileError, match=problem) as error:
            Index.load(folder)
        assert error.value.path.name == file, (i, error.value)


def test_forged_faiss_files_are_refused_before_faiss_reads_them(tmp_path):
    pytest.importorskip("faiss")
    good = tmp_path / "good"
    small_index(n=40, dim=8, backend="faiss", faiss_factory="SQ8").save(good)
    v = version_folder(good).name
    assert Index.load(good).backend == "faiss"

    def forge_codes_length(file: Path) -> None:
        # The codes vector's length field (8 bytes before the last count*code_size bytes):
        # a forged 2**40 would make FAISS allocate a terabyte.
        data = bytearray(file.read_bytes())
        position = len(data) - 40 * 8 - 8
        data[position : position + 8] = (1 << 40).to_bytes(8, "little")
        file.write_bytes(bytes(data))

    def forge_and_fix_checksum(f: Path) -> None:
        file = f / v / "faiss.index"
        forge_codes_length(file)
        data = file.read_bytes()
        edit_json(
            f / v / "meta.json",
            files={
                **json.loads((f / v / "meta.json").read_text())["files"],
                "faiss.index": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
            },
        )

    cases = [
        (lambda f: forge_codes_length(f / v / "faiss.index"), "SHA-256"),
        (lambda f: os.truncate(f / v / "faiss.index", 50), "bytes; meta.json records"),
        (forge_and_fix_checksum, "claims|holds"),  # the structure check, behind the checksum
    ]
    for i, (change, problem) in enumerate(cases):
        folder = damaged_copy(tmp_path, good, f"bad{i}", change)
        with pytest.raises(CorruptFileError, match=problem) as error:
            Index.load(folder)
        assert error.value.path.name == "faiss.index"
    # 0.1.0 FAISS files carry no checksum: the structure check alone refuses a forged length.
    legacy = damaged_copy(tmp_path, DATA / "faiss.index", "legacy", lambda f: None)
    assert len(Index.load(legacy)) == 4
    data = bytearray((legacy / "faiss.index").read_bytes())
    data[37:45] = (1 << 40).to_bytes(8, "little")  # the flat index's vector length
    (legacy / "faiss.index").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="faiss.index: a vector at byte 37"):
        Index.load(legacy)


def test_add_refuses_non_finite_vectors_naming_the_argument_and_row():
    index = Index(3)
    vectors = np.ones((4, 3), np.float32)
    vectors[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"vectors: row 2 contains NaN or Inf"):
        index.add(vectors, list("abcd"))
    with pytest.raises(ValueError, match=r"vectors: row 0 .*overflows float32"):
        index.add(np.full((1, 3), 1e300), ["x"])  # finite float64, inf as float32
    assert len(index) == 0


def test_cli_index_keeps_its_info_in_the_version_folder_and_reports_a_corrupt_index_in_one_line(tmp_path):
    for name in ("desc.npy", "desc.json"):  # descriptors as clustermac 0.1.0 wrote them
        shutil.copy(DATA / name, tmp_path / name)
    settings = json.loads((DATA / "desc.json").read_text())["settings"]
    out = tmp_path / "idx"
    result = subprocess.run(
        [sys.executable, "-m", "clustermac.cli", "index", str(tmp_path / "desc.npy"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert not (out / "clustermac.json").exists()  # inside the version folder, published with it
    assert Index.load(out).info["settings"] == settings
    os.truncate(version_folder(out) / "vectors.npy", 10)
    result = subprocess.run(
        [sys.executable, "-m", "clustermac.cli", "search", str(tmp_path / "q.jpg"), "--index", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "vectors.npy" in result.stderr and result.stderr.startswith("clustermac: error:")


def test_the_index_hidden_by_an_interrupted_0_1_0_save_is_pointed_to(tmp_path):
    # 0.1.0 moved the old index to .NAME.old-* before renaming the new one in; a kill between the
    # two renames left nothing at the path.
    shutil.copytree(DATA / "exact.index", tmp_path / ".idx.old-k2j3")
    with pytest.raises(CorruptFileError, match=r"previous index in .*\.idx\.old-k2j3; rename that folder to idx"):
        Index.load(tmp_path / "idx")
    os.rename(tmp_path / ".idx.old-k2j3", tmp_path / "idx")
    assert len(Index.load(tmp_path / "idx")) == 4
