"""Learned state of an extractor: the PCA-whitening and the dataset-learned clustering PCA,
and the whitening file (``.npz``: the arrays plus the settings they were learned for)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from .._typing import PathLike
from ..files import atomic_write_bytes

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
]

WHITENING_FORMAT_VERSION = 1
# Settings added after whitening files were first written, with the value older files imply.
SETTINGS_BEFORE_THEY_WERE_SAVED = {"cluster_pooling": "mask"}
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
    """Write the arrays and the settings they were learned for (atomic write)."""
    meta = {"format_version": WHITENING_FORMAT_VERSION, "settings": settings}
    contents = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_whitening_file(path: PathLike, settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a whitening file; ValueError if it is not one, or if it was learned for
    settings other than ``settings`` (a setting missing from an older file takes the value of
    :data:`SETTINGS_BEFORE_THEY_WERE_SAVED`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            arrays = {k: np.ascontiguousarray(data[k]) for k in data.files if k != "meta"}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a clustermac whitening file ({error})") from error
    saved = {**SETTINGS_BEFORE_THEY_WERE_SAVED, **meta.get("settings", {})}
    different = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: file has {a!r}, extractor has {b!r}" for k, (a, b) in different.items())
        raise ValueError(
            f"{path}: whitening was learned for other settings ({detail}); learn a new one with fit_whitening()"
        )
    return arrays
