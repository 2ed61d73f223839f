"""A searchable collection of descriptors with their image names.

:class:`Index` keeps float32 vectors (normally the l2-normalised descriptors of
:class:`clustermac.Extractor`, so that the dot product is the cosine similarity) and runs
exact top-k search in the C++ core (:func:`clustermac.topk_search`: blocked matrix
products, partial selection, threads, GIL released). Vectors are held as a list of chunks:
``add`` appends a chunk (small trailing chunks are merged), ``load(mmap=True)`` maps the
saved vectors from disk, so a 1M × 512 index (2 GB) is searched without ever holding two
copies of it. An optional FAISS backend (``backend="faiss"``, compressed / IVF storage)
offers the same interface for collections that do not fit in memory as float32.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from .._typing import PathLike

__all__ = ["Index"]


_FORMAT = "clustermac-index"
_FORMAT_VERSION = 1
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
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or Inf values; expected only finite numbers")
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
        Indexes that need training are trained on the first ``add()`` batch, which must then
        be large enough for them (FAISS says how large).
    faiss_nprobe:
        Inverted lists visited per query for IVF indexes.
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
        self._names: list[str] = []
        self._faiss_factory = faiss_factory
        self._faiss_nprobe = int(faiss_nprobe)
        self._faiss_index: Any = None
        if backend == "faiss":
            faiss = _import_faiss()
            self._faiss_index = faiss.index_factory(self._dim, faiss_factory, faiss.METRIC_INNER_PRODUCT)

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
    def names(self) -> list[str]:
        """Image names in insertion order (the list itself: do not modify it)."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Index(dim={self._dim}, backend={self._backend!r}, size={len(self)})"

    # ------------------------------------------------------------------ adding
    def add(self, vectors: np.ndarray, names: Sequence[str]) -> None:
        """Append ``vectors`` (n × dim, or one vector of length dim) named ``names``.

        The vectors are copied (as float32); with the exact backend a small trailing chunk is
        merged with the new one, so adding in batches of any size keeps searches efficient.
        """
        matrix = _as_matrix(vectors, self._dim, "vectors")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if len(names) != matrix.shape[0]:
            raise ValueError(f"names: expected {matrix.shape[0]} names (one per vector), got {len(names)}")
        for name in names:
            if not isinstance(name, str):
                raise ValueError(f"names: expected strings, got {type(name).__name__} {name!r}")
        if matrix.shape[0] == 0:
            return
        if self._backend == "faiss":
            if not self._faiss_index.is_trained:
                try:
                    self._faiss_index.train(matrix)
                except RuntimeError as error:
                    raise ValueError(
                        f"vectors: the FAISS index {self._faiss_factory!r} must be trained on the first add() batch, "
                        f"and training on {matrix.shape[0]} vectors failed: {error}"
                    ) from error
            self._faiss_index.add(matrix)
        else:
            if matrix is vectors or (isinstance(vectors, np.ndarray) and np.may_share_memory(matrix, vectors)):
                matrix = matrix.copy()
            last = self._chunks[-1] if self._chunks else None
            if last is not None and not isinstance(last, np.memmap) and last.shape[0] < _MERGE_ROWS:
                self._chunks[-1] = np.concatenate([last, matrix], axis=0)
            else:
                self._chunks.append(matrix)
        self._names.extend(names)

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
    def search(self, queries: np.ndarray, k: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database vectors by dot product for each query.

        ``queries``: Q × dim (or one vector of length dim). ``k`` is capped at ``len(self)``.
        Returns (scores float32 Q×k sorted descending, indices int64 Q×k); the exact backend
        breaks ties by the smaller index. FAISS indexes may return index -1 (score -inf) when
        they find fewer than k candidates.
        """
        matrix = _as_matrix(queries, self._dim, "queries")
        if len(self) == 0:
            raise ValueError("search(): the index is empty; add() vectors first")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        k = min(int(k), len(self))
        if self._backend == "faiss":
            if hasattr(self._faiss_index, "nprobe"):
                self._faiss_index.nprobe = self._faiss_nprobe
            scores, indices = self._faiss_index.search(matrix, k)
            scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
            return scores, indices.astype(np.int64)
        parts_scores, parts_indices = [], []
        start = 0
        for chunk in self._chunks:
            chunk_k = min(k, chunk.shape[0])
            scores, indices = _core.topk_search(chunk, matrix, chunk_k, self._n_threads)
            parts_scores.append(scores)
            parts_indices.append(indices + start)
            start += chunk.shape[0]
        if len(parts_scores) == 1:
            return parts_scores[0], parts_indices[0]
        all_scores = np.concatenate(parts_scores, axis=1)
        all_indices = np.concatenate(parts_indices, axis=1)
        # Sort by score descending, then index ascending (lexsort: last key is primary).
        order = np.lexsort((all_indices, -all_scores), axis=1)[:, :k]
        return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_indices, order, axis=1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike) -> None:
        """Write the index to the directory ``path`` atomically.

        The directory holds ``meta.json``, ``names.json`` and ``vectors.npy`` (exact backend;
        written in blocks, so saving a memory-mapped index does not load it) or
        ``faiss.index``. Everything is written to a temporary directory beside ``path`` and
        renamed into place, so an interrupted save never leaves a half-written index; an
        existing index at ``path`` is replaced (anything else there is refused).
        """
        target = Path(path)
        if target.exists() and not (target.is_dir() and (target / "meta.json").is_file()):
            raise ValueError(f"path: {target} exists and is not a clustermac index directory; refusing to overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # the permissions of a plain mkdir, not mkdtemp's 0700
        try:
            meta = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "dim": self._dim,
                "count": len(self),
                "backend": self._backend,
                "faiss_factory": self._faiss_factory,
                "faiss_nprobe": self._faiss_nprobe,
            }
            if self._backend == "faiss":
                faiss = _import_faiss()
                faiss.write_index(self._faiss_index, str(temporary / "faiss.index"))
            else:
                self._write_vectors(temporary / "vectors.npy")
            with open(temporary / "names.json", "w", encoding="utf-8") as f:
                json.dump(self._names, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            with open(temporary / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if target.exists():
                # Directories cannot be renamed over one another: move the old one aside first.
                backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                backup.rmdir()
                os.rename(target, backup)
                os.rename(temporary, target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

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

    @classmethod
    def load(cls, path: PathLike, mmap: bool = True, n_threads: int = 0) -> Index:
        """Open an index written by :meth:`save`. With ``mmap=True`` (exact backend) the vectors
        stay on disk and are paged in by the search; adding to such an index appends new
        vectors in memory (save again to persist them)."""
        directory = Path(path)
        meta_file = directory / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"path: {directory} is not a clustermac index directory (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            names = json.loads((directory / "names.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"path: cannot read the index in {directory}: {error}") from error
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{meta_file}: not a clustermac index of version {_FORMAT_VERSION}")
        if not isinstance(names, list) or len(names) != meta["count"]:
            raise ValueError(f"{directory / 'names.json'}: expected {meta['count']} names")
        index = cls.__new__(cls)
        index._dim = int(meta["dim"])
        index._backend = meta["backend"]
        index._n_threads = int(n_threads)
        index._faiss_factory = meta.get("faiss_factory", "SQ8")
        index._faiss_nprobe = int(meta.get("faiss_nprobe", 16))
        index._faiss_index = None
        index._names = names
        index._chunks = []
        if index._backend == "faiss":
            faiss = _import_faiss()
            index._faiss_index = faiss.read_index(str(directory / "faiss.index"))
            if index._faiss_index.ntotal != len(names):
                raise ValueError(
                    f"{directory}: faiss.index holds {index._faiss_index.ntotal} vectors, names.json {len(names)}"
                )
        else:
            vectors = np.load(directory / "vectors.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            if (
                vectors.dtype != np.float32
                or vectors.shape != (len(names), index._dim)
                or not vectors.flags.c_contiguous
            ):
                raise ValueError(
                    f"{directory / 'vectors.npy'}: expected C-contiguous float32 of shape "
                    f"({len(names)}, {index._dim}), got {vectors.dtype} {vectors.shape}"
                )
            if len(names):
                index._chunks.append(vectors)
        return index


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "backend='faiss' needs the faiss-cpu package: pip install 'clustermac[faiss]' (or pip install faiss-cpu)"
        ) from error
    return faiss
