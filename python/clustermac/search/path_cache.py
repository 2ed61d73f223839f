"""Exact search's "auto" choices, cached on disk per kind of CPU.

``topk_search(path="auto")`` times its paths at the first search of each batch size in a process
(≈ 0.1 s each: one query, two, …, sixteen, and more) and keeps the fastest. Every path returns the
same bits, so a choice an earlier process made on the same kind of CPU can be taken instead of
timing again: a one-off ``clustermac search`` then pays no timing at all.

The cache is ``$CLUSTERMAC_CACHE/search-paths.json`` (``~/.cache/clustermac`` by default):
``{"version": 1, "choices": {key: {slot: path}}}``, the key being this process's
:func:`~clustermac.kernel_record` (clustermac and ONNX Runtime versions, the core's SIMD level, the
CPU's flags and model name), slots and paths as ``clustermac._core.auto_search_paths`` gives them.
:meth:`clustermac.Index.search` reads it before its first search and adds what the process timed
since. A missing, unreadable or malformed cache is ignored (and replaced when new choices are
written); one that cannot be written is left as it is: it only saves time, never changes a result.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from .. import _core
from ..files import atomic_write_bytes
from ..kernels import kernel_record

__all__ = ["cache_file", "use_cached_choices", "remember_choices"]

CACHE_VERSION = 1
_lock = threading.Lock()
_loaded = False
_written: dict[str, str] = {}  # the choices this process has in the file


def cache_file() -> Path:
    """Where the choices are cached (``$CLUSTERMAC_CACHE/search-paths.json``)."""
    from ..backbones.efficientnet_lite import cache_dir

    return cache_dir() / "search-paths.json"


def _key() -> str:
    return json.dumps(kernel_record(), sort_keys=True)


def _read() -> dict[str, Any]:
    """The cache's choices per key, or {} when it is missing or not a cache of this version."""
    try:
        data = json.loads(cache_file().read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("choices"), dict):
        return {}
    return data["choices"]


def use_cached_choices() -> None:
    """Take the cached choices of this kind of CPU (once per process; later calls do nothing)."""
    global _loaded, _written
    with _lock:
        if _loaded:
            return
        _loaded = True
        entry = _read().get(_key())
        if isinstance(entry, dict):
            choices = {str(slot): str(path) for slot, path in entry.items()}
            accepted = set(_core.preset_auto_search_paths(choices))
            _written = {slot: path for slot, path in choices.items() if slot in accepted}


def remember_choices() -> None:
    """Add the choices this process has timed since to the cache (nothing when there are none)."""
    global _written
    with _lock:
        choices = dict(_core.auto_search_paths())
        if choices == _written:
            return
        cached = _read()
        cached[_key()] = choices
        try:
            file = cache_file()
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(file, json.dumps({"version": CACHE_VERSION, "choices": cached}, indent=1).encode())
        except OSError:
            pass  # a read-only cache: the next process times again
        _written = choices
