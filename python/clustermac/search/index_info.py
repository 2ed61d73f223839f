"""What an index folder records so that queries can be described exactly as its images were.

``clustermac index … --image-root DIR --whitening W.npz [--store DB.cmfm]`` saves, in the
index's ``clustermac.json`` (``Index.save(path, info=...)``):

* ``settings``: the extractor settings of the descriptors (from the ``extract`` manifest);
* ``image_root``: the folder the image names are relative to;
* ``whitening``: the whitening file, by absolute path, size and SHA-256;
* ``backbone``: ``{"name": ..., "onnx": <file record> | None}`` (None: the embedded default);
* ``feature_map_store``: the ``.cmfm`` feature-map store of the indexed images (for AML
  re-ranking), by path, size and SHA-256, its maps in the index's order.

A file record is ``{"path", "size", "sha256"}``. :func:`checked_file` refuses a recorded file
that is missing or has changed since it was recorded, naming it, so a server never answers with
a whitening or store that does not belong to the index. :func:`extractor_from_info` rebuilds the
query extractor from these records alone (``clustermac serve --index INDEX``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..errors import CorruptFileError
from ..files import file_sha256

__all__ = [
    "file_record",
    "checked_file",
    "backbone_from_info",
    "extractor_from_info",
    "write_feature_map_store",
    "record_query_setup",
]

#: Cosine below which the recorded setup is said not to reproduce an indexed descriptor.
REPRODUCE_TOLERANCE = 1e-3


def file_record(path: PathLike) -> dict[str, Any]:
    """``{"path": absolute path, "size": bytes, "sha256": hex}`` of an existing file."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ValueError(f"{path}: no such file")
    return {"path": str(file), "size": file.stat().st_size, "sha256": file_sha256(file)}


def checked_file(record: Any, what: str) -> Path:
    """The path of a file record after checking that the file is still the one recorded
    (same size and SHA-256). Raises ``CorruptFileError`` naming ``what`` otherwise."""
    if not isinstance(record, Mapping) or not all(key in record for key in ("path", "size", "sha256")):
        raise CorruptFileError(Path(str(what)), f"the index records no usable {what} file ({record!r})")
    path = Path(str(record["path"]))
    if not path.is_file():
        raise CorruptFileError(path, f"the {what} recorded with the index is missing")
    if path.stat().st_size != record["size"] or file_sha256(path) != record["sha256"]:
        raise CorruptFileError(
            path, f"the {what} has changed since the index was built (size or SHA-256 differs); rebuild the index"
        )
    return path


def backbone_from_info(info: Mapping[str, Any], n_threads: int | None = None):
    """The backbone the index's descriptors were made with: the recorded ONNX file, or the
    embedded default. Raises ``ValueError`` when it is not the one named in the settings."""
    from ..backbones import Backbone, default_backbone

    settings = info.get("settings") or {}
    record = (info.get("backbone") or {}).get("onnx")
    max_size = int(settings.get("max_size") or 1024)
    if record is None:  # the embedded network, with the head of the indexed method and the recorded precision
        from ..descriptors.registry import method_class

        head = method_class(settings["method"]).backbone_head if settings.get("method") else "relu6"
        precision = settings.get("backbone_precision", "float32")
        backbone = default_backbone(n_threads=n_threads, max_size=max_size, precision=precision, head=head)
    else:
        backbone = Backbone(checked_file(record, "backbone ONNX file"), n_threads=n_threads, max_size=max_size)
    if settings.get("backbone") and settings["backbone"] != backbone.name:
        raise ValueError(
            f"the index's descriptors were made with the backbone {settings['backbone']!r}, but "
            f"{backbone.name!r} is at hand: rebuild the index with `clustermac index … --onnx FILE`"
        )
    return backbone


def _extractor_keywords(settings: Mapping[str, Any]) -> dict[str, Any]:
    from ..descriptors import Extractor

    accepted = set(inspect.signature(Extractor.__init__).parameters) - {"self", "backbone"}
    keywords = {key: value for key, value in settings.items() if key in accepted}
    if "n_clusters" in keywords:
        keywords["n_clusters"] = tuple(keywords["n_clusters"])
    if "scales" in keywords:  # a JSON list in the settings
        keywords["scales"] = tuple(keywords["scales"])
    return keywords


def extractor_from_info(info: Mapping[str, Any], backbone=None, crop: str | None = None, n_threads: int | None = None):
    """An :class:`~clustermac.Extractor` that describes queries as the index's images were
    described: its settings, backbone and (checked) whitening. ``crop`` overrides the recorded
    query mode. Raises ``ValueError`` naming what is missing (no settings; whitened descriptors
    but no whitening recorded)."""
    from ..descriptors import Extractor

    settings = info.get("settings")
    if not isinstance(settings, Mapping) or not settings.get("method"):
        raise ValueError("the index records no extractor settings: build it with `clustermac index`")
    keywords = _extractor_keywords(settings)
    if crop is not None:
        keywords["crop"] = crop
    extractor = Extractor(backbone if backbone is not None else backbone_from_info(info, n_threads), **keywords)
    if info.get("whitening") is not None:
        extractor.load_whitening(checked_file(info["whitening"], "whitening"))
    elif settings.get("whitened"):
        raise ValueError(
            "the index was built from whitened descriptors but records no whitening: "
            "rebuild it with `clustermac index … --whitening W.npz`"
        )
    return extractor


def write_feature_map_store(
    extractor, image_root: PathLike, names: Sequence[str], path: PathLike, progress: bool = True
) -> None:
    """Write the 8-bit feature maps of ``names`` (relative to ``image_root``), in that order,
    with their cluster label maps for ClusterMAC, to the store ``path`` (atomic; see
    :class:`~clustermac.FeatureMapStoreWriter`). An unreadable image stops the run, naming it
    (the store's maps must line up with the index's rows)."""
    from ..descriptors.pipeline import per_image_in_order, progress_bar
    from .feature_map_store import FeatureMapStoreWriter

    root = Path(image_root)

    def map_and_labels(i: int, side_by_side: bool) -> tuple[np.ndarray, Sequence[np.ndarray]]:
        fmap, rgb = extractor.feature_map(extractor.prepare(root / names[i]), side_by_side)
        return fmap, (extractor.cluster_labels(fmap, rgb) if extractor.clusters else ())

    bar = progress_bar(len(names), "feature maps", progress)
    with FeatureMapStoreWriter(path) as writer:
        for i, result in per_image_in_order(extractor, len(names), map_and_labels):
            if isinstance(result, Exception):
                raise result
            fmap, labels = result
            writer.add(fmap, names[i], labels=labels)
            bar.update(1)
    bar.close()


def _check_reproduces(extractor, image_root: Path, name: str, stored: np.ndarray) -> None:
    query = extractor.extract(image_root / name)
    if query.shape != np.shape(stored):
        raise ValueError(
            f"the recorded setup gives {query.size}-d descriptors, the index holds {np.size(stored)}-d ones: "
            "pass the --whitening (and --onnx) the descriptors were extracted with, or none if they were not whitened"
        )
    cosine = float(np.dot(query, np.asarray(stored, dtype=np.float32)))
    if not math.isfinite(cosine) or cosine < 1.0 - REPRODUCE_TOLERANCE:
        raise ValueError(
            f"the recorded setup does not reproduce the indexed descriptor of {name!r} (cosine {cosine:.4f}): "
            "pass the --whitening (and --onnx) the descriptors were extracted with"
        )


def record_query_setup(
    settings: Mapping[str, Any],
    names: Sequence[str],
    vectors: np.ndarray,
    image_root: PathLike | None,
    *,
    whitening: PathLike | None = None,
    onnx: PathLike | None = None,
    store: PathLike | None = None,
    write_store: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``whitening``, ``backbone`` and ``feature_map_store`` entries of an index's info.

    With an ``image_root``, the first indexed image is described again with the recorded setup
    and must reproduce its stored descriptor (a wrong whitening or backbone fails here, not in
    the server); whitened descriptors given no ``whitening`` are not checked (an index made the
    0.1.0 way: it is written, and a server asks for the whitening). ``write_store`` writes the
    store at ``store`` from the images (needs ``image_root``); otherwise an existing ``store`` is
    recorded after checking that its names are the index's."""
    info: dict[str, Any] = {
        "whitening": file_record(whitening) if whitening else None,
        "backbone": {"name": settings.get("backbone"), "onnx": file_record(onnx) if onnx else None},
        "feature_map_store": None,
    }
    # Whitened descriptors indexed without --whitening (as before 0.2): nothing to check them
    # against; the index is written, and `serve` asks for the whitening.
    unchecked = bool(settings.get("whitened")) and not whitening
    if not store and (unchecked or not image_root):
        return info
    checked_settings = {**settings, "whitened": bool(settings.get("whitened")) and not unchecked}
    extractor = extractor_from_info({**info, "settings": checked_settings})
    if image_root and len(names) and not unchecked:
        _check_reproduces(extractor, Path(image_root), names[0], vectors[0])
    if store:
        if write_store:
            if not image_root:
                raise ValueError("--write-store needs --image-root (the feature maps are computed from the images)")
            write_feature_map_store(extractor, image_root, names, store, progress)
        else:
            from .feature_map_store import FeatureMapStore

            stored_names = FeatureMapStore(store).names
            if list(stored_names) != list(names):
                raise ValueError(f"{store}: its maps are not the index's images in the index's order")
        info["feature_map_store"] = file_record(store)
    return info
