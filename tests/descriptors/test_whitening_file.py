"""The whitening file (.npz, format version 1): a damaged, forged or wrong file is a
CorruptFileError naming it (0.1.0 raised BadZipFile, EOFError, KeyError, AttributeError,
TypeError, or loaded NaN / an all-zero projection); the save holds the output lock."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from clustermac import CorruptFileError, OutputLockedError
from clustermac.descriptors.whitening import load_whitening_file, save_whitening_file

DATA = Path(__file__).resolve().parents[1] / "data" / "v0.1.0"
SETTINGS = {"method": "gem", "feature_dim": 8}
TIMEOUT = 120


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "mean": rng.standard_normal(8).astype(np.float32),
        "projection": rng.standard_normal((3, 8)).astype(np.float32),
    }


def npz(path: Path, contents: dict, meta: object = None) -> Path:
    if meta is not None:
        contents = {**contents, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    path.write_bytes(buffer.getvalue())
    return path


def test_round_trip_and_the_0_1_0_files(tmp_path):
    save_whitening_file(tmp_path / "w.npz", arrays(), SETTINGS)
    loaded = load_whitening_file(tmp_path / "w.npz", SETTINGS)
    for key, value in arrays().items():
        np.testing.assert_array_equal(loaded[key], value)
    assert loaded["mean"].flags.writeable
    for file in sorted(DATA.glob("whitening_*.npz")):
        with np.load(file) as data:
            settings = json.loads(bytes(data["meta"]))["settings"]
            expected = {k: data[k] for k in ("mean", "projection")}
        loaded = load_whitening_file(file, settings)
        for key, value in expected.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_damaged_and_wrong_files_are_corrupt_file_errors(tmp_path):
    good = tmp_path / "good.npz"
    save_whitening_file(good, arrays(), SETTINGS)
    data = good.read_bytes()
    meta = {"format_version": 1, "settings": SETTINGS}
    zero = arrays()
    zero["projection"][:] = 0
    nan = arrays()
    nan["mean"][2] = np.nan
    flipped = bytearray(data)
    flipped[200] ^= 0xFF  # inside the first member's data: a CRC error
    cases = {
        "empty": (b"", "not a clustermac whitening file"),
        "truncated": (data[: len(data) // 2], "not a clustermac whitening file"),
        "text": (b"hello, I am not a zip file\n" * 10, "not a clustermac whitening file"),
        "flipped": (bytes(flipped), "not a clustermac whitening file|member"),
        "no_mean": (npz(tmp_path / "x1.npz", {"projection": arrays()["projection"]}, meta), "lacks the array 'mean'"),
        "no_meta": (npz(tmp_path / "x2.npz", arrays()), "no 'meta'"),
        "meta_list": (npz(tmp_path / "x3.npz", arrays(), [1, 2]), "not a JSON object"),
        "settings_list": (npz(tmp_path / "x4.npz", arrays(), {"format_version": 1, "settings": [1]}), "JSON object"),
        "future": (npz(tmp_path / "x5.npz", arrays(), {"format_version": 7, "settings": {}}), "format version 7"),
        "float64": (
            npz(tmp_path / "x6.npz", {k: v.astype(np.float64) for k, v in arrays().items()}, meta),
            "float64",
        ),
        "shapes": (
            npz(tmp_path / "x7.npz", {"mean": arrays()["mean"][:5], "projection": arrays()["projection"]}, meta),
            r"shape \(3, 8\) for a 'mean' of length 5",
        ),
        "nan": (npz(tmp_path / "x8.npz", nan, meta), "'mean' holds NaN"),
        "zero": (npz(tmp_path / "x9.npz", zero, meta), "all zeros"),
        "half_pca": (npz(tmp_path / "x10.npz", {**arrays(), "pca_mean": np.ones(4, np.float32)}, meta), "pca_basis"),
    }
    for name, (content, problem) in cases.items():
        file = tmp_path / f"{name}.npz"
        if isinstance(content, Path):
            shutil.move(content, file)
        else:
            file.write_bytes(content)
        with pytest.raises(CorruptFileError, match=problem) as error:
            load_whitening_file(file, SETTINGS)
        assert error.value.path == file, name
    # Learned for other settings: a ValueError that is not a damaged file.
    with pytest.raises(ValueError, match="other settings") as error:
        load_whitening_file(good, {**SETTINGS, "method": "rmac"})
    assert not isinstance(error.value, CorruptFileError)


def test_a_forged_member_shape_is_refused_before_numpy_allocates_it(tmp_path):
    file = tmp_path / "forged.npz"
    save_whitening_file(file, arrays(), SETTINGS)
    with zipfile.ZipFile(file) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    members["mean.npy"] = members["mean.npy"].replace(b"(8,)", b"(99999999999,)")
    with zipfile.ZipFile(file, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(CorruptFileError, match="member 'mean.npy' has"):
        load_whitening_file(file, SETTINGS)


def test_save_refuses_what_the_loader_would_refuse_and_holds_the_output_lock(tmp_path):
    bad = arrays()
    bad["projection"][0, 0] = np.inf
    with pytest.raises(ValueError, match="'projection' holds NaN or Inf"):
        save_whitening_file(tmp_path / "w.npz", bad, SETTINGS)
    assert not (tmp_path / "w.npz").exists()
    path = tmp_path / "w.npz"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from clustermac.files import output_lock\n"
            f"with output_lock({str(path)!r}, 'clustermac fit-whitening'):\n"
            "    print('locked', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError):
            save_whitening_file(path, arrays(), SETTINGS)
    finally:
        holder.communicate("\n", timeout=TIMEOUT)
    save_whitening_file(path, arrays(), SETTINGS)
    assert load_whitening_file(path, SETTINGS)["projection"].shape == (3, 8)


def test_cli_reports_a_damaged_whitening_file_in_one_line(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    (tmp_path / "img").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clustermac.cli",
            "extract",
            str(tmp_path / "img"),
            "--out",
            str(tmp_path / "d.npy"),
            "--whitening",
            str(tmp_path / "w.npz"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "w.npz" in result.stderr
