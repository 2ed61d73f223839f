"""File helpers: atomic writes (a temporary file beside the target, then a rename, so a crash
never leaves a half-written file in place of a good one), folders published through a pointer
file, one writer per output (``flock``), file digests, and named crash points for the
fault-injection tests."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .errors import CorruptFileError, OutputLockedError


def temporary_file_beside(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, sync it, then rename it to ``path``."""
    fd, tmp = temporary_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    _atomic_write(path, lambda f: np.save(f, array))


def read_npy_header(
    file: BinaryIO, path: str | os.PathLike, what: str = ""
) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse the header of an untrusted ``.npy`` stream positioned at its start: ``(shape,
    fortran_order, dtype, data_offset)``. Any failure of NumPy's parser (it raises several types,
    e.g. tokenize errors on forged headers) becomes a :class:`~clustermac.CorruptFileError` naming
    ``path`` (and ``what``, e.g. a member of an archive)."""
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
    except Exception as error:  # any failure to parse untrusted bytes means a bad file
        prefix = f"{what}: " if what else ""
        raise CorruptFileError(path, f"{prefix}not a readable .npy file ({type(error).__name__}: {error})") from None
    return tuple(int(n) for n in shape), bool(fortran), dtype, file.tell()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- one writer per output
LOCK_SUFFIX = ".lock"


def lock_path(output: Path) -> Path:
    """The lock file of an output: a hidden file beside it (``.NAME.lock``)."""
    output = Path(output)
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


_held_locks: dict[tuple[int, str], int] = {}  # (thread, lock file) -> nesting depth, in this process
_held_locks_guard = threading.Lock()


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, command: str = "") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``output``'s lock file for the whole block.

    A second writer gets :class:`~clustermac.OutputLockedError` at once, naming the holder (PID,
    host, start time, command), never a wait. The kernel drops the lock when the holder dies, so a
    killed run leaves no stale lock to guess about; the lock file itself stays (removing it would
    race with a writer that has just opened it). Nested use on the same output in one process is
    allowed (the CLI holds the lock for a whole run, the library again while it saves). Not
    reliable on every network filesystem.
    """
    output = Path(output)
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Re-entrant for the thread that holds it; another thread of this process is a second
    # writer (its own flock on a new descriptor is refused like another process's).
    key = (threading.get_ident(), os.path.realpath(path))
    with _held_locks_guard:
        if key in _held_locks:
            _held_locks[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_locks_guard:
                _held_locks[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(output, _read_holder(fd)) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        with _held_locks_guard:
            _held_locks[key] = 1
        try:
            yield path
        finally:
            with _held_locks_guard:
                del _held_locks[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers of ``output`` left beside it
    (``NAME.*.tmp``, ``.NAME.tmp-*``). Call only while holding :func:`output_lock`."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    removed = []
    # Exactly the names temporary_file_beside makes (NAME. + mkstemp's 8 random characters +
    # .tmp): "d.*.tmp" would also match the temporaries of the output "d.json", which
    # another writer may be writing under its own lock.
    random_part = "[a-z0-9_]" * 8
    for pattern in (f"{glob.escape(output.name)}.{random_part}.tmp", f".{glob.escape(output.name)}.tmp-*"):
        for leftover in output.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def fsync_directory(folder: Path) -> None:
    """Make a rename or a new file inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- crash points for tests
CRASH_ENVIRONMENT_VARIABLE = "CLUSTERMAC_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(step: str) -> None:
    """A named place where a writer can be killed on purpose, for the fault-injection tests.

    With ``CLUSTERMAC_CRASH_AT=STEP:N`` the N-th time (from 1) the process reaches ``step`` it
    sends itself SIGKILL, as ``kill -9`` would: no ``finally`` block, no clean-up runs.
    ``STEP:N:INT`` sends SIGINT instead, as Ctrl-C would (Python raises KeyboardInterrupt there).
    Without the variable this costs one dictionary lookup.
    """
    wanted = os.environ.get(CRASH_ENVIRONMENT_VARIABLE)
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    if name != step:
        return
    count, _, how = rest.partition(":")
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] == int(count or 1):
        os.kill(os.getpid(), signal.SIGINT if how.upper() == "INT" else signal.SIGKILL)


# ---------------------------------------------------------------------- folders published by a pointer
POINTER_FILE = "CURRENT"
_VERSION_PREFIX = "v-"


def current_version(folder: str | os.PathLike) -> Path | None:
    """The live version of a folder published by :func:`publish_folder`, or None when the folder
    has no pointer file (nothing published yet, or a layout from before pointers)."""
    folder = Path(folder)
    pointer = folder / POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptFileError(pointer, f"unreadable pointer file ({error})") from error
    if not name.startswith(_VERSION_PREFIX) or "/" in name or "\\" in name or name in (".", ".."):
        raise CorruptFileError(pointer, f"the pointer names {name[:80]!r}, not a version folder")
    version = folder / name
    if not version.is_dir():
        raise CorruptFileError(pointer, f"the pointer names {name!r}, which is missing")
    return version


def publish_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Publish a new version of ``folder`` atomically: ``write(staging)`` fills a staging folder
    inside it (each file fsynced), the staging folder is renamed to ``v-…``, and only then the
    small pointer file ``CURRENT`` is replaced by a rename. A reader sees the old version or the
    new one, never a mix; a crash at any step leaves the old version live. Older versions are
    removed after the switch. Call while holding :func:`output_lock` on ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{_VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    staging = folder / f".{name}.tmp"
    staging.mkdir()
    try:
        write(staging)
        fsync_directory(staging)
        os.rename(staging, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    crash_point("publish_folder")
    atomic_write_bytes(folder / POINTER_FILE, name.encode())
    fsync_directory(folder)
    for other in folder.iterdir():
        stale = other.name.startswith(_VERSION_PREFIX) or (
            other.name.startswith(f".{_VERSION_PREFIX}") and other.name.endswith(".tmp")
        )
        if other.is_dir() and not other.is_symlink() and stale and other.name != name:
            shutil.rmtree(other, ignore_errors=True)
    return folder / name
