"""Reading the descriptor format (``desc.npy`` + ``desc.json``, version 2, and 0.1.0's files):
the manifest's checks and the checked, optionally memory-mapped read of a rows × dim float32 file.

Used by :mod:`.store` (the single-file output) and :mod:`clustermac.distributed.shards` (the shard
folder), which extends the same format; kept apart so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError
from ..files import read_npy_header

FORMAT_NAME = "clustermac.descriptors"
FORMAT_VERSION = 2
_DTYPE = np.dtype("<f4")
_READ_BLOCK = 1 << 22


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_manifest(
    path: Path, check: Callable[[Path, Any], None] | None = None
) -> tuple[dict[str, Any], tuple[int, int, int] | None]:
    try:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            raw = file.read()
    except OSError as error:
        raise CorruptFileError(path, f"cannot read the manifest ({error.strerror or error})") from error
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptFileError(path, f"the manifest is not UTF-8 text (byte {error.start})") from None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise CorruptFileError(path, f"the manifest is not valid JSON ({error})") from None
    except RecursionError:
        raise CorruptFileError(path, "the manifest is not valid JSON (nested too deeply)") from None
    (check or _check_manifest)(path, manifest)
    return manifest, stamp


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest(path: Path, manifest: Any) -> None:
    check_manifest_lists(path, manifest)
    _check_data_record(path, manifest)


def check_manifest_lists(path: Path, manifest: Any) -> None:
    """Refuse (CorruptFileError naming ``path``) a manifest that is not an object with its
    ``images`` (names), ``failed`` (name -> reason) and ``settings`` of the right types."""
    if not isinstance(manifest, dict):
        raise CorruptFileError(path, f"the manifest is a JSON {type(manifest).__name__}, expected an object")
    for key, kind in (("images", list), ("failed", dict), ("settings", dict)):
        if key not in manifest:
            raise CorruptFileError(path, f"the manifest lacks {key!r}")
        if not isinstance(manifest[key], kind):
            raise CorruptFileError(
                path, f"manifest[{key!r}] is a {type(manifest[key]).__name__}, expected a {kind.__name__}"
            )
    if not all(isinstance(name, str) for name in manifest["images"]):
        raise CorruptFileError(path, "manifest['images'] holds something other than names (strings)")
    if not all(isinstance(reason, str) for reason in manifest["failed"].values()):
        raise CorruptFileError(path, "manifest['failed'] holds something other than reasons (strings)")
    kernels = manifest.get("kernels", [])
    if not isinstance(kernels, list) or not all(isinstance(record, dict) for record in kernels):
        raise CorruptFileError(path, "manifest['kernels'] is not a list of records (JSON objects)")
    if "dim" in manifest["settings"] and not (
        _is_int(manifest["settings"]["dim"]) and manifest["settings"]["dim"] >= 1
    ):
        raise CorruptFileError(path, f"manifest['settings']['dim'] is {manifest['settings']['dim']!r}, not a dimension")


def _check_data_record(path: Path, manifest: dict[str, Any]) -> None:
    if "version" not in manifest and "data" not in manifest:
        return  # clustermac 0.1.0: no version, no checksum
    version = manifest.get("version")
    if not _is_int(version):
        raise CorruptFileError(path, f"the manifest's version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise CorruptFileError(
            path, f"format version {version}, written by a newer clustermac (this one reads up to {FORMAT_VERSION})"
        )
    if version != FORMAT_VERSION or manifest.get("format") != FORMAT_NAME:
        raise CorruptFileError(path, f"not a {FORMAT_NAME} manifest of version {FORMAT_VERSION}")
    data = manifest.get("data")
    if not isinstance(data, dict):
        raise CorruptFileError(path, "the manifest lacks its 'data' record (rows, dim, bytes, sha256)")
    for key in ("rows", "dim", "bytes"):
        if not _is_int(data.get(key)) or data[key] < 0:
            raise CorruptFileError(path, f"manifest['data'][{key!r}] is {data.get(key)!r}, expected a count")
    sha = data.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise CorruptFileError(path, "manifest['data']['sha256'] is not a SHA-256 in hex")
    if data.get("dtype") != _DTYPE.str:
        raise CorruptFileError(path, f"manifest['data']['dtype'] is {data.get('dtype')!r}, expected {_DTYPE.str!r}")
    if data["rows"] != len(manifest["images"]):
        raise CorruptFileError(
            path, f"the manifest says {data['rows']} rows but lists {len(manifest['images'])} images"
        )
    if manifest["settings"].get("dim", data["dim"]) != data["dim"]:
        raise CorruptFileError(
            path, f"the manifest says dim {data['dim']} but its settings say {manifest['settings']['dim']}"
        )


def read_rows_file(
    path: Path, rows: int, dim: int, size: int, sha256: str, mmap: bool = True, verify: bool = True
) -> np.ndarray:
    """A ``rows`` × ``dim`` float32 ``.npy`` file of ``size`` bytes with that SHA-256 (checked with
    ``verify``, with finite values), memory-mapped with ``mmap``; CorruptFileError naming ``path``."""
    record = {"images": range(rows), "data": {"dim": dim, "bytes": size, "sha256": sha256}}
    return _read_data(path, record, mmap, verify)


def _read_data(out: Path, manifest: dict[str, Any], mmap: bool, verify: bool) -> np.ndarray:
    images = manifest["images"]
    data = manifest.get("data")
    try:
        file = open(out, "rb")
    except OSError as error:
        raise CorruptFileError(out, f"cannot read the descriptor file ({error.strerror or error})") from error
    with file:
        size = os.fstat(file.fileno()).st_size
        shape, offset = _read_header(out, file, size)
        rows, dim = shape
        if rows != len(images):
            raise CorruptFileError(out, f"{rows} rows but the manifest lists {len(images)} images")
        expected_dim = data["dim"] if data is not None else manifest["settings"].get("dim", dim)
        if dim != expected_dim:
            raise CorruptFileError(out, f"descriptors of dimension {dim} but the manifest says {expected_dim}")
        expected_size = offset + rows * dim * _DTYPE.itemsize
        if size != expected_size:
            what = "truncated" if size < expected_size else f"{size - expected_size} bytes too long"
            raise CorruptFileError(
                out, f"{size} bytes where a {rows}×{dim} float32 array needs {expected_size}: {what}"
            )
        if data is not None and size != data["bytes"]:
            raise CorruptFileError(
                out,
                f"{size} bytes but the manifest says {data['bytes']}: the file was truncated, "
                "changed, or comes from another run than its manifest",
            )
        if verify:
            _verify(out, file, offset, dim, data["sha256"] if data is not None else None)
        if rows == 0:
            return np.zeros((0, dim), dtype=np.float32)
        if mmap:
            return np.memmap(file, dtype=_DTYPE, mode="r", offset=offset, shape=(rows, dim))
        file.seek(offset)
        buffer = bytearray(rows * dim * _DTYPE.itemsize)
        if file.readinto(buffer) != len(buffer):
            raise CorruptFileError(out, "the file shrank while it was read")
        return np.frombuffer(buffer, dtype=_DTYPE).reshape(rows, dim)


def _read_header(out: Path, file: Any, size: int) -> tuple[tuple[int, int], int]:
    """The shape and data offset of a .npy file, refusing anything but 2-D little-endian float32 in C order."""
    if size == 0:
        raise CorruptFileError(out, "empty file (0 bytes)")
    shape, fortran, dtype, offset = read_npy_header(file, out)
    if dtype != _DTYPE:
        raise CorruptFileError(out, f"values of type {dtype}, expected little-endian float32")
    if fortran:
        raise CorruptFileError(out, "a Fortran-ordered array, expected C order")
    if len(shape) != 2 or shape[1] < 1:
        raise CorruptFileError(out, f"an array of shape {shape}, expected rows × dim (dim >= 1)")
    return (shape[0], shape[1]), offset


def _verify(out: Path, file: Any, offset: int, dim: int, sha256: str | None) -> None:
    """One read of the whole file: its SHA-256 (when the manifest has one) and finite values."""
    digest = hashlib.sha256()
    file.seek(0)
    position = 0
    carry = b""
    row_bytes = dim * _DTYPE.itemsize
    row = 0
    while True:
        block = file.read(_READ_BLOCK)
        if not block:
            break
        digest.update(block)
        start = max(offset - position, 0)
        position += len(block)
        if start >= len(block):
            continue
        payload = carry + block[start:]
        whole = len(payload) - len(payload) % row_bytes
        values = np.frombuffer(payload, dtype=_DTYPE, count=whole // _DTYPE.itemsize).reshape(-1, dim)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise CorruptFileError(out, f"row {row + int(np.argmax(bad))} holds NaN or infinite values")
        row += values.shape[0]
        carry = payload[whole:]
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CorruptFileError(
            out,
            "its SHA-256 does not match the manifest's: the data was changed, or the pair is mixed "
            "(a run was interrupted between the data file and its manifest: run it again)",
        )
