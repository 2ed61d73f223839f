"""Learned state of an extractor: the PCA-whitening and the dataset-learned clustering PCA,
and the whitening file (``.npz``: the arrays plus the settings they were learned for).

Whitening file, format version 1 (clustermac 0.1.0 onwards): an uncompressed NumPy ``.npz`` with
``mean`` (float32 D), ``projection`` (float32 k × D), optionally ``pca_mean`` (float32 F) and
``pca_basis`` (float32 F × C), and ``meta``: uint8 bytes of the UTF-8 JSON
``{"format_version": 1, "settings": {...}, "kernels": {...}}`` (``kernels``: the
:func:`~clustermac.kernel_record` of the process that learned it, for the reader; files without
it load as before). See :func:`load_whitening_file` for what is checked.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from .._typing import PathLike
from ..errors import CorruptFileError
from ..files import atomic_write_bytes, output_lock, read_npy_header, remove_stale_temporaries
from ..kernels import kernel_record

__all__ = [
    "WHITENING_FORMAT_VERSION",
    "SETTINGS_BEFORE_THEY_WERE_SAVED",
    "PCA_IMAGES",
    "PCA_LOCATIONS_PER_IMAGE",
    "fit_pca",
    "sample_local_features",
    "fit_whitening_on_vectors",
    "save_whitening_file",
    "load_whitening_file",
    "read_whitening_file",
]

WHITENING_FORMAT_VERSION = 1
# Settings added after whitening files were first written, with the value older files imply.
# ("scales" is recorded only when multi-scale, so a file without it is single-scale.)
# ("similarity_precision" is recorded only when bfloat16, so a file without it is float32.)
SETTINGS_BEFORE_THEY_WERE_SAVED = {"cluster_pooling": "mask", "scales": [1.0], "similarity_precision": "float32"}
# Dataset-learned clustering PCA: how many images and local features per image it sees.
PCA_IMAGES = 100
PCA_LOCATIONS_PER_IMAGE = 200


def fit_pca(features: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and D×C basis of the top principal components of N×D features."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    mean = features.mean(axis=0)
    centred = features - mean
    covariance = centred.T.astype(np.float64) @ centred / max(1, len(features) - 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:n_components]
    return mean.astype(np.float32), np.ascontiguousarray(vectors[:, order], dtype=np.float32)


def sample_local_features(
    maps: Iterable[tuple[np.ndarray, Any]], seed: int, per_image: int = PCA_LOCATIONS_PER_IMAGE
) -> np.ndarray:
    """Up to ``per_image`` local D-vectors of each feature map, drawn with ``seed``, stacked."""
    rng = np.random.default_rng(seed)
    local_features = []
    for fmap, _ in maps:
        local = fmap.reshape(fmap.shape[0], -1).T
        take = rng.choice(local.shape[0], size=min(per_image, local.shape[0]), replace=False)
        local_features.append(np.asarray(local[np.sort(take)], dtype=np.float32))
    if not local_features:
        raise ValueError("fit_clustering_pca: no feature maps (none of the images could be read)")
    return np.concatenate(local_features)


def fit_whitening_on_vectors(
    vectors: list[np.ndarray], dim: int | None, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitening (mean, projection) learned on the l2-normalised training vectors of many
    images; zero vectors (empty regions) are left out. ``dim`` None: as many dimensions as the
    vectors allow."""
    if not vectors:
        raise ValueError("fit_whitening: no feature maps (none of the images could be read)")
    stacked = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
    stacked = stacked[np.linalg.norm(stacked, axis=1) > 0]
    dim = dim or min(stacked.shape[1], stacked.shape[0] - 1)
    if dim < 1:
        raise ValueError(f"fit_whitening: need at least 2 non-zero training vectors, got {stacked.shape[0]}")
    return _core.fit_pca_whitening(stacked, dim, shrinkage)


def save_whitening_file(path: PathLike, arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> None:
    """Write the arrays and the settings they were learned for: one ``.npz`` written beside the
    target, fsynced and renamed over it, while holding the output lock of ``path`` (a second
    writer gets :class:`~clustermac.OutputLockedError`). The arrays are checked first, as the
    loader would check them, so a file that cannot be loaded is never written."""
    path = Path(path)
    meta = {"format_version": WHITENING_FORMAT_VERSION, "settings": settings, "kernels": kernel_record()}
    contents = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _check_arrays(path, contents, ValueError)
    contents["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    with output_lock(path, "save_whitening"):
        remove_stale_temporaries(path)
        atomic_write_bytes(path, buffer.getvalue())


# What a whitening file may hold; anything else in it is ignored.
_WHITENING_ARRAYS = ("mean", "projection", "pca_mean", "pca_basis")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, read without trusting it: every member's ``.npy`` header must
    describe exactly the member's bytes (a forged shape would make NumPy allocate what it says),
    and object arrays are refused. Raises CorruptFileError."""
    size = path.stat().st_size
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > 64:
                raise CorruptFileError(path, f"holds {len(members)} members; a whitening file holds a few")
            for info in members:
                if not info.filename.endswith(".npy") or info.filename[:-4] in arrays:
                    raise CorruptFileError(path, f"unexpected member {info.filename[:80]!r}")
                if info.compress_size > size or info.file_size > max(info.compress_size, 1) * 1100:
                    raise CorruptFileError(path, f"member {info.filename!r} declares impossible sizes")
                data = archive.read(info)  # checks the CRC-32
                buffer = io.BytesIO(data)
                shape, fortran, dtype, offset = read_npy_header(buffer, path, f"member {info.filename!r}")
                if dtype.hasobject or fortran:
                    raise CorruptFileError(path, f"member {info.filename!r} holds {dtype} (Fortran order: {fortran})")
                needed = offset + math.prod(shape) * dtype.itemsize
                if needed != len(data):
                    raise CorruptFileError(
                        path, f"member {info.filename!r} has {len(data)} bytes; its header says {needed}"
                    )
                array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
                arrays[info.filename[:-4]] = array
    except CorruptFileError:
        raise
    except Exception as error:  # zipfile and NumPy parsing untrusted bytes: any failure means a bad file
        if isinstance(error, FileNotFoundError):
            raise
        raise CorruptFileError(path, f"not a clustermac whitening file ({type(error).__name__}: {error})") from None
    return arrays


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], error=CorruptFileError) -> None:
    """Shapes, dtypes and values of a whitening: float32 mean (D,) and projection (k, D) with
    1 <= k <= D, finite, the projection not all zero; optionally the clustering PCA, float32
    pca_mean (F,) and pca_basis (F, C), finite."""

    def fail(problem: str):
        return error(path, problem) if error is CorruptFileError else error(f"{path}: {problem}")

    for key in ("mean", "projection"):
        if key not in arrays:
            raise fail(f"lacks the array {key!r}; expected 'mean' and 'projection'")
    if ("pca_mean" in arrays) != ("pca_basis" in arrays):
        raise fail("holds only one of 'pca_mean' and 'pca_basis'; expected both or neither")
    expected_ndim = {"mean": 1, "projection": 2, "pca_mean": 1, "pca_basis": 2}
    for key, array in arrays.items():
        if key not in expected_ndim:
            continue
        if array.dtype != np.float32 or array.ndim != expected_ndim[key] or 0 in array.shape:
            raise fail(
                f"{key!r} is {array.dtype} of shape {array.shape}; expected non-empty {expected_ndim[key]}-D float32"
            )
        if not np.isfinite(array).all():
            raise fail(f"{key!r} holds NaN or Inf")
    mean, projection = arrays["mean"], arrays["projection"]
    if projection.shape[1] != mean.shape[0] or projection.shape[0] > mean.shape[0]:
        raise fail(
            f"'projection' has shape {projection.shape} for a 'mean' of length {mean.shape[0]}; "
            f"expected (k, {mean.shape[0]}) with k <= {mean.shape[0]}"
        )
    if not projection.any():
        raise fail("'projection' is all zeros: every whitened descriptor would be zero")
    if "pca_mean" in arrays and arrays["pca_basis"].shape[0] != arrays["pca_mean"].shape[0]:
        raise fail(
            f"'pca_basis' has shape {arrays['pca_basis'].shape} for a 'pca_mean' of length "
            f"{arrays['pca_mean'].shape[0]}"
        )


def read_whitening_file(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the ``meta`` object of a whitening file, validated:
    :class:`~clustermac.CorruptFileError` (a ``ValueError``) naming the file and the problem if it
    is not a readable whitening file of a known version, or holds arrays of the wrong shape or
    dtype, NaN, Inf or an all-zero projection. ``meta["settings"]`` is completed with
    :data:`SETTINGS_BEFORE_THEY_WERE_SAVED` for the settings an older file does not record."""
    path = Path(path)
    arrays = _read_npz(path)
    if "meta" not in arrays:
        raise CorruptFileError(path, "not a clustermac whitening file (no 'meta' array)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CorruptFileError(path, f"unreadable 'meta' ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings", {}), dict):
        raise CorruptFileError(path, "'meta' is not a JSON object with a 'settings' object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= WHITENING_FORMAT_VERSION:
        raise CorruptFileError(
            path,
            f"whitening file format version {str(version)[:40]}; this clustermac reads versions 1 to "
            f"{WHITENING_FORMAT_VERSION} (a newer clustermac may read it)",
        )
    arrays = {k: np.array(v) for k, v in arrays.items() if k in _WHITENING_ARRAYS}  # writable copies
    _check_arrays(path, arrays)
    meta["settings"] = {**SETTINGS_BEFORE_THEY_WERE_SAVED, **meta.get("settings", {})}
    return arrays, meta


def load_whitening_file(
    path: PathLike, settings: dict[str, Any], recorded_out: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of a whitening file, checked by :func:`read_whitening_file`; ``ValueError`` if it
    was learned for settings other than ``settings`` (a setting missing from an older file takes
    the value of :data:`SETTINGS_BEFORE_THEY_WERE_SAVED`). ``recorded_out`` (a dict), if given,
    receives the settings the file records."""
    arrays, meta = read_whitening_file(path)
    saved = meta["settings"]
    different = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: file has {a!r}, extractor has {b!r}" for k, (a, b) in different.items())
        # Since the default method became clustermac-box, a whitening learned with the earlier default
        # is refused by a default extractor: say how to keep using it.
        method = saved.get("method")
        hint = f" or describe with method={method!r} (--method {method})" if "method" in different else ""
        raise ValueError(
            f"{path}: whitening was learned for other settings ({detail}); learn a new one with fit_whitening()" + hint
        )
    if recorded_out is not None:
        recorded_out.update(saved)
    return arrays
