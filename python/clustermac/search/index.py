"""A searchable collection of descriptors with their image names.

:class:`Index` keeps float32 vectors (normally the l2-normalised descriptors of
:class:`clustermac.Extractor`, so that the dot product is the cosine similarity) and runs
exact top-k search in the C++ core (:func:`clustermac.topk_search`: blocked matrix
products, partial selection, threads, GIL released; ``path="auto"``, so on CPUs with
AVX512-BF16 a bfloat16 candidate scan with an exact float32 re-score that returns the same
bits). Vectors are held as a list of chunks: ``add`` appends a chunk (small trailing
chunks are merged), ``load(mmap=True)`` maps the saved vectors from disk, so a 1M × 512
index (2 GB) is searched without ever holding two copies of it. An optional FAISS backend
(``backend="faiss"``, compressed / IVF storage) offers the same interface for collections
that do not fit in memory as float32.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core, files
from .._typing import PathLike
from ..descriptors.pipeline import progress_bar
from ..errors import CorruptFileError
from . import path_cache
from .names import BLOB_FILE, OFFSETS_FILE, NameList, read_names
from .rescore import VectorSources, rescore_candidates

__all__ = ["Index"]


_FORMAT = "clustermac-index"
# 3: names as one UTF-8 blob + uint64 offsets (names.utf8, names.offsets.npy), optional re-scoring sources;
# 2: a version folder behind CURRENT, sizes and SHA-256 in meta.json, names.json;
# 1: clustermac 0.1.0, the files at the top of the folder.
_FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
# Trailing in-memory chunks smaller than this are merged with the next add(), so that many
# small add() calls do not turn every search into many tiny searches.
_MERGE_ROWS = 65536
# Rows written per step when streaming vectors to disk (bounded extra memory).
_WRITE_ROWS = 65536


def _as_matrix(vectors: Any, dim: int, name: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{name}: expected an array of shape (n, {dim}) or ({dim},), got shape {np.shape(vectors)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point vectors, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # an overflow to inf is reported below, naming the row
        array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{name}: row {int(np.argmin(finite))} contains NaN or Inf values (or overflows float32); "
            "expected only finite numbers"
        )
    return array


class Index:
    """Exact (or FAISS) top-k dot-product search over named vectors.

    Parameters
    ----------
    dim:
        Dimension of the vectors.
    backend:
        ``"exact"`` (default): brute-force search in the C++ core, results identical to a
        NumPy brute force (ties broken by the smaller index). ``"faiss"``: a ``faiss-cpu``
        index built with ``faiss.index_factory(dim, faiss_factory, METRIC_INNER_PRODUCT)``;
        ``faiss`` is imported only then (``pip install clustermac[faiss]``).
    faiss_factory:
        FAISS factory string, e.g. ``"SQ8"`` (8-bit scalar quantisation, 4× smaller, the
        default), ``"IVF1024,PQ64"`` (inverted file with product quantisation) or ``"Flat"``.
        Indexes that need training are trained by :meth:`train` on a sample, or else on the
        first ``add()`` batch, which must then be large enough for them (FAISS says how large).
    faiss_nprobe:
        Inverted lists visited per query for IVF indexes (saved with the index; ``search(...,
        nprobe=...)`` overrides it for one call).
    n_threads:
        Threads of the exact search (``<= 0``: every core).

    Vectors should be l2-normalised for the scores to be cosine similarities; the index does
    not normalise them.
    """

    def __init__(
        self,
        dim: int,
        backend: str = "exact",
        *,
        faiss_factory: str = "SQ8",
        faiss_nprobe: int = 16,
        n_threads: int = 0,
    ) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        if backend not in ("exact", "faiss"):
            raise ValueError(f"backend: expected 'exact' or 'faiss', got {backend!r}")
        self._dim = int(dim)
        self._backend = backend
        self._n_threads = int(n_threads)
        self._chunks: list[np.ndarray] = []
        self._names = NameList()
        self._info: dict = {}
        self._sources = VectorSources()
        self._faiss_mapped: Path | None = None  # the file a memory-mapped FAISS index reads
        self._faiss_factory = faiss_factory
        self._faiss_nprobe = int(faiss_nprobe)
        self._faiss_index: Any = None
        if backend == "faiss":
            faiss = _import_faiss()
            if not isinstance(faiss_factory, str) or not faiss_factory.strip():
                raise ValueError(
                    f"faiss_factory: expected a FAISS factory string such as 'IVF256,PQ32', got {faiss_factory!r}"
                )
            try:
                self._faiss_index = faiss.index_factory(self._dim, faiss_factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as error:
                raise ValueError(
                    f"faiss_factory: FAISS cannot build {faiss_factory!r} for dimension {self._dim} "
                    f"({_faiss_reason(error)})"
                ) from None
        if not _positive_int(self._faiss_nprobe):
            raise ValueError(f"faiss_nprobe: expected a positive integer, got {faiss_nprobe!r}")

    # ------------------------------------------------------------------ basic properties
    @property
    def dim(self) -> int:
        """Dimension of the vectors."""
        return self._dim

    @property
    def backend(self) -> str:
        """``"exact"`` or ``"faiss"``."""
        return self._backend

    @property
    def names(self) -> NameList:
        """Image names in row order: a compact read-only sequence (index, slice, iterate, ``==`` a list)."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Index(dim={self._dim}, backend={self._backend!r}, size={len(self)})"

    # ------------------------------------------------------------------ training
    @property
    def is_trained(self) -> bool:
        """Whether vectors can be added without training first (always true for ``"exact"``)."""
        return self._backend == "exact" or bool(self._faiss_index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Train the FAISS index on ``sample`` (n × dim), before any :meth:`add`.

        ``sample`` is validated like the vectors of :meth:`add` (floating point, finite, of
        dimension ``dim``; copied as float32). Use a random sample of the collection, large
        enough for the factory: an ``IVFn`` needs at least ``n`` vectors (FAISS recommends 30 to
        256 × ``n``), a ``PQm`` (8-bit) at least 256; too few raises a ``ValueError`` naming the
        factory and the counts. Without ``train``, the first :meth:`add` batch trains the index.
        FAISS's k-means uses a fixed seed, so the same sample gives the same index bytes.

        The ``"exact"`` backend needs no training: ``train`` only validates ``sample`` and does
        nothing else (so code written for either backend may always call it). Training an index
        that already holds vectors raises ``ValueError`` (the stored codes would be stale).
        """
        matrix = _as_matrix(sample, self._dim, "sample")
        if matrix.shape[0] == 0:
            raise ValueError("sample: expected at least one training vector, got 0")
        if self._backend != "faiss":
            return
        if len(self):
            raise ValueError(f"train(): the index already holds {len(self)} vectors; train before adding")
        self._train_faiss(matrix, "sample")

    def _train_faiss(self, matrix: np.ndarray, name: str, when: str = "") -> None:
        try:
            self._faiss_index.train(matrix)
        except RuntimeError as error:
            problem = _training_problem(matrix.shape[0], error)
            raise ValueError(f"{name}: the FAISS index {self._faiss_factory!r}{when} {problem}") from None

    # ------------------------------------------------------------------ adding
    def add_trained_on_sample(
        self,
        vectors: np.ndarray,
        names: Sequence[str],
        train_size: int,
        seed: int = 0,
        chunk_rows: int = 65536,
        progress: bool = False,
    ) -> int:
        """Train on ``train_size`` rows of ``vectors`` drawn without replacement with ``seed`` (in
        row order; every row when there are not more), then add all of them ``chunk_rows`` at a time,
        so that a memory-mapped ``vectors`` is never copied whole. Returns the sample size. For a
        large collection with the faiss backend; with the exact backend training is a no-op.

        ``vectors`` may be any array-like with ``len``, ``shape`` and rows by slice and by sorted
        integer array (a ``np.memmap``, the sharded descriptors of :func:`clustermac.load_descriptors`).
        ``progress``: a progress bar of the rows added."""
        count = len(vectors)
        if count == 0:
            raise ValueError(f"vectors: nothing to train the index {self._faiss_factory!r} on")
        if count <= train_size:
            rows = np.arange(count, dtype=np.int64)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(count, size=train_size, replace=False))
        self.train(vectors[rows])  # a copy of the sample only, dropped after training
        bar = progress_bar(count, "adding to the index", progress)
        for start in range(0, count, chunk_rows):
            stop = min(start + chunk_rows, count)
            self.add(vectors[start:stop], names[start:stop])
            bar.update(stop - start)
        bar.close()
        return int(rows.size)

    def add(self, vectors: np.ndarray, names: Sequence[str]) -> None:
        """Append ``vectors`` (n × dim, or one vector of length dim) named ``names``.

        The vectors are copied (as float32); with the exact backend a small trailing chunk is
        merged with the new one, so adding in batches of any size keeps searches efficient.
        """
        matrix = _as_matrix(vectors, self._dim, "vectors")
        if isinstance(names, str):
            names = [names]
        names = NameList(names)  # checks every name (a string UTF-8 can encode)
        if len(names) != matrix.shape[0]:
            raise ValueError(f"names: expected {matrix.shape[0]} names (one per vector), got {len(names)}")
        if matrix.shape[0] == 0:
            return
        if self._backend == "faiss":
            if not self._faiss_index.is_trained:  # no train() call: the first batch trains it
                self._train_faiss(matrix, "vectors", " must be trained on the first add() batch (or by train()) and")
            self._writable_faiss().add(matrix)
        else:
            if matrix is vectors or (isinstance(vectors, np.ndarray) and np.may_share_memory(matrix, vectors)):
                matrix = matrix.copy()
            last = self._chunks[-1] if self._chunks else None
            if last is not None and not isinstance(last, np.memmap) and last.shape[0] < _MERGE_ROWS:
                self._chunks[-1] = np.concatenate([last, matrix], axis=0)
            else:
                self._chunks.append(matrix)
        self._sources.grown(len(self), matrix.shape[0])
        self._names.extend(names)

    def remove(self, names: Sequence[str]) -> int:
        """Remove every row named in ``names`` (all rows of a repeated name); returns how many rows went.

        Rows after a removed one move up (row numbers stay 0 .. len-1, as after a rebuild). A name that
        is not in the index raises ``ValueError`` naming it, and nothing is removed. FAISS indexes
        without removal (``HNSW``) raise ``ValueError``. Save the index to persist the change."""
        if isinstance(names, str):
            names = [names]
        wanted = set(names)
        keep = np.fromiter((name not in wanted for name in self._names), dtype=bool, count=len(self))
        found = {self._names[i] for i in np.flatnonzero(~keep)}
        missing = sorted(wanted - found)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise ValueError(f"names: {len(missing)} not in the index: {shown}")
        if keep.all():
            return 0
        if self._backend == "faiss":
            _remove_faiss_rows(self._writable_faiss(), keep, self._faiss_factory)
        else:
            kept_chunks, start = [], 0
            for chunk in self._chunks:
                part = chunk[keep[start : start + chunk.shape[0]]]
                if part.shape[0]:
                    kept_chunks.append(np.ascontiguousarray(part))
                start += chunk.shape[0]
            self._chunks = kept_chunks
        self._sources.kept(keep)
        self._names = self._names.kept(keep)
        return int((~keep).sum())

    def attach_vectors(self, path: PathLike, first_row: int = 0) -> None:
        """Record that index rows ``first_row``, ``first_row + 1``, ... are the float vectors at ``path``, for
        ``search(..., rescore=R)``: a descriptor file or folder of ``clustermac extract`` or a 2-D float32
        ``.npy``. The absolute path and a fingerprint (:func:`~clustermac.search.rescore.vectors_fingerprint`)
        are saved with the index; searching with ``rescore`` after the file has moved or changed raises
        :class:`~clustermac.CorruptFileError` naming it. ``clustermac index`` attaches its input."""
        self._sources.attach(path, int(first_row), len(self), self._dim)

    def _writable_faiss(self) -> Any:
        """The FAISS index, first read into memory if it was loaded memory-mapped (read-only lists)."""
        if self._faiss_mapped is not None:
            faiss = _import_faiss()
            try:
                self._faiss_index = faiss.read_index(str(self._faiss_mapped))
            except RuntimeError as error:
                raise CorruptFileError(
                    self._faiss_mapped, f"cannot be read again to change the index ({error})"
                ) from None
            self._faiss_mapped = None
        return self._faiss_index

    # ------------------------------------------------------------------ access
    def vectors(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors at ``indices`` (any shape of integer array) → float32 (..., dim).

        Only available with the exact backend (FAISS stores compressed codes)."""
        if self._backend != "exact":
            raise ValueError("vectors(): the faiss backend stores compressed codes; use backend='exact'")
        index_array = np.asarray(indices)
        if index_array.size and not np.issubdtype(index_array.dtype, np.integer):
            raise ValueError(f"indices: expected integers, got dtype {index_array.dtype}")
        flat = index_array.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise ValueError(f"indices: expected values in [0, {len(self)}), got range [{flat.min()}, {flat.max()}]")
        out = np.empty((flat.size, self._dim), dtype=np.float32)
        start = 0
        for chunk in self._chunks:
            inside = (flat >= start) & (flat < start + chunk.shape[0])
            if inside.any():
                out[inside] = chunk[flat[inside] - start]
            start += chunk.shape[0]
        return out.reshape(index_array.shape + (self._dim,))

    def iter_chunks(self):
        """Yields (first_row, float32 rows × dim array) for the stored vectors (exact backend)."""
        if self._backend != "exact":
            raise ValueError("iter_chunks(): the faiss backend stores compressed codes; use backend='exact'")
        start = 0
        for chunk in self._chunks:
            yield start, chunk
            start += chunk.shape[0]

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: np.ndarray,
        k: int = 100,
        *,
        nprobe: int | None = None,
        efsearch: int | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database vectors by dot product for each query.

        ``queries``: Q × dim (or one vector of length dim). ``k`` is capped at ``len(self)``.
        Returns (scores float32 Q×k sorted descending, indices int64 Q×k); the exact backend
        breaks ties by the smaller index. FAISS indexes may return index -1 (score -inf) when
        they find fewer than k candidates.

        ``nprobe``: inverted lists visited per query, for this call only (default: the
        ``faiss_nprobe`` the index was built or saved with); it reaches the IVF part of
        composite factories too (``"OPQ64,IVF16384,PQ64"``, ``"PCA256,IVF4096,PQ32"``).
        ``efsearch``: the HNSW search depth (``efSearch``) for this call, where the FAISS
        index (or its IVF quantizer, as in ``"IVF65536_HNSW32,PQ64"``) is an HNSW graph.
        Larger values find more true neighbours and are slower. Both are ignored by the exact
        backend (its results are always exact) and by FAISS indexes that have no such
        parameter (``"SQ8"``, ``"Flat"``). They set the FAISS index's parameters, so do not
        search one ``Index`` from several threads with different values.

        ``rescore``: FAISS backend: take the top ``max(rescore, k)`` candidates of the compressed index and
        re-rank them by exact float32 dot products with the vectors :meth:`attach_vectors` recorded (read
        memory-mapped; ties by the smaller index). The scores are then exact and the order exact among the
        candidates. Ignored by the exact backend.
        """
        matrix = _as_matrix(queries, self._dim, "queries")
        if len(self) == 0:
            raise ValueError("search(): the index is empty; add() vectors first")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        for option, value in (("nprobe", nprobe), ("efsearch", efsearch), ("rescore", rescore)):
            if value is not None and not (
                isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
            ):
                raise ValueError(f"{option}: expected a positive integer or None, got {value!r}")
        k = min(int(k), len(self))
        if self._backend == "faiss":
            _set_search_parameters(
                self._faiss_index, int(nprobe) if nprobe is not None else self._faiss_nprobe, efsearch
            )
            candidates = min(max(int(rescore or 0), k), len(self))
            scores, indices = self._faiss_index.search(matrix, candidates)
            if rescore:
                if not self._sources.sources:
                    raise ValueError(
                        "rescore: no float vectors recorded for this index; call attach_vectors() "
                        "(clustermac index records its input)"
                    )
                return rescore_candidates(matrix, indices, self._sources, k)
            scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
            return scores, indices.astype(np.int64)
        parts_scores, parts_indices = [], []
        start = 0
        path_cache.use_cached_choices()  # "auto"'s timings from earlier processes on this kind of CPU
        for chunk in self._chunks:
            chunk_k = min(k, chunk.shape[0])
            scores, indices = _core.topk_search(chunk, matrix, chunk_k, self._n_threads)
            parts_scores.append(scores)
            parts_indices.append(indices + start)
            start += chunk.shape[0]
        path_cache.remember_choices()
        if len(parts_scores) == 1:
            return parts_scores[0], parts_indices[0]
        all_scores = np.concatenate(parts_scores, axis=1)
        all_indices = np.concatenate(parts_indices, axis=1)
        # Sort by score descending, then index ascending (lexsort: last key is primary).
        order = np.lexsort((all_indices, -all_scores), axis=1)[:, :k]
        return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_indices, order, axis=1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike, info: Mapping[str, Any] | None = None) -> None:
        """Write the index to the folder ``path``, published atomically.

        A new version folder ``path/v-<stamp>-<hex>/`` receives ``names.json``, ``vectors.npy``
        (exact backend; written in blocks, so saving a memory-mapped index does not load it) or
        ``faiss.index``, ``info`` as ``clustermac.json`` (any JSON-serialisable dict: e.g. the
        settings the descriptors were made with) and, last, ``meta.json`` with the size and
        SHA-256 of each of those files; each file is fsynced, then the small pointer file
        ``path/CURRENT`` is replaced by one rename (:func:`clustermac.files.publish_folder`).
        A reader sees the old index or the new one, never a mix; a kill at any moment leaves
        the old one loadable, and the next save removes what the killed one left. The save
        holds the output lock of ``path`` (a concurrent writer gets
        :class:`~clustermac.OutputLockedError`). An existing index at ``path`` (of this or the
        0.1.0 layout) is replaced; anything else there is refused.
        """
        target = Path(path)
        if target.exists() and not _is_index_folder(target):
            raise ValueError(f"path: {target} exists and is not a clustermac index directory; refusing to overwrite it")
        info_bytes = None
        if info is not None:
            if not isinstance(info, Mapping):
                raise ValueError(f"info: expected a dict (saved as {INFO_FILE}), got {type(info).__name__}")
            try:
                info_bytes = json.dumps(dict(info), indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as error:
                raise ValueError(f"info: cannot be written as JSON ({error})") from error
        with files.output_lock(target, "Index.save"):
            files.remove_stale_temporaries(target)  # `.NAME.tmp-*` folders of killed 0.1.0 saves
            if target.exists() and not _is_index_folder(target):  # re-checked under the lock
                raise ValueError(f"path: {target} exists and is not a clustermac index directory")

            def write(staging: Path) -> None:
                data_files = {}
                if self._backend == "faiss":
                    faiss = _import_faiss()
                    faiss.write_index(self._writable_faiss(), str(staging / FAISS_FILE))
                    _fsync_file(staging / FAISS_FILE)
                    data_files[FAISS_FILE] = staging / FAISS_FILE
                else:
                    self._write_vectors(staging / VECTORS_FILE)
                    data_files[VECTORS_FILE] = staging / VECTORS_FILE
                files.crash_point("index_save_data")
                for file in self._names.write(staging):
                    data_files[file.name] = file
                if self._sources.rows is not None:
                    with open(staging / RESCORE_ROWS_FILE, "wb") as f:
                        np.save(f, self._sources.rows.astype("<i8"))
                    _fsync_file(staging / RESCORE_ROWS_FILE)
                    data_files[RESCORE_ROWS_FILE] = staging / RESCORE_ROWS_FILE
                if info_bytes is not None:
                    _write_synced(staging / INFO_FILE, info_bytes)
                    data_files[INFO_FILE] = staging / INFO_FILE
                meta = {
                    "format": _FORMAT,
                    "version": _FORMAT_VERSION,
                    "dim": self._dim,
                    "count": len(self),
                    "backend": self._backend,
                    "faiss_factory": self._faiss_factory,
                    "faiss_nprobe": self._faiss_nprobe,
                    "rescore_sources": self._sources.sources,
                    "files": {
                        name: {"size": file.stat().st_size, "sha256": files.file_sha256(file)}
                        for name, file in data_files.items()
                    },
                }
                files.crash_point("index_save_meta")
                _write_synced(staging / META_FILE, json.dumps(meta, indent=1).encode("utf-8"))

            files.publish_folder(target, write)
            # The 0.1.0 layout kept the files at the top of the folder: CURRENT supersedes them.
            for legacy in _LEGACY_FILES:
                if (target / legacy).is_file():
                    (target / legacy).unlink()
        self._info = dict(info) if info is not None else {}

    def _write_vectors(self, file: Path) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (len(self), self._dim),
        }
        with open(file, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in self._chunks:
                for row in range(0, chunk.shape[0], _WRITE_ROWS):
                    f.write(np.ascontiguousarray(chunk[row : row + _WRITE_ROWS]).data)
            f.flush()
            os.fsync(f.fileno())

    @property
    def info(self) -> dict:
        """What was saved with the index (``Index.save(..., info=...)``; for 0.1.0 indexes the
        ``clustermac.json`` that ``clustermac index`` wrote beside it): {} when nothing."""
        return getattr(self, "_info", {})

    @classmethod
    def load(cls, path: PathLike, mmap: bool = True, n_threads: int = 0, *, verify: bool = True) -> Index:
        """Open an index written by :meth:`save` (or by clustermac 0.1.0).

        With ``mmap=True`` (exact backend) the vectors stay on disk and are paged in by the
        search; adding to such an index appends new vectors in memory (save again to persist
        them). A FAISS index is read with ``faiss.IO_FLAG_MMAP``: the inverted lists of IVF indexes
        (``IVF…,PQ…``, ``IVF…,SQ8``, ``OPQ…,IVF…``) stay on disk and are paged in by the search; other
        types (``Flat``, ``SQ8``, ``HNSW``) are read into memory. The first ``add``, ``remove`` or
        ``save`` reads a memory-mapped FAISS index into memory (its lists are read-only).
        Every file is validated before use: a malformed one raises
        :class:`~clustermac.CorruptFileError` naming it. ``verify=True`` (default) also reads
        the data once to check its SHA-256 (format 2 and 3) and that every vector is finite;
        ``verify=False`` skips that read for a trusted, very large exact index (sizes, shapes
        and the header are still checked; a FAISS file is always checked in full before FAISS
        reads it).
        """
        directory = Path(path)
        if not directory.is_dir():
            # clustermac 0.1.0 replaced an index by two renames; killed between them, it left the
            # previous index in `.NAME.old-*` and nothing at the path.
            hidden = sorted(directory.parent.glob(f".{glob.escape(directory.name)}.old-*/{META_FILE}"))
            if hidden and not directory.exists():
                raise CorruptFileError(
                    directory,
                    "no index here, but an interrupted save of clustermac 0.1.0 left the previous index in "
                    f"{hidden[-1].parent}; rename that folder to {directory.name} to use it",
                )
            raise CorruptFileError(directory, "not a clustermac index directory (no such folder)")
        version_folder = files.current_version(directory)
        root = version_folder if version_folder is not None else directory
        meta_file = root / META_FILE
        if not meta_file.is_file():
            raise CorruptFileError(directory, "not a clustermac index directory (no CURRENT and no meta.json)")
        meta = _checked_meta(meta_file, layout_v2=version_folder is not None)
        checked = meta.get("files", {})

        def verified(name: str, full: bool = True) -> Path:
            file = root / name
            if not file.is_file():
                raise CorruptFileError(file, "missing")
            expected = checked.get(name)
            if expected is not None:
                size = file.stat().st_size
                if size != expected["size"]:
                    raise CorruptFileError(file, f"has {size} bytes; meta.json records {expected['size']}")
                if full and files.file_sha256(file) != expected["sha256"]:
                    raise CorruptFileError(file, "its SHA-256 differs from the one meta.json records (damaged)")
            return file

        if meta["version"] >= 3:
            names = read_names(verified(BLOB_FILE), verified(OFFSETS_FILE), meta["count"])
        else:
            names = _read_json_names(verified(NAMES_FILE), meta["count"])
        sources = VectorSources(meta.get("rescore_sources"))
        if RESCORE_ROWS_FILE in checked:
            sources.rows = _read_rescore_rows(verified(RESCORE_ROWS_FILE), meta["count"], sources.total)
        info: dict = {}
        if INFO_FILE in checked or (root / INFO_FILE).is_file():
            info_file = verified(INFO_FILE)
            info = _read_json(info_file)
            if not isinstance(info, dict):
                raise CorruptFileError(info_file, f"expected a JSON object, found a JSON {type(info).__name__}")
        index = cls.__new__(cls)
        index._dim = meta["dim"]
        index._backend = meta["backend"]
        index._n_threads = int(n_threads)
        index._faiss_factory = meta["faiss_factory"]
        index._faiss_nprobe = meta["faiss_nprobe"]
        index._faiss_index = None
        index._faiss_mapped = None
        index._names = names
        index._sources = sources
        index._chunks = []
        index._info = info
        if index._backend == "faiss":
            faiss_file = verified(FAISS_FILE)  # size and SHA-256 before FAISS sees a byte
            _check_faiss_file(faiss_file, index._dim, len(names))
            faiss = _import_faiss()
            try:
                index._faiss_index = faiss.read_index(str(faiss_file), faiss.IO_FLAG_MMAP if mmap else 0)
                index._faiss_mapped = faiss_file if mmap else None
            except (RuntimeError, MemoryError) as error:
                raise CorruptFileError(faiss_file, f"FAISS cannot read it ({str(error).splitlines()[0]})") from error
            if index._faiss_index.ntotal != len(names) or index._faiss_index.d != index._dim:
                raise CorruptFileError(
                    faiss_file,
                    f"holds {index._faiss_index.ntotal} vectors of dimension {index._faiss_index.d}; "
                    f"meta.json says {len(names)} of dimension {index._dim}",
                )
        else:
            vectors_file = verified(VECTORS_FILE, full=verify)
            offset = _check_npy_header(vectors_file, (len(names), index._dim))
            if len(names):
                vectors = np.memmap(
                    vectors_file, dtype=np.float32, mode="r", offset=offset, shape=(len(names), index._dim)
                )
                if verify:
                    for row in range(0, len(names), _WRITE_ROWS):
                        if not np.isfinite(vectors[row : row + _WRITE_ROWS]).all():
                            bad = row + int(np.argmin(np.isfinite(vectors[row : row + _WRITE_ROWS]).all(axis=1)))
                            raise CorruptFileError(vectors_file, f"vector {bad} holds NaN or Inf")
                index._chunks.append(vectors if mmap else np.array(vectors))
        return index


FAISS_FILE = "faiss.index"
VECTORS_FILE = "vectors.npy"
NAMES_FILE = "names.json"  # format 1 and 2; format 3: names.utf8 + names.offsets.npy
RESCORE_ROWS_FILE = "rescore_rows.npy"
META_FILE = "meta.json"
INFO_FILE = "clustermac.json"
_LEGACY_FILES = (META_FILE, NAMES_FILE, VECTORS_FILE, FAISS_FILE, INFO_FILE)
# Upper bound on the vectors an index may declare (2**40 float32 values is 4 TB): a forged
# count or dim is refused before anything is allocated or mapped.
_MAX_VALUES = 1 << 40


def _is_index_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / files.POINTER_FILE).is_file() or (path / META_FILE).is_file() or not any(path.iterdir())
    )


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CorruptFileError(file, f"not readable JSON ({type(error).__name__}: {error})") from None


def _read_json_names(names_file: Path, count: int) -> NameList:
    """The names of a format 1 or 2 index: a JSON list of ``count`` strings."""
    names = _read_json(names_file)
    if not isinstance(names, list) or len(names) != count:
        found = f"{len(names)} names" if isinstance(names, list) else f"a JSON {type(names).__name__}"
        raise CorruptFileError(names_file, f"expected a list of {count} names, found {found}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise CorruptFileError(names_file, f"entry {i} is {type(name).__name__} {name!r}, not a string")
    try:
        return NameList(names)
    except ValueError as error:
        raise CorruptFileError(names_file, str(error)) from None


def _read_rescore_rows(file: Path, count: int, total: int) -> np.ndarray:
    """The source row of each index row (int64, -1 = none), checked against the sources' size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        shape, fortran, dtype, offset = files.read_npy_header(f, file)
        if dtype != np.dtype("<i8") or fortran or tuple(shape) != (count,) or size != offset + 8 * count:
            raise CorruptFileError(file, f"expected {count} little-endian int64 rows, got {dtype} {tuple(shape)}")
        rows = np.fromfile(f, dtype="<i8", count=count)
    if rows.size and (rows.min() < -1 or rows.max() >= total):
        raise CorruptFileError(file, f"rows must lie in [-1, {total}), the rows of the recorded sources")
    return rows.astype(np.int64)


def _remove_faiss_rows(index: Any, keep: np.ndarray, factory: str) -> None:
    """Remove the rows where ``keep`` is false from a FAISS index and number the rest 0, 1, ... again.

    Flat-code indexes (``Flat``, ``SQ8``, ``PQ``) renumber themselves; IVF indexes keep each entry's id,
    so the ids in every inverted list are mapped to their new row numbers."""
    faiss = _import_faiss()
    removed = np.flatnonzero(~keep).astype(np.int64)
    try:
        count = index.remove_ids(faiss.IDSelectorBatch(removed.size, faiss.swig_ptr(removed)))
    except RuntimeError as error:
        raise ValueError(
            f"remove: the FAISS index {factory!r} cannot remove vectors ({_faiss_reason(error)})"
        ) from None
    if count != removed.size:
        raise ValueError(f"remove: FAISS removed {count} vectors of {factory!r}, expected {removed.size}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    new_row = np.cumsum(keep, dtype=np.int64) - 1
    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            ids[:] = new_row[ids]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _checked_meta(meta_file: Path, layout_v2: bool) -> dict:
    meta = _read_json(meta_file)
    if not isinstance(meta, dict):
        raise CorruptFileError(meta_file, f"expected a JSON object, found a JSON {type(meta).__name__}")
    if meta.get("format") != _FORMAT:
        raise CorruptFileError(meta_file, f"not a clustermac index (format {str(meta.get('format'))[:40]!r})")
    version = meta.get("version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise CorruptFileError(
            meta_file,
            f"not a clustermac index of version {' or '.join(map(str, _READABLE_VERSIONS))} "
            f"(version {str(version)[:40]!r}; a newer clustermac may read it)",
        )
    if layout_v2 != (version >= 2):
        raise CorruptFileError(
            meta_file, f"version {version} in a {'version folder' if layout_v2 else 'top-level'} layout"
        )
    dim, count = meta.get("dim"), meta.get("count")
    if not _positive_int(dim):
        raise CorruptFileError(meta_file, f"'dim' is {str(dim)[:40]!r}; expected a positive integer")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise CorruptFileError(meta_file, f"'count' is {str(count)[:40]!r}; expected an integer >= 0")
    if count * dim > _MAX_VALUES:
        raise CorruptFileError(meta_file, f"declares {count} vectors of dimension {dim}, beyond any real index")
    if meta.get("backend") not in ("exact", "faiss"):
        raise CorruptFileError(
            meta_file, f"'backend' is {str(meta.get('backend'))[:40]!r}; expected 'exact' or 'faiss'"
        )
    meta.setdefault("faiss_factory", "SQ8")
    meta.setdefault("faiss_nprobe", 16)
    if not isinstance(meta["faiss_factory"], str) or not _positive_int(meta["faiss_nprobe"]):
        raise CorruptFileError(meta_file, "'faiss_factory' must be a string and 'faiss_nprobe' a positive integer")
    if version >= 2:
        recorded = meta.get("files")
        data = FAISS_FILE if meta["backend"] == "faiss" else VECTORS_FILE
        needed = [BLOB_FILE, OFFSETS_FILE, data] if version >= 3 else [NAMES_FILE, data]
        if not isinstance(recorded, dict) or any(name not in recorded for name in needed):
            raise CorruptFileError(meta_file, f"'files' must record the size and SHA-256 of {', '.join(needed)}")
        known = (FAISS_FILE, VECTORS_FILE, INFO_FILE) + (
            (BLOB_FILE, OFFSETS_FILE, RESCORE_ROWS_FILE) if version >= 3 else (NAMES_FILE,)
        )
        for name, entry in recorded.items():
            if (
                name not in known
                or not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int)
                or isinstance(entry.get("size"), bool)
                or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str)
                or len(entry["sha256"]) != 64
            ):
                raise CorruptFileError(
                    meta_file, f"'files' entry {str(name)[:40]!r} is not {{size, sha256}} of a known file"
                )
    else:
        meta.pop("files", None)
    sources = meta.setdefault("rescore_sources", [])
    if not isinstance(sources, list) or not all(
        isinstance(x, dict)
        and isinstance(x.get("path"), str)
        and isinstance(x.get("fingerprint"), str)
        and _positive_int(x.get("rows"))
        for x in sources
    ):
        raise CorruptFileError(meta_file, "'rescore_sources' must be a list of {path, fingerprint, rows}")
    return meta


def _check_npy_header(file: Path, shape: tuple[int, int]) -> int:
    """Validate a ``.npy`` header (float32, C order, ``shape``, and exactly the bytes that
    shape needs) without trusting it; returns the offset of the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        found, fortran, dtype, offset = files.read_npy_header(f, file)
    if dtype != np.dtype("<f4") or fortran or tuple(found) != shape:
        raise CorruptFileError(
            file,
            f"expected C-contiguous float32 of shape {shape}, got {dtype} {tuple(found)}"
            + (" in Fortran order" if fortran else ""),
        )
    needed = offset + shape[0] * shape[1] * 4
    if size != needed:
        raise CorruptFileError(
            file, f"has {size} bytes; its header and shape {shape} need {needed} (truncated or padded)"
        )
    return offset


_FAISS_HEADER = struct.Struct("<4siqqq?i")  # fourcc, d, ntotal, two dummies, is_trained, metric


def _check_faiss_file(file: Path, dim: int, count: int) -> None:
    """Check a FAISS file before FAISS reads it: the common header must match ``meta.json``
    and, for the flat and scalar-quantizer indexes, every length field must add up to exactly
    the file's size (a forged length would make FAISS allocate whatever it says)."""
    with open(file, "rb") as f:
        data = f.read(_FAISS_HEADER.size)
        if data[:4] in (b"IxFI", b"IxF2", b"IxSQ"):  # the length fields are checked below: read it all
            data += f.read()
    if len(data) < _FAISS_HEADER.size:
        raise CorruptFileError(file, f"has {len(data)} bytes, shorter than a FAISS header")
    fourcc, d, ntotal, _, _, trained, metric = _FAISS_HEADER.unpack_from(data)
    if d != dim or ntotal != count:
        raise CorruptFileError(file, f"its header says {ntotal} vectors of dimension {d}; meta.json {count} of {dim}")
    if not trained or metric != 0:
        raise CorruptFileError(file, "its header is not a trained inner-product index")
    position = _FAISS_HEADER.size

    def take(fmt: str) -> tuple:
        nonlocal position
        unit = struct.Struct(fmt)
        if position + unit.size > len(data):
            raise CorruptFileError(file, f"truncated at byte {position}")
        values = unit.unpack_from(data, position)
        position += unit.size
        return values

    def skip_vector(item: int, expected: int | None) -> None:
        nonlocal position
        (n,) = take("<Q")
        if expected is not None and n != expected:
            raise CorruptFileError(file, f"a vector at byte {position - 8} holds {n} items; expected {expected}")
        if n * item > len(data) - position:
            raise CorruptFileError(file, f"a vector at byte {position - 8} claims {n * item} bytes; the file has fewer")
        position += n * item

    if fourcc in (b"IxFI", b"IxF2"):  # (other types: only the header was read)
        skip_vector(4, count * dim)
    elif fourcc == b"IxSQ":
        _, _, _, sq_dim, code_size = take("<iifQQ")
        if sq_dim != dim or not 1 <= code_size <= 4 * dim:
            raise CorruptFileError(file, f"scalar quantizer of dimension {sq_dim} with {code_size}-byte codes")
        skip_vector(4, None)
        skip_vector(1, count * code_size)
    else:
        return  # other index types: the header only (format 2 files are also covered by SHA-256)
    if position != len(data):
        raise CorruptFileError(file, f"has {len(data)} bytes; its contents end at byte {position}")


def _faiss_reason(error: BaseException) -> str:
    """FAISS's own words without its C++ location prefix (``Error in ... at file:line: ``)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = re.search(r"(?:Error: )?'[^']*' failed: (.*)$", text) or re.search(r"\.(?:cpp|h):\d+: (.*)$", text)
    return match.group(1).strip() if match else text


def _training_problem(count: int, error: BaseException) -> str:
    reason = _faiss_reason(error)
    needed = re.search(r"at least as large as number of clusters \((\d+)\)", reason)
    if needed:
        return (
            f"needs at least {needed.group(1)} training vectors (one per cluster), got {count} vectors; "
            "give more vectors or choose fewer clusters"
        )
    return f"cannot be trained on {count} vectors ({reason})"


def _set_search_parameters(index: Any, nprobe: int, efsearch: int | None) -> None:
    """Set ``nprobe`` on the IVF part of ``index`` and ``efSearch`` on its HNSW part, if any."""
    faiss = _import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)
    if efsearch is None:
        return
    for candidate in (index, getattr(ivf, "quantizer", None)):
        if candidate is None:
            continue
        while isinstance(candidate, faiss.IndexPreTransform):
            candidate = candidate.index
        candidate = faiss.downcast_index(candidate)
        if hasattr(candidate, "hnsw"):
            candidate.hnsw.efSearch = int(efsearch)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "backend='faiss' needs the faiss-cpu package: pip install 'clustermac[faiss]' (or pip install faiss-cpu)"
        ) from error
    return faiss
