"""Descriptors of an image folder on disk: a memory-mappable ``.npy`` plus a JSON manifest.

Layout for ``--out descriptors.npy``::

    descriptors.npy          N×D float32, row i is the image manifest["images"][i]
    descriptors.json         {"images": [...], "failed": {name: reason}, "settings": {...}}
    descriptors.npy.parts/   while running: finished chunks, each written atomically

An interrupted run leaves finished chunks in ``.parts``; the next run with the same settings
reuses them and extracts only the rest. The final files are written to temporary names and
renamed, so a crash never leaves a half-written ``.npy`` or manifest behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..files import atomic_save_npy, atomic_write_bytes, temporary_file_beside
from ..images import list_images
from .extractor import Extractor

__all__ = ["extract_folder", "load_descriptors", "manifest_path", "CHUNK_SIZE"]

# Images per chunk written to the parts folder (the unit of resumption).
CHUNK_SIZE = 64


def manifest_path(out: PathLike) -> Path:
    """The manifest file beside a descriptor file."""
    return Path(out).with_suffix(".json")


def load_descriptors(out: PathLike, mmap: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The descriptors (memory-mapped by default) and the manifest written by :func:`extract_folder`."""
    out = Path(out)
    manifest_file = manifest_path(out)
    if not out.is_file() or not manifest_file.is_file():
        raise ValueError(
            f"{out}: expected a descriptor file and its manifest {manifest_file.name} (made by `clustermac extract`)"
        )
    manifest = json.loads(manifest_file.read_text())
    vectors = np.load(out, mmap_mode="r" if mmap else None)
    if vectors.ndim != 2 or vectors.shape[0] != len(manifest.get("images", [])):
        raise ValueError(
            f"{out}: {vectors.shape[0]} rows but the manifest lists {len(manifest.get('images', []))} images"
        )
    return vectors, manifest


def extract_folder(
    extractor: Extractor,
    folder: PathLike,
    out: PathLike,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Extract the descriptors of every image in ``folder`` into ``out`` (see module doc).

    Unreadable images are reported (returned in ``manifest["failed"]``) and skipped; they
    never end the run. Returns the manifest.
    """
    folder = Path(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else list_images(folder)
    settings = extractor.settings()
    settings.update(whitened=extractor.is_whitened, dim=extractor.dim)
    parts = Path(str(out) + ".parts")
    _prepare_parts(parts, settings, names)

    chunks = [names[i : i + CHUNK_SIZE] for i in range(0, len(names), CHUNK_SIZE)]
    done_chunks = {i for i in range(len(chunks)) if (parts / f"chunk_{i:06d}.json").is_file()}
    todo = [i for i in range(len(chunks)) if i not in done_chunks]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(names),
            initial=sum(len(chunks[i]) for i in done_chunks),
            desc="extract",
            unit="img",
            dynamic_ncols=True,
        )
    for c in todo:
        chunk = chunks[c]
        vectors = np.zeros((len(chunk), extractor.dim), dtype=np.float32)
        failed: dict[str, str] = {}
        for j, result in extractor.iter_extract([str(folder / n) for n in chunk], progress=False):
            if isinstance(result, Exception):
                failed[chunk[j]] = f"{type(result).__name__}: {result}"
                if bar is not None:
                    bar.write(f"skipped {chunk[j]}: {result}")
            else:
                vectors[j] = result
            if bar is not None:
                bar.update(1)
        atomic_save_npy(parts / f"chunk_{c:06d}.npy", vectors)
        # The JSON is the chunk's commit mark: written last.
        atomic_write_bytes(parts / f"chunk_{c:06d}.json", json.dumps({"names": chunk, "failed": failed}).encode())
    if bar is not None:
        bar.close()
    return _assemble(parts, out, chunks, settings)


def _prepare_parts(parts: Path, settings: dict[str, Any], names: list[str]) -> None:
    """Create the parts folder, or check that the one left by an earlier run matches."""
    state = {"settings": settings, "images": names, "chunk_size": CHUNK_SIZE}
    state_file = parts / "run.json"
    if state_file.is_file():
        try:
            previous = json.loads(state_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == json.loads(json.dumps(state)):
            return
        shutil.rmtree(parts)  # another run's leftovers: start afresh
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state_file, json.dumps(state).encode())


def _assemble(parts: Path, out: Path, chunks: list[list[str]], settings: dict[str, Any]) -> dict[str, Any]:
    """Stream the finished chunks into ``out`` (through a memory map, so memory stays flat in
    the number of images), then write the manifest; both by rename."""
    infos = [json.loads((parts / f"chunk_{c:06d}.json").read_text()) for c in range(len(chunks))]
    kept = [[j for j, n in enumerate(chunk) if n not in info["failed"]] for chunk, info in zip(chunks, infos)]
    images = [chunk[j] for chunk, keep in zip(chunks, kept) for j in keep]
    failed = {name: reason for info in infos for name, reason in info["failed"].items()}
    dim = int(settings["dim"])
    fd, tmp = temporary_file_beside(out)
    os.close(fd)
    try:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), dim))
        row = 0
        for c, keep in enumerate(kept):
            vectors = np.load(parts / f"chunk_{c:06d}.npy")
            matrix[row : row + len(keep)] = vectors[keep]
            row += len(keep)
        matrix.flush()
        del matrix
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = {"images": images, "failed": failed, "settings": settings}
    atomic_write_bytes(manifest_path(out), json.dumps(manifest, indent=1).encode())
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
