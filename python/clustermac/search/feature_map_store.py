"""The feature-map store: 8-bit quantised feature maps of a collection in one file (``.cmfm``).

Re-ranking needs the database images' feature maps. They are kept compactly as Tolias et al.
do: 8 bits per activation, quantised per map with one scale (max / 255), in a single
memory-mappable file per collection. Codes are stored channel-last (H×W×D), the layout the
localisation kernel reads; for ClusterMAC each map can carry its image's cluster label maps
(int16).

File layout (little-endian): a 64-byte preamble (magic, table offset, count), the payload
(each map's codes, then its label maps, each 64-byte aligned), the table (one row per map),
then the names as length-prefixed UTF-8 JSON. The magic carries the format version; version 1
files (no labels) are still read. Opening a store validates the whole layout (every offset and
size within the file, names, scales) and raises :class:`~clustermac.CorruptFileError` for any
malformed file, so no later access reads out of bounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .. import _core
from .._typing import PathLike
from ..errors import CorruptFileError
from ..files import crash_point, output_lock, remove_stale_temporaries, temporary_file_beside

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

    The writer holds the output lock of ``path`` until it is closed or aborted (a second
    writer gets :class:`~clustermac.OutputLockedError`) and removes the temporary files of
    killed writers of the same path.
    """

    def __init__(self, path: PathLike) -> None:
        self._path = Path(path)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self._path, "FeatureMapStoreWriter"))
        try:
            remove_stale_temporaries(self._path)
            handle, temporary = temporary_file_beside(self._path)  # plain-open permissions, not mkstemp's 0600
        except BaseException:
            self._lock.close()
            raise
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
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            crash_point("feature_map_store_close")
            os.replace(self._temporary, self._path)
        except BaseException:
            self._temporary.unlink(missing_ok=True)
            raise
        finally:
            self._lock.close()

    def abort(self) -> None:
        """Discard everything written."""
        try:
            self._file.close()
            self._temporary.unlink(missing_ok=True)
        finally:
            self._lock.close()

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
            raise CorruptFileError(self.path, f"has {size} bytes, too short to be a feature-map store")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        magic, table_offset, count = _PREAMBLE.unpack(bytes(self._data[: _PREAMBLE.size]))
        if magic not in (_MAGIC, _MAGIC_V1):
            raise CorruptFileError(self.path, f"not a clustermac feature-map store (magic {magic!r})")
        table_dtype = _TABLE_DTYPE if magic == _MAGIC else _TABLE_DTYPE_V1
        if not _PAYLOAD_START <= table_offset <= size:
            raise CorruptFileError(self.path, f"the table offset {table_offset} is outside the file ({size} bytes)")
        if count > (size - table_offset) // table_dtype.itemsize:
            raise CorruptFileError(
                self.path,
                f"declares {count} maps, but the {size - table_offset} bytes after the table offset hold fewer",
            )
        table_end = table_offset + count * table_dtype.itemsize
        if table_end + 8 > size:
            raise CorruptFileError(self.path, f"truncated (table ends at byte {table_end + 8}, file has {size})")
        self._table = np.frombuffer(self._data, dtype=table_dtype, count=count, offset=table_offset)
        (names_length,) = struct.unpack("<Q", bytes(self._data[table_end : table_end + 8]))
        if names_length != size - table_end - 8:
            raise CorruptFileError(
                self.path, f"the names take {names_length} bytes, but {size - table_end - 8} follow the table"
            )
        try:
            names = json.loads(bytes(self._data[table_end + 8 :]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise CorruptFileError(self.path, f"unreadable names ({type(error).__name__}: {error})") from None
        if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
            raise CorruptFileError(self.path, f"the names are not a list of {count} strings")
        self.names: list[str] = names
        self._check_table(table_offset)

    def _check_table(self, payload_end: int) -> None:
        """Every map (and label map) lies inside the payload; sizes cannot wrap around."""
        table = self._table
        if not len(table):
            return
        channels, height, width = (table[key].astype(np.float64) for key in ("channels", "height", "width"))
        if channels.min() < 1 or height.min() < 1 or width.min() < 1:
            bad = int(np.argmin(np.minimum(np.minimum(channels, height), width)))
            raise CorruptFileError(self.path, f"map {bad} has an empty shape")
        if (table["channels"] != table["channels"][0]).any():
            bad = int(np.argmax(table["channels"] != table["channels"][0]))
            raise CorruptFileError(
                self.path, f"map {bad} has {table['channels'][bad]} channels, map 0 has {table['channels'][0]}"
            )
        if not np.isfinite(table["scale"]).all() or (table["scale"] < 0).any():
            bad = int(np.argmin(np.isfinite(table["scale"]) & (table["scale"] >= 0)))
            raise CorruptFileError(self.path, f"map {bad} has the scale {table['scale'][bad]}; expected finite >= 0")
        spans = [(table["offset"], channels * height * width)]
        if "partitions" in table.dtype.names:
            with_labels = table["partitions"] > 0
            spans.append(
                (
                    np.where(with_labels, table["labels_offset"], _PAYLOAD_START),
                    2.0 * table["partitions"].astype(np.float64) * height * width,
                )
            )
        for starts, lengths in spans:
            # float64 first (no wrap-around), exact integers once they are known to be small
            if (starts.astype(np.float64) + lengths > payload_end + 1.0).any() or (starts < _PAYLOAD_START).any():
                ends = starts.astype(np.float64) + lengths
                bad = int(np.argmax((ends > payload_end + 1.0) | (starts < _PAYLOAD_START)))
                raise CorruptFileError(
                    self.path, f"map {bad} lies outside the payload (bytes {_PAYLOAD_START}..{payload_end})"
                )
            if (starts + lengths.astype(np.uint64) > payload_end).any():
                bad = int(np.argmax(starts + lengths.astype(np.uint64) > payload_end))
                raise CorruptFileError(
                    self.path, f"map {bad} lies outside the payload (bytes {_PAYLOAD_START}..{payload_end})"
                )

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
        if stored.size and stored.min() < -1:
            raise CorruptFileError(self.path, f"map {index} has a label below -1 (-1 marks masked cells)")
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
