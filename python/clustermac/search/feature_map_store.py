"""The feature-map store: 8-bit quantised feature maps of a collection in one file (``.cmfm``).

Re-ranking needs the database images' feature maps. They are kept compactly as Tolias et al.
do: 8 bits per activation, quantised per map with one scale (max / 255), in a single
memory-mappable file per collection. Codes are stored channel-last (H×W×D), the layout the
localisation kernel reads; for ClusterMAC each map can carry its image's cluster label maps
(int16).

File layout (little-endian): a 64-byte preamble (magic, table offset, count), the payload
(each map's codes, then its label maps, each 64-byte aligned), the table (one row per map),
then the names as length-prefixed UTF-8 JSON. Version 1 files (no labels) are still read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .. import _core
from .._typing import PathLike
from ..files import temporary_file_beside

__all__ = ["quantize_feature_map", "FeatureMapStore", "FeatureMapStoreWriter"]

_MAGIC = b"CMACFM02"  # version 2: optional cluster label maps per feature map
_MAGIC_V1 = b"CMACFM01"  # version 1 (no labels) is still read
_PREAMBLE = struct.Struct("<8sQQ")  # magic, table offset, count
_PAYLOAD_START = 64  # payload is 64-byte aligned after the preamble
_TABLE_DTYPE_V1 = np.dtype(
    [("offset", "<u8"), ("channels", "<u4"), ("height", "<u4"), ("width", "<u4"), ("scale", "<f4")]
)
# labels_offset: int16 partitions × H × W label maps (-1 = masked), `partitions` of them.
_TABLE_DTYPE = np.dtype(_TABLE_DTYPE_V1.descr + [("labels_offset", "<u8"), ("partitions", "<u4")])
_LABEL_LIMIT = np.iinfo(np.int16).max


def quantize_feature_map(feature_map: np.ndarray) -> tuple[np.ndarray, float]:
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
        self._rows: list[tuple[int, int, int, int, float, int, int]] = []
        self._names: list[str] = []
        self._channels: int | None = None

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
            raise ValueError(
                f"feature_map: expected {self._channels} channels like the maps already stored, got shape {codes.shape}"
            )
        label_maps = [self._checked_labels(np.asarray(lab), k, codes.shape[1:]) for k, lab in enumerate(labels)]
        offset = self._write_aligned(np.ascontiguousarray(codes.transpose(1, 2, 0)).tobytes())  # channel-last
        labels_offset = self._write_aligned(b"".join(lab.astype("<i2").tobytes() for lab in label_maps))
        self._rows.append(
            (offset, codes.shape[0], codes.shape[1], codes.shape[2], scale, labels_offset, len(label_maps))
        )
        self._names.append(name)

    @staticmethod
    def _checked_labels(labels: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
        if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels[{k}]: expected an integer array of shape {shape} (the map's H×W), "
                f"got {labels.dtype} of shape {labels.shape}"
            )
        if labels.size and (labels.min() < -1 or labels.max() > _LABEL_LIMIT):
            raise ValueError(
                f"labels[{k}]: expected values in [-1, {_LABEL_LIMIT}], got [{labels.min()}, {labels.max()}]"
            )
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

    def __enter__(self) -> FeatureMapStoreWriter:
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
        magic, table_offset, count = _PREAMBLE.unpack(bytes(self._data[: _PREAMBLE.size]))
        if magic not in (_MAGIC, _MAGIC_V1):
            raise ValueError(f"{self.path}: not a clustermac feature-map store (bad magic {magic!r})")
        table_dtype = _TABLE_DTYPE if magic == _MAGIC else _TABLE_DTYPE_V1
        table_end = table_offset + count * table_dtype.itemsize
        if table_end + 8 > size:
            raise ValueError(f"{self.path}: truncated (table ends at byte {table_end + 8}, file has {size})")
        self._table = np.frombuffer(self._data, dtype=table_dtype, count=count, offset=table_offset)
        (names_length,) = struct.unpack("<Q", bytes(self._data[table_end : table_end + 8]))
        if table_end + 8 + names_length > size:
            raise ValueError(f"{self.path}: truncated names")
        self.names: list[str] = json.loads(
            bytes(self._data[table_end + 8 : table_end + 8 + names_length]).decode("utf-8")
        )
        cells = self._table["height"].astype(np.uint64) * self._table["width"]
        ends = self._table["offset"] + self._table["channels"].astype(np.uint64) * cells
        if magic == _MAGIC:
            ends = np.maximum(
                ends, self._table["labels_offset"] + 2 * self._table["partitions"].astype(np.uint64) * cells
            )
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
        return self._data[start : start + shape[0] * shape[1] * shape[2]].reshape(shape)

    def labels(self, index: int) -> list[np.ndarray]:
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

    def feature_map(self, index: int, box: Sequence[int] | None = None) -> np.ndarray:
        """Dequantised float32 D×H×W map ``index``, or its crop [x0, y0, x1, y1) in cells."""
        box_values = None if box is None else [int(v) for v in box]
        return _core.dequantize_codes(self.codes(index), box_values, self.scale(index))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.feature_map(i)
