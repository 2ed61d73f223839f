"""The search behind the server: an index folder, its query extractor and feature-map store.

:class:`SearchEngine` loads what ``clustermac index`` recorded (:mod:`clustermac.search.index_info`)
once, answers searches, and serves the indexed images, their thumbnails and cluster maps.
It knows nothing of HTTP: bad input raises :class:`BadRequest` (or the library's
``ValueError``), names that are not in the index :class:`UnknownName`, names that would reach
outside the image root :class:`ForbiddenName`. Every method may run on a worker thread; the
loaded state is one immutable object swapped whole by :meth:`SearchEngine.reload`, so a search
in flight finishes on the index it started with.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
from PIL import Image

from .._typing import PathLike
from ..descriptors import CROP_MODES
from ..files import current_version
from ..images import load_image
from ..kernels import recorded_kernels, runs_here

__all__ = ["SearchEngine", "BadRequest", "UnknownName", "ForbiddenName", "QE_MODES"]

#: Query expansion choices: none (the library's default: no expansion unless asked), average
#: QE (Chum et al. 2007; the paper's top 5) and α-weighted QE (Radenović et al. 2018, α = 3).
QE_MODES = ("none", "aqe", "alpha")
QE_TOP = 5
#: Clusters of the Fig. 7 cluster maps (the paper's Fig. 7 uses 10).
FIGURE_CLUSTERS = 10


class BadRequest(ValueError):
    """The request itself is wrong (a bad option, an impossible combination)."""


class UnknownName(LookupError):
    """The image name is not in the index."""


class ForbiddenName(PermissionError):
    """The image name would reach outside the image root."""


class _LRU:
    """A small thread-safe least-recently-used cache of bytes, bounded in total size."""

    def __init__(self, capacity_bytes: int) -> None:
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._capacity = capacity_bytes
        self._size = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            if key not in self._items and len(value) <= self._capacity:
                self._items[key] = value
                self._size += len(value)
                while self._size > self._capacity:
                    _, dropped = self._items.popitem(last=False)
                    self._size -= len(dropped)
        return value


@dataclass(frozen=True)
class _Loaded:
    """Everything one version of the index folder gives: swapped whole on reload."""

    version: str
    index: Any
    extractors: dict[str, Any]  # crop mode → Extractor (sharing one backbone and whitening)
    store: Any  # FeatureMapStore or None
    image_root: Path | None
    names: dict[str, int]


def _version_of(index_path: Path) -> str:
    version = current_version(index_path)
    return version.name if version is not None else "unversioned"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _milliseconds(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class SearchEngine:
    """Searches one index folder built by ``clustermac index … --image-root --whitening [--store]``.

    Parameters
    ----------
    index_path:
        The index folder.
    n_threads:
        ONNX Runtime threads of the backbone (None: one per core).
    max_k:
        The largest ``k`` a search may ask for.
    rerank_top:
        How many of the initial results AML re-ranking localises (Tolias et al. use 1000; a
        page answers faster with fewer). At least ``max_k``.
    """

    def __init__(
        self, index_path: PathLike, *, n_threads: int | None = None, max_k: int = 100, rerank_top: int = 100
    ) -> None:
        self.index_path = Path(index_path)
        self.n_threads = n_threads
        self.max_k = int(max_k)
        self.rerank_top = max(int(rerank_top), self.max_k)
        self._reload_lock = threading.Lock()
        self._thumbnails = _LRU(64 << 20)  # bytes
        self._clusters = _LRU(32 << 20)
        self._state = self._load()

    # ------------------------------------------------------------------ loading
    def _load(self, previous: _Loaded | None = None) -> _Loaded:
        from ..search import FeatureMapStore, Index
        from ..search.index_info import backbone_from_info, checked_file, extractor_from_info

        version = _version_of(self.index_path)
        index = Index.load(self.index_path)
        info = index.info
        # The model is loaded once: a reload with the same backbone keeps the session.
        backbone = None
        if previous is not None:
            old = next(iter(previous.extractors.values())).backbone
            if old.name == (info.get("settings") or {}).get("backbone") and old.max_size == int(
                (info.get("settings") or {}).get("max_size") or 1024
            ):
                backbone = old
        if backbone is None:
            backbone = backbone_from_info(info, self.n_threads)
        # One extractor per query mode, sharing the backbone (and each with the checked whitening).
        recorded = (info.get("settings") or {}).get("crop") or CROP_MODES[0]
        modes = [recorded] + [crop for crop in CROP_MODES if crop != recorded]
        extractors = {crop: extractor_from_info(info, backbone, crop=crop) for crop in modes}
        first = extractors[recorded]
        if first.dim != index.dim:
            raise ValueError(f"{self.index_path}: queries would have {first.dim} dimensions, the index has {index.dim}")
        store = None
        if info.get("feature_map_store") is not None:
            store = FeatureMapStore(checked_file(info["feature_map_store"], "feature-map store"))
            if store.names != index.names:
                raise ValueError(f"{store.path}: its maps are not the index's images in the index's order")
        root = info.get("image_root")
        return _Loaded(
            version=version,
            index=index,
            extractors=extractors,
            store=store,
            image_root=Path(root).resolve() if root else None,
            names={name: row for row, name in enumerate(index.names)},
        )

    def reload(self, force: bool = False) -> bool:
        """Load the index folder again if its published version changed (or ``force``).
        Returns whether a new state was loaded; a failed load keeps the old state and raises."""
        with self._reload_lock:
            if not force and _version_of(self.index_path) == self._state.version:
                return False
            self._state = self._load(self._state)
            return True

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict[str, Any]:
        """What the page needs to know: size, method, whether re-ranking is available, limits; and
        the code that computed the index's rows (``kernels``, :mod:`clustermac.kernels`) with
        whether this server runs the same (``same_kernels``; None when the index records none)."""
        state = self._state
        extractor = next(iter(state.extractors.values()))
        kernels = recorded_kernels(state.index.info.get("kernels"))
        return {
            "images": len(state.index),
            "version": state.version,
            "method": extractor.method,
            "crop": extractor.crop,
            "backbone": extractor.backbone.name,
            "rerank": state.store is not None,
            "qe": list(QE_MODES),
            "max_k": self.max_k,
            "kernels": kernels,
            "same_kernels": runs_here(kernels),
        }

    def list_names(self, offset: int = 0, limit: int = 50, prefix: str = "") -> dict[str, Any]:
        """A page of the indexed names (in index order) starting with ``prefix``."""
        names = self._state.index.names
        if prefix:
            names = [name for name in names if name.startswith(prefix)]
        return {"total": len(names), "offset": offset, "limit": limit, "names": names[offset : offset + limit]}

    # ------------------------------------------------------------------ names → files
    def resolve(self, name: str) -> Path:
        """The file of an indexed image; never a path outside the image root."""
        state = self._state
        parts = PurePosixPath(name).parts
        if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or "\0" in name:
            raise ForbiddenName(f"image name {name!r}: names are relative to the image root, without '..'")
        if name not in state.names:
            raise UnknownName(f"image name {name!r} is not in the index")
        if state.image_root is None:
            raise UnknownName("the index records no image root: rebuild it with `clustermac index … --image-root DIR`")
        path = (state.image_root / name).resolve()
        if not path.is_relative_to(state.image_root):
            raise ForbiddenName(f"image name {name!r} leads outside the image root (a symbolic link?)")
        if not path.is_file():
            raise UnknownName(f"image {name!r} is in the index but its file is missing")
        return path

    def thumbnail(self, name: str, size: int | None) -> tuple[bytes, str]:
        """The image (EXIF rotation applied, as boxes are given) as JPEG bytes, at most ``size``
        pixels on its longer side (None: full size). Cached."""
        path = self.resolve(name)

        def make() -> bytes:
            image = load_image(path)
            if size is not None:
                image.thumbnail((size, size), Image.BICUBIC)
            return _jpeg(image)

        stamp = path.stat().st_mtime_ns
        return self._thumbnails.get_or_make((str(path), stamp, size), make), "image/jpeg"

    def clusters_png(self, name: str) -> bytes:
        """The paper's Fig. 7 for an indexed image: image | feature norm | 10 clusters. Cached."""
        path = self.resolve(name)
        extractor = next(iter(self._state.extractors.values()))

        def make() -> bytes:
            from ..bench.figures import cluster_figure_for_file

            return _png(cluster_figure_for_file(extractor, path, n_clusters=FIGURE_CLUSTERS))

        return self._clusters.get_or_make((str(path), path.stat().st_mtime_ns), make)

    # ------------------------------------------------------------------ search
    def search(
        self,
        image: Image.Image | None = None,
        name: str | None = None,
        box: tuple[float, float, float, float] | None = None,
        k: int = 20,
        crop: str | None = None,
        qe: str = "none",
        rerank: bool = False,
        clusters: bool = False,
    ) -> dict[str, Any]:
        """Rank the indexed images for a query image (or an indexed image by ``name``), its
        object in ``box`` (x1, y1, x2, y2 in the original image's pixels after EXIF rotation;
        None: the whole image). Returns ``{"results": [{"rank", "name", "score", "box"?}],
        "timing_ms": {...}}``; ``box`` of a result is the AML box (re-ranking only), in that
        image's pixels. ``clusters`` adds the query's cluster map as a PNG data URL."""
        state = self._state
        started = time.perf_counter()
        timing: dict[str, float] = {}
        if (image is None) == (name is None):
            raise BadRequest("give either an image or the name of an indexed image")
        if not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise BadRequest(f"k: expected an integer from 1 to {self.max_k}, got {k!r}")
        if qe not in QE_MODES:
            raise BadRequest(f"qe: expected one of {', '.join(QE_MODES)}, got {qe!r}")
        extractor = state.extractors.get(crop or next(iter(state.extractors)))
        if extractor is None:
            raise BadRequest(f"crop: expected one of {', '.join(CROP_MODES)}, got {crop!r}")
        if rerank and state.store is None:
            raise BadRequest("rerank: this index has no feature-map store (index with --store DB.cmfm --write-store)")
        if rerank and extractor.scales != (1.0,):
            raise BadRequest("rerank: AML re-ranking is single-scale; this index's descriptors are multi-scale")
        if rerank and qe == "alpha":
            raise BadRequest("qe=alpha is not combined with re-ranking (it expands with the localised top 5): use aqe")
        if qe != "none" and not rerank and state.index.backend != "exact":
            raise BadRequest("qe: query expansion needs the database vectors, which a FAISS index does not keep")
        query_image = load_image(self.resolve(name)) if name is not None else image
        prepared_scales = extractor.prepare_scales(query_image, box)
        maps = extractor.feature_maps(prepared_scales)
        query = extractor.descriptor_from_feature_maps(maps)
        prepared, fmap = prepared_scales[0], maps[0][0]  # scale 1: re-ranking and the figure
        timing["extract"] = _milliseconds(started)

        step = time.perf_counter()
        index = state.index
        depth = min(len(index), max(k, self.rerank_top if rerank else 0, QE_TOP if qe != "none" else 0))
        scores, rows = index.search(query[None, :], k=depth)
        scores, rows = scores[0], rows[0]
        if qe != "none" and not rerank:
            top = rows[rows >= 0][:QE_TOP]
            expanded = self._expand(query, index.vectors(top), qe)
            scores, rows = (part[0] for part in index.search(expanded[None, :], k=depth))
        timing["search"] = _milliseconds(step)

        boxes = None
        if rerank:
            step = time.perf_counter()
            scores, rows, boxes = self._rerank(state, extractor, fmap, query, rows, box, qe)
            timing["rerank"] = _milliseconds(step)
        results = []
        for position, (row, score) in enumerate(zip(rows[:k], scores[:k])):
            if row < 0:
                continue
            result = {"rank": len(results) + 1, "name": index.names[int(row)], "score": round(float(score), 6)}
            pixels = None if boxes is None else self._box_in_pixels(state, extractor, int(row), boxes[position])
            if pixels is not None:
                result["box"] = pixels
            results.append(result)
        response: dict[str, Any] = {"results": results}
        if clusters:
            step = time.perf_counter()
            from ..bench.figures import cluster_figure_for_file

            figure = cluster_figure_for_file(extractor, prepared.image, n_clusters=FIGURE_CLUSTERS)
            response["query_clusters"] = "data:image/png;base64," + base64.b64encode(_png(figure)).decode("ascii")
            timing["clusters"] = _milliseconds(step)
        timing["total"] = _milliseconds(started)
        response["timing_ms"] = timing
        return response

    @staticmethod
    def _expand(query: np.ndarray, top_vectors: np.ndarray, qe: str) -> np.ndarray:
        from ..search import alpha_query_expansion, average_of_neighbours

        if qe == "aqe":
            return average_of_neighbours(query, top_vectors)
        ranks = np.arange(len(top_vectors), dtype=np.int64)[None, :]
        return alpha_query_expansion(query, top_vectors, ranks, k=len(top_vectors))[0]

    def _rerank(self, state: _Loaded, extractor, fmap: np.ndarray, query: np.ndarray, rows, box, qe: str):
        from ..descriptors.global_pooling import mac_vector
        from ..search import aml_rerank

        descriptor_fn = extractor.box_descriptor()  # a global method: itself on the dequantised crop
        query_mac = mac_vector(fmap)
        aspect = None if box is None else (box[2] - box[0]) / (box[3] - box[1])
        candidates = rows[rows >= 0]
        result = aml_rerank(
            query_mac,
            query,
            candidates,
            state.store,
            descriptor_fn,
            top_n=min(self.rerank_top, len(candidates)),
            query_aspect=aspect,
            qe_k=QE_TOP if qe == "aqe" else 0,
            n_threads=1,
        )
        return result.scores, result.indices[: len(result.scores)], result.boxes

    def _box_in_pixels(self, state: _Loaded, extractor, row: int, cells) -> list[float] | None:
        """An AML box in feature-map cells of a database image → its original pixels (None when
        the image cannot be served: missing, or outside the image root)."""
        try:
            width, height = self._original_size(state, row)
        except (UnknownName, ForbiddenName):
            return None
        scale = min(1.0, extractor.max_size / max(width, height))
        stride = float(extractor.backbone.stride)
        x0, y0, x1, y1 = (float(v) * stride / scale for v in cells)
        return [round(float(min(v, limit)), 1) for v, limit in zip((x0, y0, x1, y1), (width, height, width, height))]

    def _original_size(self, state: _Loaded, row: int) -> tuple[int, int]:
        """(width, height) of an indexed image after EXIF rotation, from its header only."""
        path = self.resolve(state.index.names[row])
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # the EXIF orientations that swap the sides
                width, height = height, width
        return width, height
