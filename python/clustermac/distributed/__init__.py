"""Extraction at scale: descriptors extracted on a Ray cluster (:func:`extract_folder_ray`) and
written as a folder of memory-mappable shards read back as one array (:class:`ShardedArray`,
through :func:`clustermac.load_descriptors`). Ray is imported only when extraction runs
(``pip install clustermac[ray]``)."""

from __future__ import annotations

from .ray_extract import connect_ray, extract_folder_ray
from .shards import SHARD_SIZE, ShardedArray, load_shards

__all__ = ["extract_folder_ray", "connect_ray", "ShardedArray", "load_shards", "SHARD_SIZE"]
