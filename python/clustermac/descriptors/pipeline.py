"""Extraction over many images: a threaded pipeline and a progress bar (tqdm, imported only
when a bar is shown)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .._typing import Box, ImageInput

if TYPE_CHECKING:  # the extractor imports this module, not the other way round
    from .extractor import Extractor

__all__ = ["iter_descriptors", "iter_feature_maps", "per_image_in_order", "progress_bar"]

# Images started beyond those being worked on, so that a worker never waits for the next one.
_LOOKAHEAD = 2

T = TypeVar("T")


def per_image_in_order(
    extractor: Extractor, count: int, work: Callable[[int, bool], T]
) -> Iterator[tuple[int, T | Exception]]:
    """``(i, work(i, side_by_side) or its exception)`` for i = 0 … count − 1, in that order.

    :attr:`Backbone.parallel_images` images at a time (one per core, up to 8), each on a worker
    thread that does all of that image's work (decoding, the network on the backbone's side-by-side
    session, pooling/clustering; ONNX Runtime, Pillow and the C++ core release the GIL). Side by
    side, images keep the cores busier than one image whose layers are split between threads,
    which wait for each other at every layer, and give the same values (benchmarks/extraction.py).
    With one worker (a one-core backbone, or a backbone object without ``parallel_images``)
    ``side_by_side`` is False: each image runs on the backbone's own session.
    """
    workers = max(1, min(getattr(extractor.backbone, "parallel_images", 1), count))
    side_by_side = workers > 1

    def guarded(i: int) -> T | Exception:
        try:
            return work(i, side_by_side)
        except Exception as error:  # handed to the caller, per image
            return error

    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = {i: pool.submit(guarded, i) for i in range(min(workers + _LOOKAHEAD, count))}
        for i in range(count):
            result = started.pop(i).result()
            following = i + workers + _LOOKAHEAD
            if following < count:
                started[following] = pool.submit(guarded, following)
            yield i, result


def iter_descriptors(
    extractor: Extractor,
    images: Sequence[ImageInput],
    boxes: Sequence[Box | None] | None = None,
    progress: bool = True,
    description: str = "extract",
) -> Iterator[tuple[int, np.ndarray | Exception]]:
    """Yields ``(index, descriptor or exception)`` in input order (see :meth:`Extractor.iter_extract`),
    several images at once (:func:`per_image_in_order`)."""
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(
            f"boxes: expected one box (or None) per image, got {len(boxes)} boxes for {len(images)} images"
        )
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    bar = progress_bar(len(images), description, progress)

    def describe(i: int, side_by_side: bool) -> np.ndarray:
        prepared = extractor.prepare_scales(images[i], boxes[i])
        return extractor.descriptor_from_feature_maps(extractor.feature_maps(prepared, side_by_side))

    for i, result in per_image_in_order(extractor, len(images), describe):
        yield i, (_named_error(images[i], result) if isinstance(result, Exception) else result)
        bar.update(1)
    bar.close()


def iter_feature_maps(
    extractor: Extractor, images: Sequence[ImageInput], progress: bool, description: str
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """[(feature map, rgb) at each scale] of each readable image (:meth:`Extractor.feature_maps`),
    several images at once (:func:`per_image_in_order`); unreadable ones are skipped with a warning."""
    bar = progress_bar(len(images), description, progress)

    def maps(i: int, side_by_side: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        return extractor.feature_maps(extractor.prepare_scales(images[i]), side_by_side)

    for i, result in per_image_in_order(extractor, len(images), maps):
        bar.update(1)
        if isinstance(result, (ValueError, OSError)):
            warnings.warn(f"skipping {_name_of(images[i])}: {result}", stacklevel=2)
        elif isinstance(result, Exception):
            raise result
        else:
            yield result
    bar.close()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, description: str, enabled: bool, unit: str = "img") -> Any:
    """A tqdm bar of ``total`` items (images by default; ``unit="B"`` shows bytes in KiB/MiB/GiB
    and the rate), or a silent stand-in when not ``enabled``."""
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False, **scale)


def _name_of(image: Any) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"


def _named_error(image: Any, error: Exception) -> Exception:
    if isinstance(image, (str, os.PathLike)) and str(image) in str(error):
        return error
    return type(error)(f"{_name_of(image)}: {error}") if isinstance(error, (ValueError, OSError)) else error
