"""Extraction over many images: a threaded pipeline and a progress bar (tqdm, imported only
when a bar is shown)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .._typing import Box, ImageInput

if TYPE_CHECKING:  # the extractor imports this module, not the other way round
    from .extractor import Extractor, PreparedImage

__all__ = ["iter_descriptors", "iter_feature_maps", "progress_bar"]

# Images decoded ahead of the backbone.
_LOOKAHEAD = 4


def iter_descriptors(
    extractor: Extractor,
    images: Sequence[ImageInput],
    boxes: Sequence[Box | None] | None = None,
    progress: bool = True,
    description: str = "extract",
) -> Iterator[tuple[int, np.ndarray | Exception]]:
    """Yields ``(index, descriptor or exception)`` in input order (see :meth:`Extractor.iter_extract`).

    Three stages overlap: image decoding (one thread, a few images ahead), the backbone
    (ONNX Runtime's own threads) and the pooling/clustering of the previous image (C++,
    GIL released).
    """
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(
            f"boxes: expected one box (or None) per image, got {len(boxes)} boxes for {len(images)} images"
        )
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    bar = progress_bar(len(images), description, progress)

    def prepare(i: int) -> list[PreparedImage] | Exception:
        try:
            return extractor.prepare_scales(images[i], boxes[i])
        except Exception as error:  # reported to the caller, per image
            return _named_error(images[i], error)

    def pool(maps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return extractor.descriptor_from_feature_maps(maps)

    with ThreadPoolExecutor(max_workers=1) as decoder, ThreadPoolExecutor(max_workers=1) as pooler:
        pending = {i: decoder.submit(prepare, i) for i in range(min(_LOOKAHEAD, len(images)))}
        pooled: tuple[int, Any] | None = None
        for i in range(len(images)):
            prepared = pending.pop(i).result()
            if i + _LOOKAHEAD < len(images):
                pending[i + _LOOKAHEAD] = decoder.submit(prepare, i + _LOOKAHEAD)
            current: tuple[int, Any]
            if isinstance(prepared, Exception):
                current = (i, prepared)
            else:
                try:
                    current = (i, pooler.submit(pool, extractor.feature_maps(prepared)))
                except Exception as error:
                    current = (i, _named_error(images[i], error))
            if pooled is not None:
                yield _resolve(pooled)
                bar.update(1)
            pooled = current
        if pooled is not None:
            yield _resolve(pooled)
            bar.update(1)
    bar.close()


def iter_feature_maps(
    extractor: Extractor, images: Sequence[ImageInput], progress: bool, description: str
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """[(feature map, rgb) at each scale] of each readable image (:meth:`Extractor.feature_maps`);
    unreadable ones are skipped with a warning."""
    bar = progress_bar(len(images), description, progress)
    for image in images:
        try:
            yield extractor.feature_maps(extractor.prepare_scales(image))
        except (ValueError, OSError) as error:
            warnings.warn(f"skipping {_name_of(image)}: {error}", stacklevel=2)
        finally:
            bar.update(1)
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


def _resolve(item: tuple[int, Any]) -> tuple[int, np.ndarray | Exception]:
    i, value = item
    if isinstance(value, Exception):
        return i, value
    try:
        return i, value.result()
    except Exception as error:
        return i, error
