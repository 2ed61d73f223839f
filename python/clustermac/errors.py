"""The package's own exception types for files: what a caller can catch by name.

Both subclass the built-in type that a caller would have caught before they existed
(``ValueError`` for a bad file, ``RuntimeError`` for a busy output), so older ``except``
clauses keep working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """A file that clustermac reads is malformed: truncated, forged, of another format or
    version, or holding values that cannot be right (wrong shape or dtype, NaN).

    ``path`` is the file (or folder) and ``problem`` says what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across processes (Ray, multiprocessing)
        return (type(self), (self.path, self.problem))


class OutputLockedError(RuntimeError):
    """Another process is writing the same output. ``holder`` is what that process wrote into
    the lock file (``pid``, ``host``, ``started``, ``command``), as far as it could be read."""

    def __init__(self, path: str | os.PathLike, holder: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.holder = dict(holder or {})
        who = ", ".join(f"{key} {value}" for key, value in self.holder.items() if key in ("pid", "host", "started"))
        super().__init__(
            f"{self.path}: another clustermac process is writing this output ({who or 'holder unknown'}); "
            "wait for it to finish or choose another output"
        )

    def __reduce__(self):
        return (type(self), (self.path, self.holder))


class MixedKernelsWarning(UserWarning):
    """The rows of one output were computed by different code (another clustermac or ONNX
    Runtime version, or another kind of CPU): see :mod:`clustermac.kernels`. Their settings are
    the same, so the file is usable, but the same image may have descriptors that differ in
    their last bits between rows. ``warnings.simplefilter("error", MixedKernelsWarning)`` makes
    it an error."""
