"""What a clustermac file holds, for ``clustermac info PATH``: its kind, size, settings and the
code that computed it (:mod:`clustermac.kernels`), compared with this machine's.

Each file is opened by its own loader, so a malformed one is refused with the loader's
:class:`~clustermac.CorruptFileError` naming it; checksums are read only with ``verify``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._typing import PathLike
from .kernels import describe_kernels, kernel_record, recorded_kernels, runs_here

__all__ = ["describe_file", "format_description"]


def describe_file(path: PathLike, verify: bool = False) -> dict[str, Any]:
    """A JSON-ready description of a descriptor file (``desc.npy`` or its ``.json`` manifest), a
    shard folder, an index folder, a whitening file (``.npz``) or a feature-map store (``.cmfm``):
    ``{"path", "kind", "count", "dim", "settings", "kernels", "same_kernels_here", ...}`` with
    ``kernels`` the list of code records (``[{}]``: not recorded) and ``same_kernels_here``
    whether every recorded one is this process's code (None when none is recorded). Raises
    ``ValueError`` for a path that is none of these, CorruptFileError for a malformed file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        out = _index(path, verify) if _is_index(path) else _descriptors(path, verify)
    elif path.suffix == ".npz":
        out = _whitening(path)
    elif path.suffix == ".cmfm":
        out = _feature_map_store(path)
    elif path.suffix in (".npy", ".json"):
        out = _descriptors(path.with_suffix(".npy"), verify)
    else:
        raise ValueError(
            f"{path}: not a file clustermac writes (expected desc.npy / desc.json, a shard or index folder, "
            "a whitening .npz or a feature-map store .cmfm)"
        )
    out["same_kernels_here"] = runs_here(out["kernels"])
    return {"path": str(path), **out}


def _is_index(folder: Path) -> bool:
    return (folder / "CURRENT").is_file() or (folder / "meta.json").is_file()


def _descriptors(path: Path, verify: bool) -> dict[str, Any]:
    from .descriptors import load_descriptors

    vectors, manifest = load_descriptors(path, verify=verify)
    return {
        "kind": "descriptor shards" if path.is_dir() else "descriptors",
        "format_version": manifest.get("version", 1),
        "count": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "failed": len(manifest["failed"]),
        "settings": manifest["settings"],
        "kernels": recorded_kernels(manifest.get("kernels")),
        "verified": verify,
    }


def _index(folder: Path, verify: bool) -> dict[str, Any]:
    from .search import Index

    index = Index.load(folder, verify=verify)
    info = index.info
    out = {
        "kind": "index",
        "backend": index.backend,
        "count": len(index),
        "dim": index.dim,
        "settings": info.get("settings") if isinstance(info.get("settings"), dict) else None,
        "kernels": recorded_kernels(info.get("kernels")),
        "verified": verify,
    }
    for key in ("image_root", "whitening", "feature_map_store", "faiss"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


def _whitening(path: Path) -> dict[str, Any]:
    from .descriptors.whitening import read_whitening_file

    arrays, meta = read_whitening_file(path)
    kernels = meta.get("kernels")
    return {
        "kind": "whitening",
        "format_version": meta.get("format_version"),
        "dim": int(arrays["projection"].shape[0]),
        "input_dim": int(arrays["projection"].shape[1]),
        "clustering_pca": "pca_basis" in arrays,
        "settings": meta["settings"],
        "kernels": recorded_kernels([kernels] if isinstance(kernels, dict) else None),
    }


def _feature_map_store(path: Path) -> dict[str, Any]:
    from .search import FeatureMapStore

    store = FeatureMapStore(path)
    shapes = {tuple(int(v) for v in store.codes(i).shape) for i in range(min(len(store), 1000))}
    return {
        "kind": "feature-map store",
        "count": len(store),
        "dim": next(iter(shapes))[2] if shapes else None,
        "map_shapes": sorted(shapes)[:5],
        "labels": bool(len(store)) and bool(store.labels(0)),
        "settings": None,
        "kernels": [{}],  # the store's binary format does not record them
    }


def format_description(description: dict[str, Any]) -> str:
    """The description of :func:`describe_file` as a few lines for a person."""
    d = description
    lines = [f"{d['path']}: {d['kind']}"]
    if d["kind"] in ("descriptors", "descriptor shards"):
        counts = f"{d['count']} images of dimension {d['dim']}, {d['failed']} failed"
        lines.append(f"  {counts} (format {d['format_version']})")
    elif d["kind"] == "index":
        lines.append(f"  {d['count']} images of dimension {d['dim']}, backend {d['backend']}")
        if d.get("image_root"):
            lines.append(f"  image root: {d['image_root']}")
        for key in ("whitening", "feature_map_store"):
            if isinstance(d.get(key), dict):
                lines.append(f"  {key.replace('_', '-')}: {d[key].get('path')}")
    elif d["kind"] == "whitening":
        reduce = f" -> {d['dim']}" if d["dim"] != d["input_dim"] else ""
        pca = ", with the dataset-learned clustering PCA" if d["clustering_pca"] else ""
        lines.append(f"  {d['input_dim']} dimensions{reduce}{pca} (format {d['format_version']})")
    else:
        shapes = ", ".join("×".join(map(str, s)) for s in d["map_shapes"])
        labels = "yes" if d["labels"] else "no"
        lines.append(f"  {d['count']} maps (H×W×D: {shapes or 'none'}), cluster labels: {labels}")
    if d.get("settings"):
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in sorted(d["settings"].items())))
    for record in d["kernels"]:
        lines.append(f"  computed by: {describe_kernels(record)}")
    same = d["same_kernels_here"]
    here = describe_kernels(kernel_record())
    if same is None:
        lines.append(f"  this machine: {here}")
    elif same:
        lines.append("  this machine runs the same code")
    else:
        lines.append(
            f"  this machine runs other code ({here}): what it computes for the same images may differ in the last bits"
        )
    if d.get("verified") is False:
        lines.append("  (checksums not read: add --verify to check them)")
    return "\n".join(lines)
