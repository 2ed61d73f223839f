"""`clustermac datasets download` and `clustermac datasets list`: the Oxford / Paris benchmarks
(classic and revisited) and the revisitop 1M distractors, fetched, checked and laid out the way
`clustermac evaluate --data-root` reads them.

One dataset, ``ROOT/<name>/``::

    ROOT/oxford5k/jpg/*.jpg  gt/*_{query,good,ok,junk}.txt  gnd_oxford5k.pkl
    ROOT/paris6k/jpg/*.jpg   gt/*.txt                       gnd_paris6k.pkl
    ROOT/roxford5k/jpg/*.jpg gnd_roxford5k.pkl
    ROOT/rparis6k/jpg/*.jpg  gnd_rparis6k.pkl
    ROOT/revisitop1m/revisitop1m.txt  jpg/<path as listed>  downloaded.txt (the listed images present)

Downloads go to ``ROOT/.downloads/NAME.part`` and are resumed from there with an HTTP range
request; a server that ignores the range (200 instead of 206) restarts the file cleanly. Each
file is tried on its official hosts, then on every ``--mirror PREFIX`` (``PREFIX/NAME``), each
with bounded retries and exponential backoff. A complete file is checked (size and SHA-256 where
known), unpacked into a staging folder, checked structurally (a readable archive; the published
image and query counts; every ground-truth name has its image, by loading it with the same code
as `clustermac evaluate`) and only then renamed into place: a corrupt archive raises an error
naming it, its bytes and the staging folder are removed, and the dataset folder already there is
untouched. The 1M distractors are published archive by archive in the same way, so a run can be
stopped and resumed at any point, or limited to the first N archives.

Nothing is downloaded at import.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import gzip
import http.client
import io
import json
import lzma
import os
import pickle
import re
import secrets
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..descriptors.pipeline import progress_bar
from ..errors import CorruptFileError
from ..files import atomic_write_bytes, file_sha256, fsync_directory, output_lock
from ..images import IMAGE_EXTENSIONS
from .dataset_sources import CATALOGUE, DatasetSource, RemoteFile
from .datasets import DatasetNotFoundError, load_classic, load_revisited, read_distractor_list

__all__ = [
    "DEFAULT_ROOT",
    "DownloadError",
    "DownloadResult",
    "dataset_status",
    "download_dataset",
    "fetch_file",
]

#: Where datasets go when ``--root`` is not given.
DEFAULT_ROOT = "clustermac-data"
#: The file that marks a folder made (completely or partly) by `clustermac datasets download`.
MARKER_FILE = ".clustermac-download.json"
#: Base delay in seconds of the exponential backoff between retries (tests set it near 0).
BACKOFF_ENVIRONMENT_VARIABLE = "CLUSTERMAC_DOWNLOAD_BACKOFF"
_MAX_DELAY = 60.0
_CHUNK = 1 << 16
_CHECKSUMS_FORMAT = "clustermac-checksums"
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)


class DownloadError(OSError):
    """No host gave a complete, verified copy of a file; the message names the file and what
    each host did."""


@dataclass
class DownloadResult:
    """What a download did: the dataset folder, whether it is complete, and the verified files
    (name -> ``{"size", "sha256", "url"}``) fetched by this run."""

    folder: Path
    complete: bool
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    message: str = ""


# ----------------------------------------------------------------------------------------------
# One file over HTTP: mirrors, retries, resume
# ----------------------------------------------------------------------------------------------


class _TryAgain(Exception):
    """A failure worth retrying on the same host (connection cut, timeout, HTTP 5xx)."""


class _NextHost(Exception):
    """A failure the same host will repeat (HTTP 4xx): try the next."""


class _WrongBytes(_NextHost):
    """The bytes received are proven wrong (size or checksum): discard them, try the next host."""


class _RangeRefused(_TryAgain):
    """HTTP 416: the partial file does not fit the server's copy; start the file again."""


def candidate_urls(remote: RemoteFile, mirrors: Sequence[str] = (), official: bool = True) -> list[str]:
    """The URLs to try for ``remote``, in order: its official hosts (unless ``official`` is
    False), then ``PREFIX/NAME`` for every mirror prefix."""
    urls = list(remote.urls) if official else []
    urls += [f"{prefix.rstrip('/')}/{remote.name}" for prefix in mirrors]
    if not urls:
        raise ValueError(f"{remote.name}: no host to try; give --mirror URL_PREFIX (or use the official hosts)")
    return urls


def _backoff_base(backoff: float | None) -> float:
    if backoff is not None:
        return backoff
    text = os.environ.get(BACKOFF_ENVIRONMENT_VARIABLE, "1")
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ValueError(f"{BACKOFF_ENVIRONMENT_VARIABLE}={text!r}: expected a number of seconds") from None


def _content_range_start(header: str | None) -> tuple[int, int | None] | None:
    """``(start, total)`` of a ``Content-Range: bytes START-END/TOTAL`` header (total None for ``*``)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if not match:
        return None
    return int(match[1]), None if match[3] == "*" else int(match[3])


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "clustermac-datasets/1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            raise _RangeRefused("HTTP 416: the partial file does not fit the server's copy") from None
        if error.code in (408, 425, 429) or error.code >= 500:
            raise _TryAgain(f"HTTP {error.code} {error.reason}") from None
        raise _NextHost(f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _TryAgain(f"cannot connect ({reason})") from None


def _transfer(url: str, part: Path, expected_size: int | None, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (a range request from its current size); a server
    that ignores the range restarts the file. Returns when ``part`` holds the whole file."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size and offset:
        return
    try:
        response = _open(url, offset, timeout)
    except _RangeRefused:
        part.unlink(missing_ok=True)
        raise
    with response:
        total: int | None
        content_range = _content_range_start(response.headers.get("Content-Range"))
        if response.status == 206 and (not offset or content_range is None or content_range[0] != offset):
            part.unlink(missing_ok=True)
            received_range = response.headers.get("Content-Range")
            raise _TryAgain(f"HTTP 206 with Content-Range {received_range!r} for bytes {offset}-")
        if response.status == 206:
            mode, total = "ab", content_range[1]
        else:  # a whole file: the server ignored the range (or none was asked): start again
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise _WrongBytes(f"the server's copy has {total} bytes; expected {expected_size}")
        bar = progress_bar(total, part.name[: -len(".part")], progress, unit="B")
        bar.update(offset)
        try:
            with open(part, mode) as file:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as error:
                        raise _TryAgain(f"connection lost after {file.tell()} bytes ({type(error).__name__})") from None
                    if not chunk:
                        break
                    file.write(chunk)
                    bar.update(len(chunk))
                file.flush()
                os.fsync(file.fileno())
        finally:
            bar.close()
    received = part.stat().st_size
    if total is not None and received != total:
        raise _TryAgain(f"connection closed after {received} of {total} bytes")


def _verify(part: Path, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Size and SHA-256 of a complete ``part`` (checked against ``expected`` where known)."""
    size = part.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        raise _WrongBytes(f"{size} bytes; expected {expected['size']}")
    sha256 = file_sha256(part)
    if expected.get("sha256") and sha256 != str(expected["sha256"]).lower():
        raise _WrongBytes(f"SHA-256 {sha256} differs from the expected {expected['sha256']}")
    return {"size": size, "sha256": sha256}


def fetch_file(
    remote: RemoteFile,
    folder: PathLike,
    mirrors: Sequence[str] = (),
    *,
    official: bool = True,
    expected: Mapping[str, Any] | None = None,
    retries: int = 3,
    backoff: float | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Download ``remote`` into ``folder / remote.name`` (resuming ``remote.name + ".part"``).

    Args:
        remote: the file and its official URLs.
        folder: where the file goes.
        mirrors: URL prefixes tried after the official hosts (``PREFIX/NAME``).
        official: try the official hosts (False: the mirrors only).
        expected: ``{"size", "sha256"}`` to check against (defaults to the published ones in
            ``remote``; None values are not checked).
        retries: further attempts per host after a transient failure (a cut connection, a
            timeout, HTTP 5xx), each resuming where the last stopped.
        backoff: the first delay in seconds, doubled after each failure (at most 60 s); default
            from ``CLUSTERMAC_DOWNLOAD_BACKOFF`` or 1 s.
        timeout: seconds a connection may stay silent.
        progress: show a progress bar (bytes and rate).

    Returns:
        ``(path, {"size", "sha256", "url"})`` of the verified file. A file already complete in
        ``folder`` is checked and kept (``url`` None).

    Raises:
        DownloadError: no host gave a verified copy; the message says what each host did. The
            ``.part`` file is kept for a later resume unless its bytes were proven wrong.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if retries < 0:
        raise ValueError(f"retries: expected an integer >= 0, received {retries}")
    checks = dict(expected) if expected is not None else {"size": remote.size, "sha256": remote.sha256}
    final, part = folder / remote.name, folder / f"{remote.name}.part"
    if final.is_file():
        try:
            return final, {**_verify(final, checks), "url": None}
        except _WrongBytes:
            final.unlink()  # a stale copy that no longer matches what is expected
    base = _backoff_base(backoff)
    failures = []
    for url in candidate_urls(remote, mirrors, official):
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, checks.get("size"), timeout, progress)
                values = _verify(part, checks)
            except _TryAgain as error:
                failure = f"{url}: {error}"
                if attempt < retries:
                    time.sleep(min(base * 2**attempt, _MAX_DELAY))
                    continue
                failures.append(failure + f" (after {retries + 1} attempts)")
                break
            except _NextHost as error:
                failures.append(f"{url}: {error}")
                if isinstance(error, _WrongBytes):
                    part.unlink(missing_ok=True)  # proven wrong: never resume from these bytes
                break
            os.replace(part, final)
            fsync_directory(folder)
            return final, {**values, "url": url}
    raise DownloadError(
        f"{remote.name}: no host gave a complete, verified copy: " + "; ".join(failures) + ". "
        "Try again later (the partial file is resumed), add a --mirror URL_PREFIX that serves "
        f"PREFIX/{remote.name}, or place the file yourself in {folder}."
    )


# ----------------------------------------------------------------------------------------------
# Unpacking
# ----------------------------------------------------------------------------------------------


class _TrackedReader:
    """A decompressed archive stream that remembers the last block read: tarfile ends its member
    loop silently at a damaged header past the first one, so the caller checks that the block it
    stopped at was the zero block that ends a tar."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        self.last = self.raw.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _decompressed(path: Path) -> Any:
    """The archive's bytes, decompressed by its magic number (gzip, bzip2, xz or a plain tar)."""
    with open(path, "rb") as file:
        magic = file.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, path: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with source, open(destination, "xb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
    except FileExistsError:
        raise CorruptFileError(path, f"two files unpack to {destination.name}; expected unique names") from None


def _safe_relative(name: str, path: Path) -> Path:
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise CorruptFileError(path, f"member {name!r} points outside the folder it unpacks into")
    return Path(*parts)


def unpack_archive(path: PathLike, destination: PathLike, *, flat: bool, suffixes: Sequence[str]) -> list[str]:
    """Extract the regular files of a tar archive whose names end in ``suffixes`` (case
    insensitive) into ``destination``: flat (file names only) or keeping their relative paths.
    Links, devices and other members are skipped. Returns the extracted names (relative paths).

    Raises:
        CorruptFileError: the archive is not a readable tar (truncated, a bad gzip checksum, not
            a tar at all), holds a member reaching outside ``destination``, or two members that
            unpack to the same name.
    """
    path, destination = Path(path), Path(destination)
    names = []
    wanted = tuple(suffix.lower() for suffix in suffixes)
    try:
        with _decompressed(path) as raw:
            reader = _TrackedReader(raw)
            with tarfile.open(fileobj=reader, mode="r:") as archive:
                for member in archive:
                    if not member.isfile() or not member.name.lower().endswith(wanted):
                        continue
                    relative = _safe_relative(member.name, path)
                    if relative.name.startswith("."):
                        continue
                    relative = Path(relative.name) if flat else relative
                    _copy_member(archive, member, destination / relative, path)
                    names.append(relative.as_posix())
                stopped_at = reader.last
            if stopped_at != bytes(tarfile.BLOCKSIZE):
                raise CorruptFileError(path, f"not a readable tar archive (damaged after member {len(names)})")
            while raw.read(1 << 20):  # to the end, so that the compressed stream's checksum is checked
                pass
    except CorruptFileError:
        raise
    except _ARCHIVE_ERRORS as error:
        if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile) and error.errno is not None:
            raise  # a disk error while writing, not a bad archive
        raise CorruptFileError(path, f"not a readable tar archive ({type(error).__name__}: {error})") from None
    return names


def _unpack_into(remote: RemoteFile, path: Path, folder: Path) -> list[str]:
    """Put one downloaded file where the loaders look for it inside a dataset folder."""
    if remote.kind == "images":
        names = unpack_archive(path, folder / "jpg", flat=True, suffixes=IMAGE_EXTENSIONS)
        if not names:
            raise CorruptFileError(path, "holds no images; expected an archive of .jpg files")
    elif remote.kind == "ground_truth":
        names = unpack_archive(path, folder / "gt", flat=True, suffixes=(".txt",))
        if not names:
            raise CorruptFileError(path, "holds no ground-truth .txt files")
    elif remote.kind == "distractors":
        names = unpack_archive(path, folder / "jpg", flat=False, suffixes=IMAGE_EXTENSIONS)
        if not names:
            raise CorruptFileError(path, "holds no images; expected an archive of .jpg files")
    elif remote.kind == "pickle":
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / remote.name, plain_pickle_bytes(path))
        names = [remote.name]
    else:  # a list: the file as it is
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / remote.name)
        names = [remote.name]
    return names


# The only globals a pickle of NumPy arrays and scalars needs (NumPy 1 and 2 module names), and
# ``_codecs.encode`` and ``bytes``, which protocol 2 uses for bytes. Nothing else may be named.
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class _NumpyArraysUnpickler(pickle.Unpickler):
    """Unpickles plain data and numeric NumPy arrays / scalars; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain data and NumPy arrays are read")
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


def _as_plain(value: Any, path: Path) -> Any:
    """``value`` with every numeric NumPy array or scalar turned into lists and Python numbers."""
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in "biuf":
            raise CorruptFileError(path, f"holds a NumPy array of dtype {value.dtype}; expected numbers")
        return value.tolist()
    if isinstance(value, dict):
        return {key: _as_plain(item, path) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_plain(item, path) for item in value]
    return value


def plain_pickle_bytes(path: PathLike) -> bytes:
    """A ground-truth pickle as `clustermac evaluate` reads it: the file's own bytes when it holds
    only plain data; when it holds NumPy arrays or scalars (as files written from NumPy do), the
    same content with lists and Python numbers instead, read with an unpickler that names only
    NumPy's array constructors (any other class or function is refused).

    Raises:
        CorruptFileError: not a pickle, a reference to anything else, or a non-numeric array.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        content = _NumpyArraysUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # any failure to read untrusted bytes means a bad file
        raise CorruptFileError(path, f"not a readable ground-truth pickle ({type(error).__name__}: {error})") from None
    if not _holds_numpy(content):
        return data
    return pickle.dumps(_as_plain(content, path), protocol=4)


def _holds_numpy(value: Any) -> bool:
    if isinstance(value, (np.ndarray, np.generic)):
        return True
    if isinstance(value, dict):
        return any(_holds_numpy(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_numpy(item) for item in value)
    return False


# ----------------------------------------------------------------------------------------------
# Structural checks
# ----------------------------------------------------------------------------------------------


def check_dataset_folder(source: DatasetSource, folder: PathLike) -> int:
    """Load every ground truth in ``folder`` (``gnd_<name>.pkl``, classic ``gt/``) with the loaders
    `clustermac evaluate` uses, so every database and query name must have its image, and
    compare the published counts. Returns the number of database images.

    Raises:
        CorruptFileError: a ground truth names an absent image, cannot be read, or its counts
            differ from the published ones.
    """
    folder = Path(folder)
    image_dir = folder / "jpg"
    loaded = []
    pickle_path = folder / f"gnd_{source.name}.pkl"
    try:
        if pickle_path.is_file():
            loaded.append((pickle_path, load_revisited(pickle_path, image_dir)))
        if (folder / "gt").is_dir():
            loaded.append((folder / "gt", load_classic(folder / "gt", image_dir, source.name)))
    except DatasetNotFoundError as error:
        raise CorruptFileError(folder, f"the downloaded files do not fit together: {error}") from None
    if not loaded:
        raise CorruptFileError(folder, "no ground truth (gnd_*.pkl or gt/*.txt) was unpacked")
    n_images = sum(1 for path in image_dir.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
    if source.database_images is not None and n_images < source.database_images:
        raise CorruptFileError(image_dir, f"{n_images} images; expected at least {source.database_images}")
    for path, dataset in loaded:
        if source.queries is not None and len(dataset.queries) != source.queries:
            raise CorruptFileError(path, f"{len(dataset.queries)} queries; expected {source.queries}")
        # The pickles list the database; the classic files do not (the loader takes every image).
        if path == pickle_path and source.database_images is not None and len(dataset.images) != source.database_images:
            raise CorruptFileError(path, f"{len(dataset.images)} database images; expected {source.database_images}")
    return n_images


# ----------------------------------------------------------------------------------------------
# Markers, checksum files
# ----------------------------------------------------------------------------------------------


def read_marker(folder: PathLike) -> dict[str, Any] | None:
    """The download record of a dataset folder, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_checksums(path: PathLike) -> dict[str, dict[str, Any]]:
    """``name -> {"size", "sha256"}`` from a file written by ``--record-checksums``."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetNotFoundError(f"checksums: {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise CorruptFileError(path, f"not a readable JSON file ({error})") from None
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(content, dict) or content.get("format") != _CHECKSUMS_FORMAT or not isinstance(files, dict):
        raise CorruptFileError(path, f"not a checksum file; expected {{'format': {_CHECKSUMS_FORMAT!r}, 'files': ...}}")
    checked = {}
    for name, values in files.items():
        ok = (
            isinstance(values, dict)
            and isinstance(values.get("size"), int)
            and isinstance(values.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", values["sha256"])
        )
        if not ok:
            raise CorruptFileError(path, f"entry {name!r}: expected {{'size': bytes, 'sha256': 64 hex digits}}")
        checked[name] = {"size": values["size"], "sha256": values["sha256"]}
    return checked


def record_checksums(path: PathLike, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Add the verified ``files`` to the checksum file ``path`` (created if needed), atomically."""
    path = Path(path)
    recorded = read_checksums(path) if path.exists() else {}
    for name, values in files.items():
        recorded[name] = {"size": int(values["size"]), "sha256": str(values["sha256"])}
    _write_json(path, {"format": _CHECKSUMS_FORMAT, "version": 1, "files": recorded})


# ----------------------------------------------------------------------------------------------
# Whole datasets
# ----------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover_interrupted_swap(target: Path) -> None:
    """Undo what a run killed between the two renames of :func:`_replace_folder` left, and remove
    stale staging folders (call under the dataset's lock)."""
    for leftover in target.parent.glob(f".{target.name}.old-*"):
        if not target.exists():
            os.rename(leftover, target)
        else:
            _remove(leftover)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        _remove(leftover)


def _replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` in place of ``target`` (renames; the old folder is removed after)."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(staging, target)
    fsync_directory(target.parent)
    if old is not None:
        _remove(old)


def _borrow_images(source: DatasetSource, root: Path, catalogue: Mapping[str, DatasetSource], staging: Path) -> bool:
    """Hard-link (or copy) the images of a complete sibling dataset with the same image archives
    (oxford5k / roxford5k, paris6k / rparis6k) instead of downloading them again."""
    wanted = {remote.name for remote in source.files if remote.kind == "images"}
    for other in catalogue.values():
        has = {remote.name for remote in other.files if remote.kind == "images"}
        marker = read_marker(root / other.name)
        if other.name == source.name or has != wanted or not wanted or not (marker or {}).get("complete"):
            continue
        (staging / "jpg").mkdir(parents=True)
        for image in sorted((root / other.name / "jpg").iterdir()):
            try:
                os.link(image, staging / "jpg" / image.name)
            except OSError:
                shutil.copy2(image, staging / "jpg" / image.name)
        return True
    return False


def _expected(remote: RemoteFile, checksums: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return dict(checksums.get(remote.name) or {"size": remote.size, "sha256": remote.sha256})


def download_dataset(
    name: str,
    root: PathLike = DEFAULT_ROOT,
    mirrors: Sequence[str] = (),
    *,
    limit: int | None = None,
    record_checksums_to: PathLike | None = None,
    checksums: PathLike | None = None,
    force: bool = False,
    official: bool = True,
    catalogue: Mapping[str, DatasetSource] = CATALOGUE,
    retries: int = 3,
    backoff: float | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadResult:
    """Download, check and lay out one dataset as ``ROOT/<name>/`` (see the module docstring).

    Args:
        name: a catalogue name (``oxford5k``, ``paris6k``, ``roxford5k``, ``rparis6k``,
            ``revisitop1m``).
        root: the data folder (``clustermac evaluate --data-root ROOT --dataset NAME``).
        mirrors: URL prefixes tried after the official hosts, as ``PREFIX/FILE_NAME``.
        limit: revisitop1m only: the first ``limit`` image archives (of 100, about 10,000 images
            each).
        record_checksums_to: add the size and SHA-256 of every file this run verified to this
            JSON file (written atomically).
        checksums: a file written by ``record_checksums_to``: hold this download to its values.
        force: download again and replace a complete dataset, or a folder not made by this
            command.
        official: try the official hosts (False: only ``mirrors``).
        catalogue: the datasets known (tests pass their own).
        retries, backoff, timeout, progress: see :func:`fetch_file`.

    Raises:
        ValueError: an unknown name, or ``limit`` for a dataset that is not split in archives.
        DownloadError: a file could not be fetched from any host.
        CorruptFileError: a file failed its checks (named in the message); its bytes and the
            staging folder are removed and the dataset folder already there is untouched.
        OutputLockedError: another process is downloading the same dataset.
    """
    if name not in catalogue:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(catalogue)}")
    source = catalogue[name]
    if limit is not None and (not source.per_file or limit < 1):
        raise ValueError(
            f"limit: {limit!r} is not allowed here; --limit N (N >= 1) takes the first N archives of a dataset "
            f"published in many archives ({', '.join(n for n, s in catalogue.items() if s.per_file)})"
        )
    for prefix in mirrors:
        if urllib.parse.urlsplit(prefix).scheme not in ("http", "https", "file"):
            raise ValueError(f"mirror: {prefix!r} is not a URL prefix; expected http://, https:// or file://...")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    expected = read_checksums(checksums) if checksums is not None else {}
    options = {
        "mirrors": mirrors,
        "official": official,
        "retries": retries,
        "backoff": backoff,
        "timeout": timeout,
        "progress": progress,
    }
    with output_lock(target, f"clustermac datasets download {name}"):
        _recover_interrupted_swap(target)
        if target.exists() and read_marker(target) is None and not force:
            raise FileExistsError(
                f"{target} exists and was not made by `clustermac datasets download`; move it away, or pass "
                "--force to replace it"
            )
        if source.per_file:
            result = _download_per_file(source, root, limit, expected, force, options)
        else:
            result = _download_whole(source, root, catalogue, expected, force, options)
    if record_checksums_to is not None and result.files:
        record_checksums(record_checksums_to, result.files)
    return result


def _download_whole(
    source: DatasetSource,
    root: Path,
    catalogue: Mapping[str, DatasetSource],
    expected: Mapping[str, Mapping[str, Any]],
    force: bool,
    options: dict[str, Any],
) -> DownloadResult:
    """Every file fetched and unpacked into one staging folder, checked, then renamed into place."""
    target = root / source.name
    marker = read_marker(target)
    if marker is not None and marker.get("complete") and not force:
        return DownloadResult(target, True, message=f"{target} is complete already (--force downloads it again)")
    downloads = root / ".downloads"
    staging = root / f".{source.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    fetched: dict[str, dict[str, Any]] = {}
    paths: list[Path] = []
    try:
        borrowed = _borrow_images(source, root, catalogue, staging)
        for remote in source.files:
            if borrowed and remote.kind == "images":
                continue
            path, values = fetch_file(remote, downloads, expected=_expected(remote, expected), **options)
            fetched[remote.name] = values
            paths.append(path)
            try:
                _unpack_into(remote, path, staging)
            except CorruptFileError:
                path.unlink(missing_ok=True)  # never unpacked again: the next run fetches a new copy
                raise
        try:
            n_images = check_dataset_folder(source, staging)
        except CorruptFileError:
            for path in paths:
                path.unlink(missing_ok=True)
            raise
        marker = {"dataset": source.name, "complete": True, "images": n_images, "files": fetched}
        _write_json(staging / MARKER_FILE, marker)
        fsync_directory(staging)
        _replace_folder(staging, target)
    finally:
        _remove(staging)
    for path in paths:  # unpacked and checked: a sibling dataset borrows the images from the folder
        path.unlink(missing_ok=True)
    return DownloadResult(target, True, fetched, f"{target}: {n_images} images, ground truth checked")


def _download_per_file(
    source: DatasetSource,
    root: Path,
    limit: int | None,
    expected: Mapping[str, Mapping[str, Any]],
    force: bool,
    options: dict[str, Any],
) -> DownloadResult:
    """The list first, then each archive unpacked, checked against the list and published on its own."""
    target = root / source.name
    marker = read_marker(target)
    if force or marker is None:
        marker = {"dataset": source.name, "complete": False, "archives": {}, "files": {}}
        if target.exists():
            _replace_folder(_empty_folder(root, source.name), target)
    target.mkdir(parents=True, exist_ok=True)
    downloads = root / ".downloads"
    list_remote, archives = source.files[0], list(source.files[1:])
    fetched: dict[str, dict[str, Any]] = {}
    list_path = target / list_remote.name
    if not list_path.is_file():
        path, fetched[list_remote.name] = fetch_file(
            list_remote, downloads, expected=_expected(list_remote, expected), **options
        )
        os.replace(path, list_path)
        fsync_directory(target)
        marker["files"][list_remote.name] = fetched[list_remote.name]
        _write_json(target / MARKER_FILE, marker)
    listed = read_distractor_list(list_path)
    known = set(listed) | {os.path.splitext(name)[0] for name in listed}
    wanted = archives[:limit] if limit is not None else archives
    for remote in wanted:
        if remote.name in marker["archives"]:
            continue
        path, values = fetch_file(remote, downloads, expected=_expected(remote, expected), **options)
        staging = root / f".{source.name}.tmp-{secrets.token_hex(4)}"
        try:
            try:
                names = _unpack_into(remote, path, staging)
                unlisted = [n for n in names if n not in known and os.path.splitext(n)[0] not in known]
                if unlisted:
                    raise CorruptFileError(
                        path, f"holds {len(unlisted)} image(s) not in {list_remote.name}, e.g. {unlisted[0]!r}"
                    )
            except CorruptFileError:
                path.unlink(missing_ok=True)
                raise
            for name in names:  # each image to its place; the archive is recorded only after all
                destination = target / "jpg" / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / "jpg" / name, destination)
        finally:
            _remove(staging)
        atomic_write_bytes(target / ".archives" / f"{remote.name}.txt", "".join(f"{n}\n" for n in names).encode())
        marker["archives"][remote.name] = len(names)
        marker["files"][remote.name] = fetched[remote.name] = values
        _write_json(target / MARKER_FILE, marker)
        path.unlink(missing_ok=True)
    present = set()
    for archive_list in sorted((target / ".archives").glob("*.txt")):
        present.update(archive_list.read_text(encoding="utf-8").split())
    present_stems = {os.path.splitext(name)[0] for name in present}
    in_list = [name for name in listed if name in present or name in present_stems]
    atomic_write_bytes(target / "downloaded.txt", "".join(f"{name}\n" for name in in_list).encode("utf-8"))
    complete = len(marker["archives"]) == len(archives) and len(in_list) == len(listed)
    if len(marker["archives"]) == len(archives) and not complete:
        raise CorruptFileError(
            list_path, f"{len(listed) - len(in_list)} listed image(s) are in none of the {len(archives)} archives"
        )
    marker["complete"] = complete
    _write_json(target / MARKER_FILE, marker)
    return DownloadResult(
        target,
        complete,
        fetched,
        f"{target}: {len(in_list)} of {len(listed)} listed images ({len(marker['archives'])} of {len(archives)} "
        f"archives); use --distractors {target / 'downloaded.txt'} --distractors-root {target / 'jpg'}",
    )


def _empty_folder(root: Path, name: str) -> Path:
    folder = root / f".{name}.tmp-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------------------------
# What is there
# ----------------------------------------------------------------------------------------------


def _folder_size(folder: Path) -> int:
    total = 0
    for directory, _, files in os.walk(folder):
        for file_name in files:
            try:
                total += os.lstat(os.path.join(directory, file_name)).st_size
            except OSError:
                pass
    return total


def dataset_status(root: PathLike = DEFAULT_ROOT, catalogue: Mapping[str, DatasetSource] = CATALOGUE) -> list[dict]:
    """Per catalogue dataset: ``{"name", "state", "bytes", "detail"}`` with state ``complete``,
    ``incomplete`` (a download started; ``detail`` says how far), ``unchecked`` (a folder not
    made by the download command) or ``absent``."""
    root = Path(root)
    rows = []
    for name, source in catalogue.items():
        folder = root / name
        marker = read_marker(folder)
        partial = [root / ".downloads" / f"{remote.name}.part" for remote in source.files]
        pending = sum(path.stat().st_size for path in partial if path.is_file())
        if marker is not None and marker.get("complete"):
            state = "complete"
            count = len(marker.get("archives", {})) if source.per_file else marker.get("images", "?")
            detail = f"{count} {'archives' if source.per_file else 'images'}"
        elif marker is not None or pending:
            state = "incomplete"
            done = len(marker.get("archives", {})) if marker else 0
            detail = f"{done} of {len(source.files) - 1} archives" if source.per_file else "download not finished"
            if pending:
                detail += f"; {_human(pending)} in partial downloads"
        elif folder.exists():
            state, detail = "unchecked", "not made by `clustermac datasets download`"
        else:
            state, detail = "absent", f"clustermac datasets download {name} --root {root}"
        size = _folder_size(folder) if folder.exists() else 0
        rows.append({"name": name, "state": state, "bytes": size + pending, "detail": detail})
    return rows


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - unreachable


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    """`clustermac datasets download NAME`."""
    result = download_dataset(
        args.name,
        args.root,
        args.mirror,
        limit=args.limit,
        record_checksums_to=args.record_checksums,
        checksums=args.checksums,
        force=args.force,
        official=not args.mirror_only,
        retries=args.retries,
        progress=not args.quiet,
    )
    print(result.message)
    if args.record_checksums and result.files:
        print(f"wrote {args.record_checksums}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`clustermac datasets list`."""
    rows = dataset_status(args.root)
    from .report import format_table

    table = [[row["name"], row["state"], _human(row["bytes"]), row["detail"]] for row in rows]
    print(format_table(["Dataset", "State", "Size", "Detail"], table))
    return 0


def add_parser(sub: Any) -> None:
    """Register `clustermac datasets download|list` on the CLI's subparsers."""
    parser = sub.add_parser("datasets", help="download the Oxford / Paris benchmarks and the 1M distractors; list them")
    commands = parser.add_subparsers(dest="datasets_command", required=True)
    p = commands.add_parser("download", help="download, check and lay out one dataset for `clustermac evaluate`")
    p.add_argument("name", choices=list(CATALOGUE), help="the dataset")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"data folder; the dataset goes to ROOT/NAME ({DEFAULT_ROOT})")
    p.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL_PREFIX",
        help="another host serving URL_PREFIX/FILE_NAME, tried after the official hosts (repeatable)",
    )
    p.add_argument("--mirror-only", action="store_true", help="use only the --mirror hosts")
    p.add_argument("--limit", type=int, default=None, help="revisitop1m: only the first N of its 100 archives")
    p.add_argument("--record-checksums", metavar="FILE", help="add the verified size and SHA-256 of each file to FILE")
    p.add_argument("--checksums", metavar="FILE", help="check against the values in FILE (from --record-checksums)")
    p.add_argument("--force", action="store_true", help="download again and replace what is in ROOT/NAME")
    p.add_argument("--retries", type=int, default=3, help="attempts per host after a transient failure (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)
    p = commands.add_parser("list", help="which datasets are in ROOT, complete or not, and their size")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.set_defaults(func=cmd_list)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `clustermac datasets download NAME`")
