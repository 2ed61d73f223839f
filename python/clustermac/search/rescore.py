"""Exact re-scoring of a compressed index's candidates from the float vectors it was built from.

A FAISS index keeps compressed codes; its scores are approximate. :class:`VectorSources` records
where the float32 vectors of the index's rows are (descriptor files or folders that
:func:`clustermac.load_descriptors` reads, or plain ``.npy`` files), with a fingerprint of each, and
:func:`rescore_candidates` re-ranks the top candidates of every query by exact dot products with
those vectors, read memory-mapped (only the candidates' rows are paged in).

The fingerprint (:func:`vectors_fingerprint`) is a SHA-256 of the shape and of 4,096 evenly spaced
rows: it catches a replaced, re-extracted, truncated or reordered source without reading the whole
file (it is not a checksum of every byte; the descriptor files carry their own).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..errors import CorruptFileError

__all__ = ["VectorSources", "vectors_fingerprint", "open_vectors", "rescore_candidates"]

_FINGERPRINT_ROWS = 4096
# Queries re-scored per step: bounds the gathered candidate vectors (64 × R × dim floats).
_QUERIES_PER_STEP = 64


def vectors_fingerprint(vectors: Any) -> str:
    """SHA-256 (hex) of ``vectors``' shape and of up to 4,096 evenly spaced rows (as float32)."""
    count, dim = vectors.shape
    digest = hashlib.sha256(f"{count}x{dim}".encode())
    if count:
        rows = np.unique(np.linspace(0, count - 1, min(count, _FINGERPRINT_ROWS)).astype(np.int64))
        digest.update(np.ascontiguousarray(np.asarray(vectors[rows], dtype=np.float32)).tobytes())
    return digest.hexdigest()


def open_vectors(path: PathLike) -> Any:
    """The float vectors at ``path``, memory-mapped: a descriptor file or folder of ``clustermac extract``
    (through :func:`clustermac.load_descriptors`, unverified: the fingerprint is checked instead) or a plain
    2-D float32 ``.npy`` file. Raises :class:`~clustermac.CorruptFileError` naming ``path``."""
    from ..descriptors import load_descriptors
    from ..descriptors.store import manifest_path

    path = Path(path)
    if not path.exists():
        raise CorruptFileError(path, "the float vectors for re-scoring are missing (moved or deleted?)")
    if path.is_file() and path.suffix == ".npy" and not manifest_path(path).is_file():
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CorruptFileError(path, f"not a readable .npy file ({error})") from None
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise CorruptFileError(path, f"expected a 2-D float32 array, got {vectors.dtype} {vectors.shape}")
        return vectors
    return load_descriptors(path, verify=False)[0]


class VectorSources:
    """Where the float vectors of an index's rows are: sources (path, fingerprint, rows) concatenated in
    order, and the source row of every index row (``None``: row i of the index is row i of the
    concatenation, for the rows the sources cover; -1: no float vector for that row)."""

    def __init__(self, sources: list[dict] | None = None, rows: np.ndarray | None = None) -> None:
        self.sources: list[dict] = list(sources or [])
        self.rows = rows
        self._opened: list[Any] | None = None

    @property
    def total(self) -> int:
        """Rows of all sources together."""
        return sum(s["rows"] for s in self.sources)

    def row_map(self, count: int) -> np.ndarray:
        """int64 source row of each of ``count`` index rows (-1: none)."""
        if self.rows is not None:
            return self.rows
        out = np.full(count, -1, dtype=np.int64)
        covered = min(count, self.total)
        out[:covered] = np.arange(covered)
        return out

    def source_rows(self, index_rows: np.ndarray) -> np.ndarray:
        """The source row of each of ``index_rows`` (all >= 0); -1 where there is none."""
        if self.rows is not None:
            return self.rows[index_rows]
        return np.where(index_rows < self.total, index_rows, -1)

    def attach(self, path: PathLike, first_row: int, count: int, dim: int) -> None:
        """Record that index rows ``first_row ...`` (as many as the source has) are the rows of ``path``."""
        vectors = open_vectors(path)
        if vectors.shape[1] != dim:
            raise ValueError(f"{path}: vectors of dimension {vectors.shape[1]}; the index has dimension {dim}")
        if not 0 <= first_row <= count - vectors.shape[0]:
            raise ValueError(
                f"{path}: {vectors.shape[0]} vectors from row {first_row} do not fit an index of {count} rows"
            )
        base = self.total
        if self.rows is None and first_row != base:
            self.rows = self.row_map(count)
        if self.rows is not None:
            self.rows[first_row : first_row + vectors.shape[0]] = base + np.arange(vectors.shape[0])
        self.sources.append(
            {"path": str(Path(path).resolve()), "fingerprint": vectors_fingerprint(vectors), "rows": vectors.shape[0]}
        )
        self._opened = None

    def grown(self, count: int, added: int) -> None:
        """``added`` rows without float vectors were appended to an index of ``count`` rows."""
        if self.rows is not None:
            self.rows = np.concatenate([self.rows, np.full(added, -1, dtype=np.int64)])

    def kept(self, keep: np.ndarray) -> None:
        """Only the index rows where ``keep`` is true remain."""
        if self.sources:
            self.rows = self.row_map(len(keep))[keep]

    def _open(self) -> list[Any]:
        if self._opened is None:
            opened = []
            for source in self.sources:
                vectors = open_vectors(source["path"])
                if vectors.shape[0] != source["rows"] or vectors_fingerprint(vectors) != source["fingerprint"]:
                    raise CorruptFileError(
                        source["path"],
                        f"changed since the index was built (now {vectors.shape[0]} vectors, "
                        f"{source['rows']} recorded, or different contents): re-attach it or rebuild the index",
                    )
                opened.append(vectors)
            self._opened = opened
        return self._opened

    def gather(self, source_rows: np.ndarray) -> np.ndarray:
        """float32 vectors of ``source_rows`` (all >= 0), read in increasing row order from each source."""
        opened = self._open()
        out = np.empty((source_rows.size, opened[0].shape[1]), dtype=np.float32)
        start = 0
        for vectors in opened:
            inside = (source_rows >= start) & (source_rows < start + vectors.shape[0])
            if inside.any():
                wanted, back = np.unique(source_rows[inside] - start, return_inverse=True)
                out[inside] = np.asarray(vectors[wanted], dtype=np.float32)[back]
            start += vectors.shape[0]
        return out


def rescore_candidates(
    queries: np.ndarray, candidates: np.ndarray, sources: VectorSources, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's ``candidates`` (Q × R index rows, -1 = none) by exact float32 dot products with
    their vectors in ``sources``; returns the top ``k`` (scores descending, ties by the smaller index row;
    -inf / -1 where a query has fewer than ``k`` candidates)."""
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    indices_out = np.full((len(queries), k), -1, dtype=np.int64)
    for first in range(0, len(queries), _QUERIES_PER_STEP):
        block = candidates[first : first + _QUERIES_PER_STEP]
        valid = block >= 0
        rows = np.where(valid, sources.source_rows(np.where(valid, block, 0)), -1)
        if (valid & (rows < 0)).any():
            bad = int(block[valid & (rows < 0)][0])
            raise ValueError(f"rescore: index row {bad} has no float vector (added without a source to re-score from)")
        vectors = np.zeros(block.shape + (queries.shape[1],), dtype=np.float32)
        vectors[valid] = sources.gather(rows[valid])
        scores = np.einsum("qrd,qd->qr", vectors, queries[first : first + len(block)], dtype=np.float32)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        ranked = np.where(valid, block, np.iinfo(np.int64).max)  # invalid candidates sort last
        order = np.lexsort((ranked, -scores), axis=1)[:, :k]
        taken = min(k, block.shape[1])
        scores_out[first : first + len(block), :taken] = np.take_along_axis(scores, order, axis=1)
        indices_out[first : first + len(block), :taken] = np.where(
            np.take_along_axis(valid, order, axis=1), np.take_along_axis(block, order, axis=1), -1
        )
    return scores_out, indices_out
