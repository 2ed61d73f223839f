"""Descriptors as a folder of shards: the layout ``clustermac extract --ray`` writes.

An extension of the descriptor format of :mod:`clustermac.descriptors.store` (same format name
and version, same settings and fingerprint, same checks); the full specification is in the
README, "File formats"::

    OUT/run.json              {"format", "version", "layout": "shards", "settings", "fingerprint",
                               "shard_size", "images"}: written first, identifies the run
    OUT/shard_NNNNNN.npy      rows × D little-endian float32 (.npy 1.0): the descriptors of the
                              readable images of shard N (its images are names[N·S : (N+1)·S])
    OUT/shard_NNNNNN.json     the shard's record (fingerprint, names, failed, rows, bytes, sha256,
                              kernels: the worker's kernel_record()), written after its .npy: the
                              shard's commit mark
    OUT/manifest.json         {"format", "version", "layout": "shards", "images", "failed",
                               "settings", "fingerprint", "shard_size", "data": {"dtype", "rows",
                               "dim"}, "shards": [{"file", "rows", "bytes", "sha256"}], "kernels"},
                              written LAST; "kernels" lists the shards' different records
    .OUT.lock                 the writer's lock, beside the folder

Every file is written to a temporary file, fsynced and renamed, so a shard appears only
complete. A killed run leaves its finished shards; the same command adopts the shards whose
record carries its fingerprint and matches its data, and extracts only the others. A folder
made with other settings or another image list is refused, never mixed. Shards computed by
different code (workers of different kinds of CPU, or a run resumed elsewhere) are accepted, and
:meth:`ShardWriter.publish` says so with a :class:`~clustermac.MixedKernelsWarning`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..descriptors.descriptor_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    _read_manifest,
    check_manifest_lists,
    read_rows_file,
)
from ..errors import CorruptFileError
from ..files import atomic_save_npy, atomic_write_bytes, crash_point, file_sha256, fsync_directory
from ..kernels import distinct_kernels, kernel_record, warn_if_mixed

__all__ = ["ShardedArray", "ShardWriter", "load_shards", "SHARD_SIZE", "LAYOUT", "MANIFEST", "RUN_FILE"]

#: Images per shard (the unit of work sent to a worker and of resumption).
SHARD_SIZE = 256
LAYOUT = "shards"
MANIFEST = "manifest.json"
RUN_FILE = "run.json"
_DTYPE = np.dtype("<f4")


def shard_files(folder: Path, shard: int) -> tuple[Path, Path]:
    """The data file and the record of shard number ``shard``."""
    return folder / f"shard_{shard:06d}.npy", folder / f"shard_{shard:06d}.json"


# ---------------------------------------------------------------------------------- the array
class ShardedArray:
    """The rows of several N_i × D arrays (memory-mapped shards) seen as one N × D array.

    Reading returns ordinary ndarrays: ``a[i]`` (one row), ``a[start:stop:step]``, ``a[rows]``
    (integer or boolean array), ``a[rows, columns]``; ``np.asarray(a)`` copies everything into
    memory; :meth:`iter_chunks` streams it in blocks of rows without doing so.
    """

    def __init__(self, parts: Sequence[np.ndarray], dim: int, dtype: np.dtype | str = _DTYPE) -> None:
        self.dtype = np.dtype(dtype)
        self._parts = [p for p in parts if len(p)]
        for part in self._parts:
            if part.ndim != 2 or part.shape[1] != dim or part.dtype != self.dtype:
                raise ValueError(f"ShardedArray: a part {part.dtype} {part.shape}, expected {self.dtype} (n, {dim})")
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.shape = (int(self._starts[-1]), int(dim))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def parts(self) -> tuple[np.ndarray, ...]:
        """The non-empty shards, in order (np.memmap's when loaded memory-mapped)."""
        return tuple(self._parts)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self._parts)})"

    def _row(self, i: int) -> np.ndarray:
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of bounds for {n} rows")
        i %= n
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.array(self._parts[part][i - self._starts[part]])

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"a boolean index of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows: expected a 1-D array of integers or booleans, got {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"a row index is out of bounds for {n} rows")
        rows = rows % max(n, 1)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for part in np.unique(which):
            mask = which == part
            out[mask] = self._parts[part][rows[mask] - self._starts[part]]
        return out

    def _slice(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            return self._rows(np.arange(start, stop, step))
        blocks = []
        for part, first in zip(self._parts, self._starts[:-1]):
            lo, hi = max(start - first, 0), min(stop - first, len(part))
            if lo < hi:
                blocks.append(part[lo:hi])
        if not blocks:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        return np.concatenate(blocks) if len(blocks) > 1 else np.array(blocks[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"too many indices for a 2-D array: {len(key)}")
            rows = self[key[0]]
            return rows[:, key[1]] if rows.ndim == 2 else rows[key[1]]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self._row(int(key))
        if isinstance(key, slice):
            return self._slice(key)
        return self._rows(np.asarray(key))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._slice(slice(None))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def iter_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The array in order, as ndarrays of at most ``rows`` rows (memory stays bounded)."""
        if rows < 1:
            raise ValueError(f"rows: expected an integer >= 1, got {rows!r}")
        for start in range(0, self.shape[0], rows):
            yield self._slice(slice(start, start + rows))


# ---------------------------------------------------------------------------------- reading
def _check_shard_manifest(path: Path, manifest: Any) -> None:
    check_manifest_lists(path, manifest)
    if manifest.get("format") != FORMAT_NAME or manifest.get("layout") != LAYOUT:
        raise CorruptFileError(path, f"not a {FORMAT_NAME} manifest of layout {LAYOUT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptFileError(path, f"format version {version!r}; this clustermac reads up to {FORMAT_VERSION}")
    data, shards = manifest.get("data"), manifest.get("shards")
    if not isinstance(data, dict) or data.get("dtype") != _DTYPE.str:
        raise CorruptFileError(path, f"manifest['data'] is not a record of {_DTYPE.str} descriptors")
    if not isinstance(data.get("dim"), int) or data["dim"] < 1 or data["dim"] != manifest["settings"].get("dim"):
        raise CorruptFileError(path, f"manifest['data']['dim'] is {data.get('dim')!r}, not the settings' dimension")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise CorruptFileError(path, "manifest['shards'] is not a list of shard records")
    for number, shard in enumerate(shards):
        name = shard_files(path.parent, number)[0].name
        if shard.get("file") != name:
            raise CorruptFileError(path, f"shard {number} is {shard.get('file')!r}, expected {name!r}")
        for key in ("rows", "bytes"):
            if not isinstance(shard.get(key), int) or isinstance(shard.get(key), bool) or shard[key] < 0:
                raise CorruptFileError(path, f"shard {name}: {key} is {shard.get(key)!r}, expected a count")
        if not isinstance(shard.get("sha256"), str) or len(shard["sha256"]) != 64:
            raise CorruptFileError(path, f"shard {name}: no SHA-256")
    rows = sum(s["rows"] for s in shards)
    if rows != len(manifest["images"]) or data.get("rows") != rows:
        raise CorruptFileError(
            path, f"the shards hold {rows} rows but the manifest lists {len(manifest['images'])} images"
        )


def load_shards(folder: PathLike, mmap: bool = True, verify: bool = True) -> tuple[ShardedArray, dict[str, Any]]:
    """The descriptors of a shard folder as one N × D :class:`ShardedArray` (each shard
    memory-mapped with ``mmap``) and its manifest. ``verify`` reads every shard once to check
    its SHA-256 and that its values are finite. A missing, truncated, changed or corrupt shard,
    or an unfinished run (no manifest), raises :class:`~clustermac.CorruptFileError` naming it.
    Called by :func:`clustermac.load_descriptors` when given a folder."""
    folder = Path(folder)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        what = "an unfinished run (run the same command again to finish it)" if (folder / RUN_FILE).is_file() else ""
        raise CorruptFileError(
            folder, f"no {MANIFEST}: {what or 'not a shard folder made by `clustermac extract --ray`'}"
        )
    manifest, _ = _read_manifest(manifest_file, check=_check_shard_manifest)
    dim = manifest["data"]["dim"]
    parts = []
    for number, shard in enumerate(manifest["shards"]):
        path = shard_files(folder, number)[0]
        if not path.is_file():
            raise CorruptFileError(path, f"shard {number} of {manifest_file} is missing")
        parts.append(read_rows_file(path, shard["rows"], dim, shard["bytes"], shard["sha256"], mmap, verify))
    return ShardedArray(parts, dim), manifest


# ---------------------------------------------------------------------------------- writing
def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    def shown(settings: dict[str, Any], key: str) -> str:
        return repr(settings[key]) if key in settings else "unset"

    keys = sorted(k for k in set(old) | set(new) if old.get(k, shown) != new.get(k, shown))
    return ", ".join(f"{k}: {shown(old, k)} there, {shown(new, k)} now" for k in keys)


def _data_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record[key] for key in ("rows", "bytes", "sha256")}


class ShardWriter:
    """Writes one shard folder (see the module doc). Use while holding
    :func:`clustermac.files.output_lock` on the folder.

    Opening checks the folder: a folder of another run (other settings, another image list or
    shard size) or a non-empty folder that is not a shard folder is refused with ``ValueError``
    naming it; the finished shards of the same run are adopted (:attr:`done`), the others removed.
    """

    def __init__(
        self, folder: PathLike, names: Sequence[str], settings: dict[str, Any], shard_size: int, fingerprint: str
    ) -> None:
        self.folder = Path(folder)
        self.names = list(names)
        self.settings = settings
        self.shard_size = int(shard_size)
        self.fingerprint = fingerprint
        self.shards = [self.names[i : i + self.shard_size] for i in range(0, len(self.names), self.shard_size)]
        self.records: dict[int, dict[str, Any]] = {}
        self.messages: list[str] = []
        self._open()

    @property
    def todo(self) -> list[int]:
        """The numbers of the shards still to extract."""
        return [n for n in range(len(self.shards)) if n not in self.records]

    def _run_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "layout": LAYOUT,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "shard_size": self.shard_size,
            "images": len(self.names),
        }

    def _open(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder}: is a file; with --ray the output is a folder of shards")
        folder.mkdir(parents=True, exist_ok=True)
        run_file = folder / RUN_FILE
        if run_file.is_file():
            self._check_same_run(run_file)
        elif any(folder.iterdir()):
            raise ValueError(f"--out {folder}: a folder that is not empty and not a shard folder; choose another")
        # The same run again: its manifest goes first, so no reader sees it name a shard being redone.
        (folder / MANIFEST).unlink(missing_ok=True)
        atomic_write_bytes(run_file, json.dumps(self._run_state(), indent=1).encode())
        keep = {run_file.name}
        for number, chunk in enumerate(self.shards):
            npy, record_file = shard_files(folder, number)
            record = self._adoptable(npy, record_file, chunk)
            if record is not None:
                self.records[number] = record
                keep |= {npy.name, record_file.name}
            elif record_file.exists():
                self.messages.append(f"{folder}: shard {number} was unfinished or damaged; extracting it again")
        for leftover in folder.iterdir():
            if leftover.name not in keep and leftover.is_file():
                leftover.unlink()
        fsync_directory(folder)

    def _check_same_run(self, run_file: Path) -> None:
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CorruptFileError(run_file, f"unreadable run record ({error})") from None
        if not isinstance(old, dict) or old.get("fingerprint") == self.fingerprint:
            return
        if old.get("settings") != self.settings and isinstance(old.get("settings"), dict):
            why = f"made with other extractor settings ({_differences(old['settings'], self.settings)})"
        elif old.get("shard_size") != self.shard_size:
            why = f"made with shard size {old.get('shard_size')}, not {self.shard_size}"
        else:
            why = "made from another image list"
        raise ValueError(
            f"--out {self.folder}: this shard folder was {why}; remove it or choose another --out "
            "(a run resumes only with the same command)"
        )

    def _adoptable(self, npy: Path, record_file: Path, chunk: list[str]) -> dict[str, Any] | None:
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("fingerprint") != self.fingerprint:
                return None
            if record.get("names") != chunk or not isinstance(record.get("failed"), dict):
                return None
            if file_sha256(npy) != record.get("sha256"):
                return None
            read_rows_file(npy, record["rows"], int(self.settings["dim"]), record["bytes"], record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):  # CorruptFileError is a ValueError
            return None
        return record

    def write_shard(
        self, number: int, vectors: np.ndarray, failed: dict[str, str], kernels: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Publish shard ``number``: ``vectors`` are the rows of its readable images (in order),
        ``failed`` its unreadable images with reasons, ``kernels`` the :func:`~clustermac.kernel_record`
        of the process that computed them (default: this one's). The data first, then its record."""
        chunk = self.shards[number]
        vectors = np.ascontiguousarray(vectors, dtype=_DTYPE)
        if vectors.shape != (len(chunk) - len(failed), int(self.settings["dim"])) or not set(failed) <= set(chunk):
            raise ValueError(f"shard {number}: {vectors.shape[0]} rows and {len(failed)} failures for {len(chunk)}")
        npy, record_file = shard_files(self.folder, number)
        atomic_save_npy(npy, vectors)
        record = {
            "fingerprint": self.fingerprint,
            "shard": number,
            "names": chunk,
            "failed": failed,
            "rows": int(vectors.shape[0]),
            "bytes": npy.stat().st_size,
            "sha256": file_sha256(npy),
            "kernels": kernel_record() if kernels is None else kernels,
        }
        atomic_write_bytes(record_file, json.dumps(record).encode())
        crash_point("ray.shard_written")
        self.records[number] = record
        return record

    def publish(self) -> dict[str, Any]:
        """Write the manifest (last), once every shard is written; returns it."""
        missing = self.todo
        if missing:
            raise RuntimeError(f"{self.folder}: shards {missing[:5]} are not written yet")
        records = [self.records[n] for n in range(len(self.shards))]
        failed = {name: r["failed"][name] for r in records for name in r["names"] if name in r["failed"]}
        images = [name for r in records for name in r["names"] if name not in r["failed"]]
        kernels = distinct_kernels(r.get("kernels") for r in records)
        warn_if_mixed(kernels, str(self.folder))
        manifest = self._run_state()
        manifest.update(
            images=images,
            failed=failed,
            data={"dtype": _DTYPE.str, "rows": len(images), "dim": int(self.settings["dim"])},
            shards=[{"file": shard_files(self.folder, n)[0].name, **_data_fields(r)} for n, r in enumerate(records)],
            kernels=kernels,
        )
        atomic_write_bytes(self.folder / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_directory(self.folder)
        return manifest
