"""Descriptors of an image folder on disk: a memory-mappable ``.npy`` plus a JSON manifest.

Layout for ``--out desc.npy`` (format version 2; the full specification is in the README,
"File formats")::

    desc.npy           N×D little-endian float32 (NumPy .npy 1.0), row i is manifest["images"][i]
    desc.json          {"format", "version": 2, "images", "failed", "settings", "fingerprint",
                        "data": {"dtype", "rows", "dim", "bytes", "sha256"}, "kernels"}, written LAST
    desc.npy.parts/    while running: finished chunks (chunk_NNNNNN.npy, then its .json)
    .desc.npy.lock     the writers' lock (see :func:`clustermac.files.output_lock`)

One writer per output: :func:`extract_folder` holds the lock of ``desc.npy`` and of
``desc.json`` for the whole run. An interrupted run leaves its finished chunks in ``.parts``,
each stamped with the run's fingerprint (SHA-256 of the settings, the image list and the chunk
size); the next run adopts only the chunks with its own fingerprint and discards the others,
saying so. Each chunk also records the code that computed it (:func:`clustermac.kernel_record`);
the manifest's ``kernels`` lists the different records of its chunks (one, unless the run was
resumed on another kind of machine, which a :class:`~clustermac.MixedKernelsWarning` then says).
The data file is written to a temporary file, fsynced and renamed; the manifest,
which holds the data file's size and SHA-256, is written the same way after it. A crash
between the two leaves the old manifest, whose checksum no longer matches: the pair is refused
by :func:`load_descriptors`, never read mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..errors import CorruptFileError
from ..files import (
    atomic_save_npy,
    atomic_write_bytes,
    crash_point,
    file_sha256,
    fsync_directory,
    output_lock,
    remove_stale_temporaries,
    temporary_file_beside,
)
from ..images import list_images
from ..kernels import distinct_kernels, kernel_record, warn_if_mixed
from .descriptor_file import _DTYPE, FORMAT_NAME, FORMAT_VERSION, _read_data, _read_manifest, _stamp
from .extractor import Extractor

__all__ = [
    "extract_folder",
    "load_descriptors",
    "manifest_path",
    "parts_path",
    "check_output_paths",
    "settings_fingerprint",
    "CHUNK_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

# Images per chunk written to the parts folder (the unit of resumption).
CHUNK_SIZE = 64


def manifest_path(out: PathLike) -> Path:
    """The manifest file beside a descriptor file."""
    return Path(out).with_suffix(".json")


def parts_path(out: PathLike) -> Path:
    """The folder of finished chunks of an unfinished run."""
    return Path(str(out) + ".parts")


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def settings_fingerprint(settings: dict[str, Any], names: Sequence[str], chunk_size: int) -> str:
    """SHA-256 (hex) of the canonical JSON (sorted keys, no spaces, ASCII) of
    ``{"format": FORMAT_VERSION, "settings": ..., "images": [...], "chunk_size": n}``: what a
    chunk must carry to be adopted by a resumed run."""
    state = {"format": FORMAT_VERSION, "settings": settings, "images": list(names), "chunk_size": int(chunk_size)}
    return hashlib.sha256(_canonical_json(state)).hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_paths(
    out: PathLike, folder: PathLike | None = None, names: Iterable[str] = (), inputs: Iterable[PathLike] = ()
) -> None:
    """Refuse an output whose files would overwrite each other or an input, before any work.

    Raises ``ValueError`` when ``out`` is a folder or a ``.json`` path (its manifest would be
    itself), or when ``out``, its manifest or its parts folder is ``folder``, one of the images
    ``folder/name`` or one of the other ``inputs`` (e.g. the whitening file).
    """
    out = Path(out)
    manifest = manifest_path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a file name such as {out / 'desc.npy'}")
    if _same_file(out, manifest):
        raise ValueError(
            f"--out {out}: the manifest would be written over the descriptors (both {manifest.name}); "
            f"use a .npy name such as {out.with_suffix('.npy')}"
        )
    if manifest.is_dir():
        raise ValueError(f"--out {out}: its manifest {manifest} is a directory")
    produced = {"the descriptor file": out, "its manifest": manifest, "its parts folder": parts_path(out)}
    taken: dict[str, str] = {}
    if folder is not None:
        folder = Path(folder)
        taken[os.path.realpath(folder)] = f"the image folder {folder}"
        for name in names:
            taken[os.path.realpath(folder / name)] = f"the input image {folder / name}"
    for path in inputs:
        if path is not None:
            taken[os.path.realpath(path)] = f"the input file {path}"
    for what, path in produced.items():
        clash = taken.get(os.path.realpath(path))
        if clash is not None:
            raise ValueError(f"--out {out}: {what} {path} would overwrite {clash}")


# ---------------------------------------------------------------------------------- writing
def extract_folder(
    extractor: Extractor,
    folder: PathLike,
    out: PathLike,
    progress: bool = True,
    names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Extract the descriptors of every image in ``folder`` into ``out`` (see module doc).

    Unreadable images, and images whose descriptor is not finite, are reported (returned in
    ``manifest["failed"]`` with the reason) and skipped; they never end the run. Returns the
    manifest. ``chunk_size`` images (default :data:`CHUNK_SIZE`) make one finished chunk, the
    unit of resumption. Raises :class:`~clustermac.OutputLockedError` when another process writes
    ``out``, ``ValueError`` when the output paths collide (:func:`check_output_paths`), and
    ``OSError`` when the output cannot be written (the previous output is then left as it was).
    """
    if chunk_size is None:
        chunk_size = CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    folder = Path(folder)
    out = Path(out)
    names = list(names) if names is not None else list_images(folder)
    check_output_paths(out, folder, names)
    settings = descriptor_settings(extractor)
    fingerprint = settings_fingerprint(settings, names, chunk_size)
    manifest_file = manifest_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, command="extract"), output_lock(manifest_file, command="extract"):
        remove_stale_temporaries(out)
        remove_stale_temporaries(manifest_file)
        parts = parts_path(out)
        chunks = [names[i : i + chunk_size] for i in range(0, len(names), chunk_size)]
        infos, messages = _adopt_chunks(parts, chunks, chunk_size, settings, fingerprint)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(names),
                initial=sum(len(chunks[i]) for i in infos),
                desc="extract",
                unit="img",
                dynamic_ncols=True,
            )
        say: Callable[[str], None] = bar.write if bar is not None else _warn
        for message in messages:
            say(message)
        try:
            for c in range(len(chunks)):
                if c not in infos:
                    infos[c] = _extract_chunk(extractor, folder, parts, c, chunks[c], fingerprint, bar)
        finally:
            if bar is not None:
                bar.close()
        return _assemble(parts, out, chunks, infos, settings, fingerprint)


def descriptor_settings(extractor: Extractor) -> dict[str, Any]:
    """The settings saved with descriptors: the extractor's, plus whether it whitens and the
    dimension, as JSON types (tuples become lists), as saved."""
    settings = extractor.settings()
    settings.update(whitened=extractor.is_whitened, dim=extractor.dim)
    return json.loads(json.dumps(settings))


def extract_rows(
    extractor: Extractor, paths: Sequence[str], names: Sequence[str], bar: Any = None
) -> tuple[np.ndarray, dict[str, str]]:
    """The descriptors of ``paths`` (len × dim float32, zero rows for the failures) and the
    failures ``{name: reason}``: unreadable images, and descriptors of the wrong shape or not
    finite. ``bar`` (a tqdm bar or None) is advanced per image and told about the failures."""
    vectors = np.zeros((len(paths), extractor.dim), dtype=_DTYPE)
    failed: dict[str, str] = {}
    for j, result in extractor.iter_extract(list(paths), progress=False):
        if not isinstance(result, Exception):
            result = np.asarray(result, dtype=_DTYPE)
            if result.shape != (extractor.dim,):
                result = ValueError(f"a descriptor of shape {result.shape}, expected ({extractor.dim},)")
            elif not np.isfinite(result).all():
                result = ValueError("the descriptor has non-finite values (NaN or inf)")
        if isinstance(result, Exception):
            failed[names[j]] = f"{type(result).__name__}: {result}"
            if bar is not None:
                bar.write(f"skipped {names[j]}: {result}")
        else:
            vectors[j] = result
        if bar is not None:
            bar.update(1)
    return vectors, failed


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _chunk_files(parts: Path, c: int) -> tuple[Path, Path]:
    return parts / f"chunk_{c:06d}.npy", parts / f"chunk_{c:06d}.json"


def _extract_chunk(
    extractor: Extractor,
    folder: Path,
    parts: Path,
    c: int,
    chunk: list[str],
    fingerprint: str,
    bar: Any,
) -> dict[str, Any]:
    vectors, failed = extract_rows(extractor, [str(folder / n) for n in chunk], chunk, bar)
    npy, record = _chunk_files(parts, c)
    atomic_save_npy(npy, vectors)
    crash_point("extract.chunk_npy")
    info = {
        "fingerprint": fingerprint,
        "chunk": c,
        "names": chunk,
        "failed": failed,
        "rows": len(chunk),
        "dim": int(extractor.dim),
        "sha256": file_sha256(npy),
        "kernels": kernel_record(),
    }
    # The JSON is the chunk's commit mark: written last.
    atomic_write_bytes(record, json.dumps(info).encode())
    crash_point("extract.chunk_json")
    return info


def _adopt_chunks(
    parts: Path, chunks: list[list[str]], chunk_size: int, settings: dict[str, Any], fingerprint: str
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The finished chunks of ``parts`` that this run may reuse (chunk index -> record), and the
    messages about the ones it discarded (which are deleted)."""
    adopted: dict[int, dict[str, Any]] = {}
    discarded: dict[str, int] = {}
    if parts.exists() and not parts.is_dir():
        raise ValueError(f"{parts}: expected the folder of finished chunks, found a file")
    parts.mkdir(parents=True, exist_ok=True)
    for leftover in parts.glob("*.tmp"):  # a killed writer's temporary files
        leftover.unlink(missing_ok=True)
    dim = int(settings["dim"])
    for c, chunk in enumerate(chunks):
        npy, record = _chunk_files(parts, c)
        if not record.exists():
            continue
        reason = _chunk_problem(npy, record, chunk, dim, fingerprint)
        if reason is None:
            adopted[c] = json.loads(record.read_text(encoding="utf-8"))
        else:
            discarded[reason] = discarded.get(reason, 0) + 1
    keep = {p.name for c in adopted for p in _chunk_files(parts, c)} | {"run.json"}
    checked = {_chunk_files(parts, c)[1].name for c in range(len(chunks))}
    for leftover in parts.iterdir():
        if leftover.name in keep:
            continue
        if leftover.name.startswith("chunk_") and leftover.suffix == ".json" and leftover.name not in checked:
            discarded["not part of this run's chunks"] = discarded.get("not part of this run's chunks", 0) + 1
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    state = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": fingerprint, "settings": settings}
    state.update(chunk_size=chunk_size, images=sum(len(c) for c in chunks))
    atomic_write_bytes(parts / "run.json", json.dumps(state, indent=1).encode())
    messages = [
        f"{parts}: discarded {count} finished chunk{'s' if count > 1 else ''} ({reason}); extracting them again"
        for reason, count in discarded.items()
    ]
    return adopted, messages


def _chunk_problem(npy: Path, record: Path, chunk: list[str], dim: int, fingerprint: str) -> str | None:
    """Why a finished chunk cannot be adopted, or None when it can."""
    try:
        info = json.loads(record.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return "unreadable record"
    if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), str):
        return "no fingerprint: left by an older clustermac"
    if info["fingerprint"] != fingerprint:
        return "left by a run with other settings or another image list"
    failed = info.get("failed")
    if info.get("names") != chunk or not isinstance(failed, dict) or not set(failed) <= set(chunk):
        return "record does not list this chunk's images"
    try:
        if file_sha256(npy) != info.get("sha256"):
            return "data does not match its record"
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return "unreadable data"
    if vectors.dtype != _DTYPE or vectors.shape != (len(chunk), dim) or not np.isfinite(vectors).all():
        return "data of the wrong shape or type"
    return None


def _assemble(
    parts: Path,
    out: Path,
    chunks: list[list[str]],
    infos: dict[int, dict[str, Any]],
    settings: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """Stream the finished chunks into ``out`` (memory stays flat in the number of images),
    publish it by rename, then publish the manifest (with the data's size and SHA-256) by rename."""
    kept = [[j for j, n in enumerate(chunk) if n not in infos[c]["failed"]] for c, chunk in enumerate(chunks)]
    images = [chunk[j] for chunk, keep in zip(chunks, kept) for j in keep]
    failed = {
        name: infos[c]["failed"][name] for c, chunk in enumerate(chunks) for name in chunk if name in infos[c]["failed"]
    }
    dim = int(settings["dim"])
    kernels = distinct_kernels(infos[c].get("kernels") for c in range(len(chunks)))
    warn_if_mixed(kernels, str(out), stacklevel=3)
    digest = hashlib.sha256()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(_DTYPE), "fortran_order": False, "shape": (len(images), dim)}
    )
    fd, tmp = temporary_file_beside(out)
    try:
        with os.fdopen(fd, "wb") as file:
            size = 0
            for block in _blocks(parts, kept, header.getvalue()):
                file.write(block)
                digest.update(block)
                size += len(block)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write the descriptors ({error.strerror})", str(out)) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "images": images,
        "failed": failed,
        "settings": settings,
        "fingerprint": fingerprint,
        "data": {"dtype": _DTYPE.str, "rows": len(images), "dim": dim, "bytes": size, "sha256": digest.hexdigest()},
        "kernels": kernels,
    }
    manifest_file = manifest_path(out)
    fd, manifest_tmp = temporary_file_beside(manifest_file)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(manifest, indent=1).encode())
            file.flush()
            os.fsync(file.fileno())
        # Both files are ready: publish the data, then the manifest. Ctrl-C waits for the end
        # of these few system calls, so an interrupt never leaves a mixed pair.
        with _interrupts_deferred():
            crash_point("extract.before_npy_rename")
            os.replace(tmp, out)
            fsync_directory(out.parent)
            crash_point("extract.after_npy_rename")
            os.replace(manifest_tmp, manifest_file)
            fsync_directory(manifest_file.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        Path(manifest_tmp).unlink(missing_ok=True)
        raise
    crash_point("extract.after_manifest")
    _remove_parts(parts)
    return manifest


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT (Ctrl-C) back for the block, then raise it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)


def _blocks(parts: Path, kept: list[list[int]], header: bytes) -> Iterable[bytes]:
    yield header
    for c, keep in enumerate(kept):
        vectors = np.load(_chunk_files(parts, c)[0], allow_pickle=False)
        if keep:
            yield np.ascontiguousarray(vectors[keep], dtype=_DTYPE).tobytes()


def _remove_parts(parts: Path) -> None:
    """Remove the parts folder once the output is published: the records first (a kill halfway
    leaves chunks that a later run either adopts whole or discards)."""
    if not parts.is_dir():
        return
    for pattern in ("chunk_*.json", "*"):
        for leftover in sorted(parts.glob(pattern)):
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)
                crash_point("extract.cleanup")
    try:
        parts.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------- reading
def load_descriptors(out: PathLike, mmap: bool = True, verify: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The descriptors (memory-mapped by default) and the manifest written by :func:`extract_folder`.

    Checks, before returning: the manifest is a JSON object of a known version with its keys and
    types; the ``.npy`` header is 2-D little-endian float32, C order, with as many rows as
    images and the dimension of the settings, and the file has exactly that many bytes (so a
    truncated or padded file is refused without reading it). With ``verify=True`` (default) the
    whole file is also read once: its SHA-256 must equal the manifest's (files of version 2) and
    every value must be finite. ``verify=False`` skips that read, for huge files on slow disks.

    Raises :class:`~clustermac.CorruptFileError` (a ``ValueError``) naming the file and the
    problem for any malformed, mixed or missing pair. Files written by clustermac 0.1.0 (no
    version, no checksum) load, with the checks that do not need the checksum.
    """
    out = Path(out)
    if out.is_dir():  # a shard folder written by `clustermac extract --ray`
        from ..distributed.shards import load_shards

        return load_shards(out, mmap=mmap, verify=verify)
    manifest_file = manifest_path(out)
    if _same_file(out, manifest_file):
        raise CorruptFileError(out, "this is a manifest: pass the .npy descriptor file beside it")
    for attempt in range(3):
        if not out.is_file() or not manifest_file.is_file():
            raise CorruptFileError(
                out,
                f"expected a descriptor file and its manifest {manifest_file.name} (made by `clustermac extract`)",
            )
        manifest, stamp = _read_manifest(manifest_file)
        try:
            return _read_data(out, manifest, mmap, verify), manifest
        except CorruptFileError:
            # A writer may have published a new pair between our two reads: read again then.
            if attempt == 2 or _stamp(manifest_file) == stamp:
                raise
    raise AssertionError("unreachable")
