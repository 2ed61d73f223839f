"""Old module paths, kept importable: ``clustermac.rerank``, ``clustermac.index``, … .

:data:`MOVED` is the one map from each old module path to its new home. A meta-path finder
serves ``import clustermac.<old>`` / ``from clustermac.<old> import X`` with a thin module that
forwards attribute reads and writes to the new modules (so ``monkeypatch.setattr`` on the old
path still reaches the code), and warns ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MOVED", "install", "old_module"]

#: Old module path -> the new modules that hold its names, the first being the one to import instead.
MOVED: dict[str, tuple[str, ...]] = {
    "clustermac.backbone": ("clustermac.backbones.onnx",),
    "clustermac.efficientnet_lite": ("clustermac.backbones.efficientnet_lite",),
    "clustermac.export": ("clustermac.backbones.export",),
    "clustermac.descriptor_store": ("clustermac.descriptors.store", "clustermac.images"),
    "clustermac.index": ("clustermac.search.index",),
    "clustermac.query_expansion": ("clustermac.search.query_expansion",),
    "clustermac.rerank": (
        "clustermac.search.rerank",
        "clustermac.search.feature_map_store",
        "clustermac.descriptors.rmac",
        "clustermac.descriptors.clustermac",
    ),
    "clustermac.datasets": ("clustermac.bench.datasets", "clustermac.images"),
    "clustermac.evaluate": ("clustermac.bench.evaluate",),
    "clustermac.pipeline": ("clustermac.bench.pipeline",),
    "clustermac.photo_benchmark": ("clustermac.bench.photo_benchmark",),
    "clustermac.figures": ("clustermac.bench.figures",),
    "clustermac.report": ("clustermac.bench.report",),
    "clustermac.demo": ("clustermac.bench.demo",),
}


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the code doing the import: past this file, the
    package's ``__getattr__`` and importlib. ``warnings`` itself does not count importlib's
    internal ``_bootstrap`` frames, so neither does this."""
    skipped = (__file__, os.path.join(os.path.dirname(__file__), "__init__.py"))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        internal = "importlib" in name and "_bootstrap" in name
        if not internal:
            if name not in skipped and "importlib" not in name:
                return level
            level += 1
        frame = frame.f_back
    return 1


def _warn(old: str) -> None:
    warnings.warn(
        f"{old} is deprecated: import {MOVED[old][0]} instead", DeprecationWarning, stacklevel=_caller_stacklevel()
    )


class _MovedModule(types.ModuleType):
    """An old module path: reads and writes of its names go to the modules that now hold them."""

    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Moved: use {targets[0]}.")
        object.__setattr__(self, "_targets", tuple(targets))

    def _modules(self) -> list[types.ModuleType]:
        return [importlib.import_module(target) for target in self._targets]

    def _owner(self, name: str) -> types.ModuleType | None:
        """The module whose global ``name`` is: the one defining the value, else the first holding it."""
        holders = [module for module in self._modules() if name in vars(module)]
        for module in holders:
            if getattr(vars(module)[name], "__module__", None) == module.__name__:
                return module
        return holders[0] if holders else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for module in self._modules():
            try:
                return getattr(module, name)
            except AttributeError:
                continue
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):
            object.__setattr__(self, name, value)
            return
        setattr(self._owner(name) or self._modules()[0], name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("__"):
            object.__delattr__(self, name)
            return
        owner = self._owner(name)
        if owner is None:
            raise AttributeError(name)
        delattr(owner, name)

    def __dir__(self) -> list[str]:
        return sorted({name for module in self._modules() for name in dir(module)})


class _MovedModuleFinder:
    """Finds and loads the old module paths of :data:`MOVED` (a meta-path finder and its loader)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"moved to {MOVED[fullname][0]}")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        _warn(module.__name__)
        importlib.import_module(MOVED[module.__name__][0])


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (before the editable-install redirect, which
    still knows the old files)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def old_module(name: str) -> types.ModuleType:
    """``clustermac.<name>`` for an old module name (warns); AttributeError for any other name."""
    fullname = f"clustermac.{name}"
    if fullname not in MOVED:
        raise AttributeError(f"module 'clustermac' has no attribute {name!r}")
    return importlib.import_module(fullname)
