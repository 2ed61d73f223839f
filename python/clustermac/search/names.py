"""Image names of an index, stored compactly: one UTF-8 blob and the end offset of every name.

Ten million names held as Python strings take about 700 MB and a JSON list of them is slow to
parse; :class:`NameList` keeps them as one ``bytearray`` (the UTF-8 bytes of every name, one after
the other) and an ``array('Q')`` of end offsets, about 10 + 8 bytes per name, and decodes a name
when it is asked for. On disk (index format 3): ``names.utf8`` (the blob) and ``names.offsets.npy``
(uint64, ``count + 1`` offsets starting at 0), both checked in full by :func:`read_names`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from .. import files
from ..errors import CorruptFileError

__all__ = ["NameList", "read_names"]

BLOB_FILE = "names.utf8"
OFFSETS_FILE = "names.offsets.npy"


class NameList(Sequence[str]):
    """A compact, append-only sequence of strings (``len``, indexing, slicing, iteration, ``==``)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._blob = bytearray()
        self._ends = array("Q")
        self.extend(names)

    # ------------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"name {i} out of range; there are {len(self)} names")
        start = self._ends[i - 1] if i else 0
        return self._blob[start : self._ends[i]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends:
            yield self._blob[start:end].decode("utf-8")
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NameList):
            return self._ends == other._ends and self._blob == other._blob
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        shown = ", ".join(repr(n) for n in self[:3])
        return f"NameList([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} names)"

    # ------------------------------------------------------------------ changes
    def extend(self, names: Iterable[str]) -> None:
        """Append ``names`` (strings that UTF-8 can encode, else ``ValueError`` naming the entry)."""
        encoded = []
        for name in names:
            if not isinstance(name, str):
                raise ValueError(f"names: expected strings, got {type(name).__name__} {name!r}")
            try:
                encoded.append(name.encode("utf-8"))
            except UnicodeEncodeError as error:
                raise ValueError(f"names: {name!r} cannot be written as UTF-8 ({error.reason})") from None
        if not encoded:
            return
        base = self._ends[-1] if self._ends else 0
        ends = base + np.cumsum([len(e) for e in encoded], dtype=np.uint64)
        self._blob += b"".join(encoded)
        self._ends.frombytes(ends.astype("<u8").tobytes())

    def kept(self, keep: np.ndarray) -> NameList:
        """A new list of the names where the boolean array ``keep`` (one per name) is true."""
        ends = self.offsets()
        lengths = np.diff(ends)
        out = NameList()
        byte_mask = np.repeat(np.asarray(keep, dtype=bool), lengths.astype(np.int64))
        out._blob = bytearray(np.frombuffer(bytes(self._blob), dtype=np.uint8)[byte_mask].tobytes())
        out._ends.frombytes(np.cumsum(lengths[keep], dtype=np.uint64).astype("<u8").tobytes())
        return out

    def offsets(self) -> np.ndarray:
        """uint64 offsets of the names in the UTF-8 blob: ``len + 1`` values, the first 0."""
        ends = np.frombuffer(self._ends, dtype=np.uint64) if len(self._ends) else np.zeros(0, np.uint64)
        return np.concatenate([np.zeros(1, np.uint64), ends])

    # ------------------------------------------------------------------ files
    def write(self, folder: Path) -> list[Path]:
        """Write ``names.utf8`` and ``names.offsets.npy`` into ``folder`` (fsynced); returns both paths."""
        blob, offsets = folder / BLOB_FILE, folder / OFFSETS_FILE
        with open(blob, "wb") as f:
            f.write(self._blob)
            f.flush()
            os.fsync(f.fileno())
        with open(offsets, "wb") as f:
            np.save(f, self.offsets().astype("<u8"))
            f.flush()
            os.fsync(f.fileno())
        return [blob, offsets]


def read_names(blob_file: Path, offsets_file: Path, count: int) -> NameList:
    """Read and check the names written by :meth:`NameList.write`: ``count + 1`` little-endian uint64
    offsets starting at 0, never decreasing, ending at the blob's size, and a blob that is valid UTF-8.
    Raises :class:`~clustermac.CorruptFileError` naming the file and the problem."""
    size = offsets_file.stat().st_size
    with open(offsets_file, "rb") as f:
        shape, fortran, dtype, header = files.read_npy_header(f, offsets_file)
        if dtype != np.dtype("<u8") or fortran or tuple(shape) != (count + 1,):
            raise CorruptFileError(
                offsets_file, f"expected {count + 1} little-endian uint64 offsets, got {dtype} of shape {tuple(shape)}"
            )
        if size != header + 8 * (count + 1):
            raise CorruptFileError(
                offsets_file, f"has {size} bytes; its header and shape need {header + 8 * (count + 1)}"
            )
        offsets = np.fromfile(f, dtype="<u8", count=count + 1)
    blob = blob_file.read_bytes()
    if offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets.astype(np.int64)) < 0).any():
        raise CorruptFileError(
            offsets_file,
            f"offsets must start at 0, never decrease and end at {len(blob)} (the size of {blob_file.name})",
        )
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptFileError(blob_file, f"not valid UTF-8 at byte {error.start}") from None
    names = NameList()
    names._blob = bytearray(blob)
    names._ends.frombytes(offsets[1:].astype("<u8").tobytes())
    inner = offsets[1:-1][offsets[1:-1] < len(blob)].astype(np.int64)
    first_bytes = np.frombuffer(blob, dtype=np.uint8)[inner]
    split = (first_bytes >= 0x80) & (first_bytes < 0xC0)  # a name that starts inside a multi-byte character
    if split.any():
        raise CorruptFileError(offsets_file, f"offset {int(inner[np.argmax(split)])} splits a UTF-8 character")
    return names
