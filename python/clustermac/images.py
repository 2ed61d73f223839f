"""Image input: decoding any common image into RGB, resizing, and mapping query boxes.

Every function raises :class:`ImageLoadError` (a ``ValueError``) or ``ValueError`` with a
message naming the file or argument and what was wrong; nothing here crashes on bad input.

Conventions (the paper resizes so that the longer side is 1024 px, never upsampling):

- ``load_image`` returns a fully decoded 8-bit RGB ``PIL.Image`` with EXIF orientation applied.
  Transparent pixels are composited over white; 16-bit images are scaled to 8 bits (÷257);
  multi-frame files (GIF, TIFF) give their first frame.
- ``resize_max`` scales by ``s = min(1, max_size / longer side)`` and returns ``s``; a box in
  original pixels maps to the resized image by multiplying all four coordinates by ``s``.
- Boxes are ``(x1, y1, x2, y2)`` in pixels, x to the right, y down, with ``x1 < x2`` and
  ``y1 < y2``; pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)``, so the full image is
  ``(0, 0, width, height)``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._typing import Box, ImageInput, PathLike

__all__ = [
    "ImageLoadError",
    "ImageInput",
    "Box",
    "load_image",
    "resize_max",
    "map_box",
    "crop_box",
    "BOX_TOLERANCE",
    "IMAGE_EXTENSIONS",
    "list_images",
]

#: File extensions taken for images when a folder is scanned (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: How far (in original pixels) a query box may reach outside the image before it is refused:
#: annotations are often rounded outwards by a pixel. Within the tolerance the box is clipped.
BOX_TOLERANCE = 1.0

# Background for transparent pixels: white, as on the pages product photos come from.
_BACKGROUND = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image could not be read: missing, unreadable, truncated, or not an image."""


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Gray images with more than 8 bits ('I;16*', 'I', 'F') → 8-bit RGB.

    PIL's own conversion clips 'I' at 255 (a 16-bit photo would become almost white), so the
    values are rescaled here: 16-bit modes divide by 257 (65535 → 255); 'I' is treated as
    16-bit data (the mode PIL uses for 16-bit PNGs on some versions); 'F' is clipped to 0…255.
    """
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 255.0)
    else:
        scaled = np.clip(values.astype(np.float64), 0.0, 65535.0) / 257.0
    gray = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (an RGB image is returned as is)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(image)
    if mode == "P":
        # A palette may carry transparency; go through RGBA so it is composited, not dropped.
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1" or mode == "L":
        return image.convert("RGB")
    if mode == "LAB":
        raise ImageLoadError(f"{name}: images in CIE LAB colour space are not supported")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, HSV, ...
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"{name}: cannot convert image mode '{mode}' to RGB ({error})") from error


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(
            f"image array must have dtype uint8, got {array.dtype} (convert with np.clip(a, 0, 255).astype(np.uint8))"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"image array must be H×W×3 (RGB), H×W×4 (RGBA) or H×W (grayscale), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty (shape {array.shape})")
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[2] == 4:
        return _to_rgb(Image.fromarray(array, "RGBA"), "image array")
    return Image.fromarray(array, "RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Decode ``source`` into an 8-bit RGB PIL image with EXIF orientation applied.

    ``source`` is a file path (JPEG, PNG, GIF, TIFF, WebP, BMP … anything PIL reads; gray,
    palette, CMYK, 16-bit, alpha), a PIL image, or a uint8 array H×W×3 (RGB), H×W×4 (RGBA) or
    H×W (grayscale). The result is a new image independent of the file and of ``source``.

    Raises :class:`ImageLoadError` (a ``ValueError``) naming the file if it is missing, not a
    file, empty, not an image, truncated or corrupt, or too large for PIL's decompression-bomb
    guard; ``ValueError`` for an array of the wrong dtype or shape; ``TypeError`` for other types.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        try:
            source.load()
            # exif_transpose returns a new image (a copy when there is no orientation tag), so
            # the result never aliases the caller's image.
            return _to_rgb(ImageOps.exif_transpose(source), "image")
        except OSError as error:
            raise ImageLoadError(f"image: cannot decode the PIL image ({error})") from error
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"image must be a path, a PIL image or a uint8 numpy array, got {type(source).__name__}")
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise ImageLoadError(f"{name}: file does not exist")
    if path.is_dir():
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageLoadError(f"{name}: cannot read file ({error})") from error
    if size == 0:
        raise ImageLoadError(f"{name}: not an image (the file is empty)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now so that truncation is reported here, naming the file
            # In place: the decoded image is ours, and a copy of a large photo is costly.
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image, name)
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"{name}: not an image (format not recognised)") from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: image too large to decode safely ({error})") from error
    except PermissionError as error:
        raise ImageLoadError(f"{name}: cannot read file (permission denied)") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, ImageLoadError):
            raise
        message = str(error)
        problem = "truncated" if "truncated" in message.lower() else "corrupt or unreadable"
        raise ImageLoadError(f"{name}: {problem} image ({message})") from error


def _check_max_size(max_size: int) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
    return int(max_size)


def resize_max(image: Image.Image | np.ndarray, max_size: int = 1024) -> tuple[Image.Image, float]:
    """Resize so that the longer side is at most ``max_size`` pixels; never upsample.

    Returns ``(resized, scale)`` where ``scale = min(1, max_size / longer side)``; a point
    (x, y) of the input maps to (x·scale, y·scale). Sides are rounded to whole pixels (at least
    1). With ``scale == 1`` the input itself is returned (PIL images) — do not mutate it.
    Downsampling is bicubic with antialiasing; on very large inputs PIL first reduces by an
    integer factor (``reducing_gap=3``), which keeps a 6000×4000 photo fast and its memory
    bounded with no visible difference.
    """
    max_size = _check_max_size(max_size)
    if not isinstance(image, Image.Image):
        image = load_image(image)
    width, height = image.size
    longer = max(width, height)
    if longer <= max_size:
        return image, 1.0
    scale = max_size / longer
    new_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return image.resize(new_size, Image.BICUBIC, reducing_gap=3.0), scale


def _parse_box(box: Box, name: str = "box") -> tuple[float, float, float, float]:
    try:
        values = [float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be 4 numbers (x1, y1, x2, y2), got {box!r}") from error
    if len(values) != 4:
        raise ValueError(f"{name} must be 4 numbers (x1, y1, x2, y2), got {len(values)}: {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} {tuple(values)} contains NaN or infinity")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name} {tuple(values)} is empty: need x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _check_inside(
    box: tuple[float, float, float, float], width: float, height: float, tolerance: float, name: str
) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        raise ValueError(
            f"{name} {box} is outside the image of size {width:g}×{height:g} (width×height); "
            f"boxes are (x1, y1, x2, y2) in pixels of that image, within [0, {width:g}]×"
            f"[0, {height:g}]"
        )
    clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"{name} {box} does not overlap the image of size {width:g}×{height:g}")
    return clipped


def map_box(box: Box, scale: float, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Map a query box from original-image pixels to the resized image.

    ``image_size`` is the ORIGINAL image's ``(width, height)``; ``scale`` is what
    :func:`resize_max` returned. The box must lie inside the original image, up to
    :data:`BOX_TOLERANCE` pixels (rounded annotations), and is clipped to it; the result is
    ``(x1·scale, y1·scale, x2·scale, y2·scale)`` as floats. Raises ``ValueError`` naming the box
    and the image size for a box that is malformed, empty (x2 <= x1 or y2 <= y1) or outside.
    """
    if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from error
    if not (width > 0 and height > 0):
        raise ValueError(f"image_size must be positive (width, height), got {image_size!r}")
    x1, y1, x2, y2 = _check_inside(_parse_box(box), width, height, BOX_TOLERANCE, "box")
    return (x1 * scale, y1 * scale, x2 * scale, y2 * scale)


def crop_box(image: Image.Image, box: Box) -> Image.Image:
    """Crop ``image`` to ``box`` (pixels of this image), keeping every pixel the box touches.

    Fractional coordinates (e.g. from :func:`map_box`) are widened to whole pixels:
    ``floor(x1), floor(y1), ceil(x2), ceil(y2)``. The box must lie inside the image up to
    :data:`BOX_TOLERANCE` pixels; otherwise ``ValueError`` naming the box and the image size.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    width, height = image.size
    x1, y1, x2, y2 = _check_inside(_parse_box(box), width, height, BOX_TOLERANCE, "box")
    left, top = int(math.floor(x1)), int(math.floor(y1))
    right, bottom = int(math.ceil(x2)), int(math.ceil(y2))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


def list_images(folder: PathLike) -> list[str]:
    """Image files under ``folder`` (recursively, by :data:`IMAGE_EXTENSIONS`), as sorted paths
    relative to it."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(names)


def __getattr__(name: str) -> Any:
    # The old name of ImageInput.
    if name == "ImageSource":
        warnings.warn(
            "clustermac.images.ImageSource is deprecated: use clustermac.images.ImageInput",
            DeprecationWarning,
            stacklevel=2,
        )
        return ImageInput
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
