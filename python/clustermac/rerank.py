"""Spatial re-ranking by approximate max-pooling localisation (AML), with query expansion.

Tolias, Sicre & Jégou (ICLR 2016, Sec. 4–5) re-rank the top N (1000) images of the initial
ranking: in each one, AML finds the box whose approximate MAC vector best matches the
query's MAC vector (:func:`clustermac.aml_localize`: sums of x^p, p = 10, over the boxes of a
3-cell grid with aspect ratio within ×1.1 of the query's, 5 refinement rounds);
the image is re-scored by the similarity of the query descriptor to the descriptor (R-MAC or
ClusterMAC) computed inside that box; finally average query expansion with the top 5
localised descriptors re-scores the same N images.

This needs the database images' feature maps. :class:`FeatureMapStore` keeps them compactly
as Tolias does: 8 bits per activation, quantised per map with one scale (max / 255), in a
single memory-mappable file per collection (about 1.5 MB per VGG16 map at 1024 px). Codes
are stored channel-last (H×W×D), the layout the localisation kernel reads; for ClusterMAC each
map can carry its image's cluster label maps (int16, a few KB).

The descriptor computed inside a box is the caller's: pass ``descriptor_fn``, a callable
mapping a float32 D×h×w feature-map crop to an l2-normalised descriptor (the Extractor
supplies it for R-MAC or ClusterMAC). :class:`RMACInBox` computes R-MAC straight from the 8-bit
codes (:func:`clustermac._core.grid_mac_codes`: no dequantised crop, same bits), and
:class:`ClusterMACInBox` ClusterMAC from the codes and the cluster labels stored with them.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .descriptors import CLUSTER_POOLINGS, cluster_boxes
from .files import temporary_file_beside

__all__ = [
    "quantize_feature_map",
    "FeatureMapStore",
    "FeatureMapStoreWriter",
    "RerankResult",
    "RMACInBox",
    "ClusterMACInBox",
    "aml_rerank",
]

PathLike = Union[str, "os.PathLike[str]"]

_MAGIC = b"CMACFM02"  # version 2: optional cluster label maps per feature map
_MAGIC_V1 = b"CMACFM01"  # version 1 (no labels) is still read
_PREAMBLE = struct.Struct("<8sQQ")  # magic, table offset, count
_PAYLOAD_START = 64  # payload is 64-byte aligned after the preamble
_TABLE_DTYPE_V1 = np.dtype([("offset", "<u8"), ("channels", "<u4"), ("height", "<u4"), ("width", "<u4"), ("scale", "<f4")])
# labels_offset: int16 partitions × H × W label maps (-1 = masked), `partitions` of them.
_TABLE_DTYPE = np.dtype(_TABLE_DTYPE_V1.descr + [("labels_offset", "<u8"), ("partitions", "<u4")])
_LABEL_LIMIT = np.iinfo(np.int16).max


def quantize_feature_map(feature_map: np.ndarray) -> Tuple[np.ndarray, float]:
    """8-bit quantisation of a non-negative (post-ReLU) D×H×W map: codes = round(x / scale),
    scale = max(x) / 255, so x ≈ codes · scale. Negative values are clipped to 0. Returns
    (uint8 codes D×H×W, scale); an all-zero map has scale 0."""
    fmap = np.asarray(feature_map)
    if fmap.ndim != 3 or 0 in fmap.shape:
        raise ValueError(f"feature_map: expected a non-empty D×H×W array, got shape {fmap.shape}")
    if not np.issubdtype(fmap.dtype, np.floating) or not np.isfinite(fmap).all():
        raise ValueError(f"feature_map: expected finite floating-point values, got dtype {fmap.dtype}")
    largest = float(fmap.max())
    if largest <= 0.0:
        return np.zeros(fmap.shape, dtype=np.uint8), 0.0
    scale = largest / 255.0
    codes = np.rint(np.clip(fmap, 0.0, None) / scale)
    return np.clip(codes, 0, 255).astype(np.uint8), scale


class FeatureMapStoreWriter:
    """Streams 8-bit quantised feature maps into one store file.

    Use as a context manager; the file appears at ``path`` (atomic rename) only when the
    block exits without an exception::

        with FeatureMapStoreWriter("db.cmfm") as writer:
            for name, fmap in maps:
                writer.add(fmap, name)
    """

    def __init__(self, path: PathLike) -> None:
        self._path = Path(path)
        handle, temporary = temporary_file_beside(self._path)  # plain-open permissions, not mkstemp's 0600
        self._temporary = Path(temporary)
        self._file = os.fdopen(handle, "wb")
        self._file.write(b"\0" * _PAYLOAD_START)
        self._rows: List[Tuple[int, int, int, int, float, int, int]] = []
        self._names: List[str] = []
        self._channels: Optional[int] = None

    def add(self, feature_map: np.ndarray, name: str, labels: Sequence[np.ndarray] = ()) -> None:
        """Quantise and append one D×H×W map (all maps of a store have the same D), with
        optional cluster label maps (H×W integers in [-1, 32767], -1 = masked; e.g.
        :meth:`clustermac.Extractor.cluster_labels`) for re-ranking with ClusterMAC."""
        if not isinstance(name, str):
            raise ValueError(f"name: expected a string, got {type(name).__name__}")
        codes, scale = quantize_feature_map(feature_map)
        if self._channels is None:
            self._channels = codes.shape[0]
        elif codes.shape[0] != self._channels:
            raise ValueError(f"feature_map: expected {self._channels} channels like the maps already stored, "
                             f"got shape {codes.shape}")
        label_maps = [self._checked_labels(np.asarray(lab), k, codes.shape[1:]) for k, lab in enumerate(labels)]
        offset = self._write_aligned(np.ascontiguousarray(codes.transpose(1, 2, 0)).tobytes())  # channel-last
        labels_offset = self._write_aligned(b"".join(lab.astype("<i2").tobytes() for lab in label_maps))
        self._rows.append((offset, codes.shape[0], codes.shape[1], codes.shape[2], scale, labels_offset, len(label_maps)))
        self._names.append(name)

    @staticmethod
    def _checked_labels(labels: np.ndarray, k: int, shape: Tuple[int, int]) -> np.ndarray:
        if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels[{k}]: expected an integer array of shape {shape} (the map's H×W), "
                             f"got {labels.dtype} of shape {labels.shape}")
        if labels.size and (labels.min() < -1 or labels.max() > _LABEL_LIMIT):
            raise ValueError(f"labels[{k}]: expected values in [-1, {_LABEL_LIMIT}], got [{labels.min()}, {labels.max()}]")
        return labels

    def _write_aligned(self, payload: bytes) -> int:
        offset = self._file.tell()
        self._file.write(payload)
        self._file.write(b"\0" * (-self._file.tell() % 64))
        return offset

    def close(self) -> None:
        """Write the table and names, then move the file into place."""
        table = np.array(self._rows, dtype=_TABLE_DTYPE)
        table_offset = self._file.tell()
        self._file.write(table.tobytes())
        names = json.dumps(self._names, ensure_ascii=False).encode("utf-8")
        self._file.write(struct.pack("<Q", len(names)))
        self._file.write(names)
        self._file.seek(0)
        self._file.write(_PREAMBLE.pack(_MAGIC, table_offset, len(self._rows)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temporary, self._path)

    def abort(self) -> None:
        """Discard everything written."""
        self._file.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> "FeatureMapStoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureMapStore:
    """Read access to a store written by :class:`FeatureMapStoreWriter` (memory-mapped:
    opening is instant and only the maps used are read from disk)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < _PAYLOAD_START:
            raise ValueError(f"{self.path}: too short to be a feature-map store")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        magic, table_offset, count = _PREAMBLE.unpack(bytes(self._data[:_PREAMBLE.size]))
        if magic not in (_MAGIC, _MAGIC_V1):
            raise ValueError(f"{self.path}: not a clustermac feature-map store (bad magic {magic!r})")
        table_dtype = _TABLE_DTYPE if magic == _MAGIC else _TABLE_DTYPE_V1
        table_end = table_offset + count * table_dtype.itemsize
        if table_end + 8 > size:
            raise ValueError(f"{self.path}: truncated (table ends at byte {table_end + 8}, file has {size})")
        self._table = np.frombuffer(self._data, dtype=table_dtype, count=count, offset=table_offset)
        (names_length,) = struct.unpack("<Q", bytes(self._data[table_end:table_end + 8]))
        if table_end + 8 + names_length > size:
            raise ValueError(f"{self.path}: truncated names")
        self.names: List[str] = json.loads(bytes(self._data[table_end + 8:table_end + 8 + names_length]).decode("utf-8"))
        cells = self._table["height"].astype(np.uint64) * self._table["width"]
        ends = self._table["offset"] + self._table["channels"].astype(np.uint64) * cells
        if magic == _MAGIC:
            ends = np.maximum(ends, self._table["labels_offset"] + 2 * self._table["partitions"].astype(np.uint64) * cells)
        if count and (ends.max() > table_offset or len(self.names) != count):
            raise ValueError(f"{self.path}: inconsistent table")

    def __len__(self) -> int:
        return int(self._table.shape[0])

    def _row(self, index: int) -> np.void:
        if not (-len(self) <= index < len(self)):
            raise IndexError(f"index {index} out of range for a store of {len(self)} maps")
        return self._table[index]

    def codes(self, index: int) -> np.ndarray:
        """uint8 codes of map ``index``, channel-last H×W×D (a read-only view into the file)."""
        row = self._row(index)
        shape = (int(row["height"]), int(row["width"]), int(row["channels"]))
        start = int(row["offset"])
        return self._data[start:start + shape[0] * shape[1] * shape[2]].reshape(shape)

    def labels(self, index: int) -> List[np.ndarray]:
        """The cluster label maps stored with map ``index`` (int32 H×W each; [] when none)."""
        row = self._row(index)
        if "partitions" not in row.dtype.names or int(row["partitions"]) == 0:
            return []
        height, width, start = int(row["height"]), int(row["width"]), int(row["labels_offset"])
        stored = np.frombuffer(self._data, dtype="<i2", count=int(row["partitions"]) * height * width, offset=start)
        return [np.ascontiguousarray(part, dtype=np.int32) for part in stored.reshape(-1, height, width)]

    def scale(self, index: int) -> float:
        """Dequantisation scale of map ``index`` (value = code · scale)."""
        return float(self._row(index)["scale"])

    def feature_map(self, index: int, box: Optional[Sequence[int]] = None) -> np.ndarray:
        """Dequantised float32 D×H×W map ``index``, or its crop [x0, y0, x1, y1) in cells."""
        box_values = None if box is None else [int(v) for v in box]
        return _core.dequantize_codes(self.codes(index), box_values, self.scale(index))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.feature_map(i)


class RMACInBox:
    """The R-MAC descriptor of a feature map or of a box of one, for :func:`aml_rerank`.

    Tolias' grid (:func:`clustermac.rmac_regions` with ``levels``) → regional MAC → l2 →
    PCA-whitening (when ``whitening_mean`` and ``whitening_projection`` from
    :func:`clustermac.fit_pca_whitening` are given) → l2 → sum → l2; the same as
    :meth:`clustermac.Extractor.descriptor_from_feature_map` with method ``"rmac"``.

    Call it on a float32 D×h×w crop (the generic ``descriptor_fn`` interface), or use
    :meth:`from_codes` (:meth:`from_store`, which :func:`aml_rerank` calls) on a box of 8-bit
    codes: the regional max is then taken on the codes themselves, which gives the same
    descriptor bit for bit without writing a dequantised crop.
    """

    def __init__(self, whitening_mean: Optional[np.ndarray] = None, whitening_projection: Optional[np.ndarray] = None,
                 levels: int = 3) -> None:
        if (whitening_mean is None) != (whitening_projection is None):
            raise ValueError("whitening_mean and whitening_projection: give both (from fit_pca_whitening) or neither, "
                             f"got only {'whitening_mean' if whitening_projection is None else 'whitening_projection'}")
        if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels: expected an integer >= 1, got {levels!r}")
        self.whitening_mean = whitening_mean
        self.whitening_projection = whitening_projection
        self.levels = int(levels)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """The float32 descriptor of a float32 D×h×w feature map (or crop of one)."""
        crop = np.ascontiguousarray(crop, dtype=np.float32)
        if crop.ndim != 3:
            raise ValueError(f"crop: expected a D×h×w feature map, got shape {crop.shape}")
        regions = _core.rmac_regions(crop.shape[1], crop.shape[2], self.levels)
        return _core.aggregate_regions(_core.grid_mac(crop, regions), self.whitening_mean, self.whitening_projection)

    def from_codes(self, codes: np.ndarray, box: Optional[Sequence[int]], scale: float) -> np.ndarray:
        """The descriptor of the box [x0, y0, x1, y1) (cells; None: the whole map) of uint8
        channel-last H×W×D codes with value = code · scale, e.g. ``store.codes(i)`` and
        ``store.scale(i)`` of a :class:`FeatureMapStore`. Equal bit for bit to
        ``self(store.feature_map(i, box))``."""
        return _core.aggregate_regions(self.regional_vectors_from_codes(codes, box, scale), self.whitening_mean,
                                       self.whitening_projection)

    def regional_vectors_from_codes(self, codes: np.ndarray, box: Optional[Sequence[int]], scale: float) -> np.ndarray:
        """The un-normalised regional MAC vectors (R×D) of the grid of the box, from the codes."""
        if box is None:
            shape = np.shape(codes)
            if len(shape) != 3:
                raise ValueError(f"codes: expected a uint8 array of shape (H, W, D), got shape {shape}")
            height, width = shape[0], shape[1]
        else:
            corners = [int(v) for v in box]
            if len(corners) != 4 or corners[2] <= corners[0] or corners[3] <= corners[1]:
                raise ValueError(f"box: expected [x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {corners}")
            height, width = corners[3] - corners[1], corners[2] - corners[0]
        return _core.grid_mac_codes(codes, box, _core.rmac_regions(height, width, self.levels), scale)

    def from_store(self, store: "FeatureMapStore", index: int, box: Optional[Sequence[int]]) -> np.ndarray:
        """The descriptor of the box of map ``index`` of ``store`` (what :func:`aml_rerank` calls)."""
        return self.from_codes(store.codes(index), box, store.scale(index))


class ClusterMACInBox:
    """The ClusterMAC descriptor inside a box of a stored feature map, for :func:`aml_rerank`.

    The clusters are those of the whole database image, stored with its codes
    (``FeatureMapStoreWriter.add(fmap, name, labels=extractor.cluster_labels(fmap, rgb))``):
    each cluster's MAC over its cells inside the box (:func:`clustermac._core.region_mac_codes`,
    on the 8-bit codes; with ``cluster_pooling="box"`` over the bounding box of those cells),
    optionally with R-MAC's grid of the box first (``add_grid_regions``), then
    l2 → PCA-whitening → l2, sum, l2 as in :meth:`clustermac.Extractor.descriptor_from_feature_map`.
    Clusters with no cell in the box drop out.

    This is our choice for re-ranking, not the paper's text (which does not say how the
    descriptor inside the box is formed): re-clustering the activations inside every box, the
    other reading, costs a full Normalized Cut per candidate (~0.1 s for a VGG16 map, so ~100 s
    per query for the top 1000) and leaves out the RGB clusters, whose image is not stored.
    """

    def __init__(self, whitening_mean: Optional[np.ndarray] = None, whitening_projection: Optional[np.ndarray] = None,
                 add_grid_regions: bool = False, levels: int = 3, cluster_pooling: str = "mask") -> None:
        if cluster_pooling not in CLUSTER_POOLINGS:
            raise ValueError(f"cluster_pooling: expected one of {CLUSTER_POOLINGS}, got {cluster_pooling!r}")
        self._grid = RMACInBox(whitening_mean, whitening_projection, levels)
        self.add_grid_regions = bool(add_grid_regions)
        self.cluster_pooling = cluster_pooling

    def from_store(self, store: "FeatureMapStore", index: int, box: Optional[Sequence[int]]) -> np.ndarray:
        """The descriptor of the box [x0, y0, x1, y1) (cells; None: the whole map) of map ``index``."""
        labels = store.labels(index)
        if not labels:
            raise ValueError(f"{store.path}: map {index} ({store.names[index]!r}) has no cluster labels; write them "
                             "with FeatureMapStoreWriter.add(fmap, name, labels=extractor.cluster_labels(fmap, rgb))")
        codes, scale = store.codes(index), store.scale(index)
        blocks = [self._grid.regional_vectors_from_codes(codes, box, scale)] if self.add_grid_regions else []
        for partition in labels:
            if self.cluster_pooling == "box":  # the boxes of the clusters' cells inside the box
                inside = partition if box is None else partition[box[1]:box[3], box[0]:box[2]]
                blocks.append(_core.grid_mac_codes(codes, box, cluster_boxes(np.ascontiguousarray(inside)), scale))
            else:
                blocks.append(_core.region_mac_codes(codes, partition, box, scale))
        return _core.aggregate_regions(np.concatenate(blocks, axis=0), self._grid.whitening_mean,
                                       self._grid.whitening_projection)


@dataclass
class RerankResult:
    """Outcome of :func:`aml_rerank`.

    indices: the candidates re-ordered (the re-ranked top N first, then the rest unchanged).
    scores: float32 scores of the re-ranked top N (after QE if enabled), aligned with
        ``indices[:len(scores)]``.
    boxes: int32 top_n × 4 AML boxes [x0, y0, x1, y1) in feature-map cells, aligned with
        ``indices[:len(boxes)]``.
    expanded_query: the query after QE (or the query descriptor itself when qe_k = 0).
    """

    indices: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    expanded_query: np.ndarray


def aml_rerank(
    query_mac: np.ndarray,
    query_descriptor: np.ndarray,
    candidates: Sequence[int],
    store: FeatureMapStore,
    descriptor_fn: Callable[[np.ndarray], np.ndarray],
    *,
    top_n: int = 1000,
    query_aspect: Optional[float] = None,
    p: float = 10.0,
    step: int = 3,
    aspect_tolerance: float = 1.1,
    refine_iterations: int = 5,
    qe_k: int = 5,
    n_threads: int = 0,
) -> RerankResult:
    """Re-rank the top ``top_n`` candidates by AML localisation, then query expansion.

    Parameters
    ----------
    query_mac:
        float32 D: the query's MAC vector (max-pooling of its feature map over the query box),
        used to localise; D is the feature maps' channel count.
    query_descriptor:
        float32 D': the query's l2-normalised global descriptor (R-MAC, ClusterMAC, …), the
        same kind ``descriptor_fn`` returns.
    candidates:
        Database indices (into ``store``) in their initial ranked order, best first; e.g. a
        row of the indices from :meth:`clustermac.Index.search`.
    store:
        The database feature maps (:class:`FeatureMapStore`).
    descriptor_fn:
        ``descriptor_fn(crop) -> vector``: computes the l2-normalised descriptor (length D')
        of a float32 D×h×w feature-map crop, the dequantised activations inside the AML box.
        If it has a method ``from_store(store, index, box) -> vector`` (as :class:`RMACInBox`
        and :class:`ClusterMACInBox` do), that is called instead, and no dequantised crop is
        made; for :class:`RMACInBox` it returns what ``descriptor_fn(crop)`` would.
    top_n:
        How many of the leading candidates to localise and re-score (Tolias: 1000).
    query_aspect:
        Width / height of the query box; boxes whose aspect ratio differs by more than a
        factor ``aspect_tolerance`` are not considered. None: no constraint.
    p, step, aspect_tolerance, refine_iterations:
        AML parameters, see :func:`clustermac.aml_localize` (Tolias' values are the defaults).
    qe_k:
        Average query expansion: the query descriptor plus the localised descriptors of the
        top ``qe_k`` re-ranked images, l2-normalised, re-scores the top N (0: no QE).
    n_threads:
        Threads over the candidates (``<= 0``: every core; 1: none). Results do not depend on it;
        ``descriptor_fn`` is then called from several threads at once.

    Returns
    -------
    :class:`RerankResult`.
    """
    query_mac = np.ascontiguousarray(query_mac, dtype=np.float32)
    query_descriptor = np.ascontiguousarray(query_descriptor, dtype=np.float32)
    if query_descriptor.ndim != 1 or not np.isfinite(query_descriptor).all():
        raise ValueError(f"query_descriptor: expected a finite 1-D vector, got shape {query_descriptor.shape}")
    order = np.asarray(candidates, dtype=np.int64).reshape(-1)
    if order.size and (order.min() < 0 or order.max() >= len(store)):
        raise ValueError(f"candidates: expected indices in [0, {len(store)}), got range [{order.min()}, {order.max()}]")
    if not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ValueError(f"top_n: expected a positive integer, got {top_n!r}")
    if not isinstance(qe_k, (int, np.integer)) or qe_k < 0:
        raise ValueError(f"qe_k: expected an integer >= 0, got {qe_k!r}")
    head = order[:top_n]
    from_store = getattr(descriptor_fn, "from_store", None)
    if from_store is not None and not callable(from_store):
        from_store = None
    if from_store is None and not callable(descriptor_fn):
        raise ValueError("descriptor_fn: expected a callable crop -> vector, or an object with a method "
                         f"from_store(store, index, box) -> vector, got {type(descriptor_fn).__name__}")
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads: expected an integer (<= 0: every core), got {n_threads!r}")
    workers = (os.cpu_count() or 1) if n_threads <= 0 else int(n_threads)

    def localise_and_describe(index: int) -> Tuple[np.ndarray, np.ndarray]:
        codes = store.codes(index)
        box, _ = _core.aml_localize_codes(codes, query_mac, p=p, step=step, aspect_tolerance=aspect_tolerance,
                                          refine_iterations=refine_iterations, query_aspect=query_aspect)
        if from_store is not None:
            raw = from_store(store, index, box)
        else:
            raw = descriptor_fn(store.feature_map(index, box))
        return box, np.asarray(raw, dtype=np.float32).reshape(-1)

    # The C++ steps release the GIL, so candidates are processed on a thread pool.
    candidates_head = [int(index) for index in head]
    if workers > 1 and len(candidates_head) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(candidates_head))) as pool:
            outcomes = list(pool.map(localise_and_describe, candidates_head))
    else:
        outcomes = [localise_and_describe(index) for index in candidates_head]
    boxes = np.zeros((head.size, 4), dtype=np.int32)
    descriptors = np.zeros((head.size, query_descriptor.size), dtype=np.float32)
    for row, (box, descriptor) in enumerate(outcomes):
        if descriptor.shape != query_descriptor.shape:
            raise ValueError(f"descriptor_fn: returned a vector of shape {descriptor.shape}, expected "
                             f"{query_descriptor.shape} like query_descriptor")
        boxes[row] = box
        descriptors[row] = descriptor
    scores = descriptors @ query_descriptor
    ranking = np.lexsort((np.arange(head.size), -scores))  # stable: ties keep the initial order
    expanded = query_descriptor
    if qe_k > 0 and head.size:
        top = ranking[:qe_k]
        expanded = _core.l2_normalize(np.ascontiguousarray(query_descriptor + descriptors[top].sum(axis=0)))
        scores = descriptors @ expanded
        ranking = np.lexsort((np.arange(head.size), -scores))
    reordered = np.concatenate([head[ranking], order[top_n:]])
    return RerankResult(indices=reordered, scores=scores[ranking].astype(np.float32), boxes=boxes[ranking],
                        expanded_query=expanded)
