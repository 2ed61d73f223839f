"""The paper's figures 3-7, drawn from our own code with PIL (pictures) and hand-written SVG (plots).

- Fig. 7 :func:`cluster_figure`: image | l2 norm of the local features | NCut cluster map.
- Fig. 6 :func:`spatial_ablation_figure`: clusters without and with a spatial term.
- Fig. 5 :func:`pca_dimensions_figure`: selected PCA dimensions of the local features as maps.
- Fig. 4 :func:`region_precision` (Eq. 1), :func:`precision_threshold_curve`,
  :func:`region_precision_study` and :func:`region_precision_figure`: the share of regions
  whose precision reaches each threshold, R-MAC grid against clusters.
- Fig. 3 :func:`line_plot_svg`: mAP against the PCA dimension C (and any other line chart).

Every function is deterministic: same input, same pixels / same SVG text. Picture figures carry
the pixel boxes of their panels in ``figure.info["panel_boxes"]`` (``(x0, y0, x1, y1)``,
half-open) and the captions in ``figure.info["captions"]``, so callers and tests can find them.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._typing import ImageInput, PathLike
from ..files import atomic_write_bytes

if TYPE_CHECKING:  # imported for annotations only; the figures need no backbone
    from ..descriptors import Extractor

Curve = tuple[np.ndarray, np.ndarray]

PANEL_SIZE = 320  # longer side of each picture panel, pixels
MARGIN = 8  # around and between panels, pixels
CAPTION_HEIGHT = 24  # band under each panel for its caption, pixels
CAPTION_FONT_SIZE = 14
BACKGROUND = (255, 255, 255)
# Locations with a negative label (no cluster) and NaN values are drawn in this grey; the cluster
# palette never uses it.
NO_DATA_COLOUR = (128, 128, 128)
PRECISION_THRESHOLDS = np.linspace(0.0, 1.0, 21)
# A precision within this distance below a threshold counts as reaching it: thresholds made by
# np.linspace are not exact decimals (0.15 comes out as 0.15000000000000002).
THRESHOLD_TOLERANCE = 1e-9

# Sequential colour map for scalar maps (feature norms, PCA dimensions): the anchor colours of
# matplotlib's "viridis" at 0, 1/4, 1/2, 3/4, 1 (van der Walt & Smith), interpolated linearly.
_SEQUENTIAL_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
# Cluster colours: saturated, mutually distinct hues first; more are generated when needed.
_BASE_CLUSTER_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (0, 0, 0),
]
# Line colours of the SVG charts (distinguishable in colour-blind vision too).
_SERIES_COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"]


# ------------------------------------------------------------------------------ validation
def _check_feature_map(feature_map: np.ndarray, name: str = "feature_map") -> np.ndarray:
    if not isinstance(feature_map, np.ndarray):
        raise ValueError(f"{name}: expected a NumPy array D×H×W, got {type(feature_map).__name__}")
    if feature_map.ndim != 3 or min(feature_map.shape) < 1:
        raise ValueError(f"{name}: expected a non-empty D×H×W array, got shape {feature_map.shape}")
    if not np.issubdtype(feature_map.dtype, np.number) or np.issubdtype(feature_map.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got dtype {feature_map.dtype}")
    return np.asarray(feature_map, dtype=np.float32)


def _check_labels(labels: np.ndarray, shape: tuple[int, int], name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected a 2-D integer label map, got shape {labels.shape} dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the feature map's H×W), got {labels.shape}")
    return labels.astype(np.int64)


def _as_rgb_image(image: Image.Image | np.ndarray, name: str = "image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and min(image.shape[:2]) >= 1:
            return Image.fromarray(np.ascontiguousarray(image), "RGB")
        raise ValueError(f"{name}: expected an H×W×3 uint8 array, got shape {image.shape} dtype {image.dtype}")
    raise ValueError(f"{name}: expected a PIL image or an H×W×3 uint8 array, got {type(image).__name__}")


# ------------------------------------------------------------------------------ colours
def scalar_colours(values: np.ndarray) -> np.ndarray:
    """A scalar map (any shape) as uint8 RGB colours (shape + (3,)), stretched from its own
    minimum (dark blue) to its maximum (yellow). A constant map gets the middle colour; NaN and
    infinite values get :data:`NO_DATA_COLOUR`."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    scaled = np.full(values.shape, 0.5)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            scaled = np.where(finite, (values - low) / (high - low), 0.5)
    position = np.clip(scaled, 0.0, 1.0) * (len(_SEQUENTIAL_ANCHORS) - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), len(_SEQUENTIAL_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colours = _SEQUENTIAL_ANCHORS[lower] * (1 - fraction) + _SEQUENTIAL_ANCHORS[lower + 1] * fraction
    colours = np.rint(colours).astype(np.uint8)
    colours[~finite] = NO_DATA_COLOUR
    return colours


def cluster_palette(n_colours: int) -> np.ndarray:
    """``n_colours`` distinct RGB colours (uint8 n×3): label k is drawn with row k. None of them
    is :data:`NO_DATA_COLOUR`."""
    if n_colours < 0:
        raise ValueError(f"n_colours: expected a non-negative count, got {n_colours}")
    colours = list(_BASE_CLUSTER_COLOURS[:n_colours])
    seen = set(colours) | {NO_DATA_COLOUR}
    step = 0
    while len(colours) < n_colours:
        # Golden-ratio hue steps spread new colours evenly; saturation and value cycle so that
        # hues that come back around differ in brightness.
        hue = (step * 0.618033988749895) % 1.0
        saturation = (0.55, 0.85, 1.0)[step % 3]
        value = (0.95, 0.7, 0.5, 0.85)[(step // 3) % 4]
        colour = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        step += 1
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return np.array(colours, dtype=np.uint8).reshape(n_colours, 3)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """A label map (H×W integers) as uint8 RGB colours H×W×3: label k ≥ 0 gets
    ``cluster_palette(...)[k]``, negative labels (no cluster) get :data:`NO_DATA_COLOUR`."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a 2-D integer label map, got shape {labels.shape} dtype {labels.dtype}")
    n_labels = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    palette = cluster_palette(n_labels)
    out = np.empty(labels.shape + (3,), dtype=np.uint8)
    out[...] = NO_DATA_COLOUR
    assigned = labels >= 0
    out[assigned] = palette[labels[assigned]]
    return out


def feature_norm_map(feature_map: np.ndarray) -> np.ndarray:
    """The l2 norm of the D-dim feature at each location (H×W float64): the second row of the
    paper's Fig. 7, where objects stand out with larger norms than background."""
    fmap = _check_feature_map(feature_map).astype(np.float64)
    return np.sqrt(np.einsum("dhw,dhw->hw", fmap, fmap))


# ------------------------------------------------------------------------------ layout
def _font() -> ImageFont.ImageFont:
    # Pillow's bundled font: the same glyphs on every machine, so figures are reproducible.
    try:
        return ImageFont.load_default(size=CAPTION_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def panel_shape(image_size: tuple[int, int], panel_size: int = PANEL_SIZE) -> tuple[int, int]:
    """(width, height) of a panel showing an image of ``image_size`` = (width, height): the
    image scaled so that its longer side is ``panel_size`` pixels."""
    if panel_size < 1:
        raise ValueError(f"panel_size: expected a positive number of pixels, got {panel_size}")
    width, height = image_size
    scale = panel_size / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _map_panel(colours: np.ndarray, size: tuple[int, int]) -> Image.Image:
    # Nearest-neighbour upsampling: each feature-map cell stays one flat block, as in the paper.
    return Image.fromarray(np.ascontiguousarray(colours), "RGB").resize(size, Image.NEAREST)


def compose_panels(panels: Sequence[tuple[Image.Image, str]]) -> Image.Image:
    """Panels (all the same height) side by side on white with a caption under each. The pixel
    boxes of the panels and the captions are stored in ``info["panel_boxes"]`` / ``["captions"]``."""
    if not panels:
        raise ValueError("panels: expected at least one (image, caption) pair, got none")
    height = panels[0][0].height
    if any(p.height != height for p, _ in panels):
        raise ValueError(f"panels: expected equal heights, got {[p.height for p, _ in panels]}")
    width = MARGIN + sum(p.width + MARGIN for p, _ in panels)
    figure = Image.new("RGB", (width, MARGIN + height + CAPTION_HEIGHT + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    boxes = []
    x = MARGIN
    for panel, caption in panels:
        figure.paste(panel.convert("RGB"), (x, MARGIN))
        boxes.append((x, MARGIN, x + panel.width, MARGIN + height))
        text = _fit_text(draw, caption, font, panel.width)
        text_width = draw.textlength(text, font=font)
        draw.text((x + (panel.width - text_width) / 2, MARGIN + height + 4), text, fill=(0, 0, 0), font=font)
        x += panel.width + MARGIN
    figure.info["panel_boxes"] = boxes
    figure.info["captions"] = [caption for _, caption in panels]
    return figure


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def stack_figures(figures: Sequence[Image.Image]) -> Image.Image:
    """Figures (e.g. one row per image, as in the paper) stacked top to bottom, left-aligned on
    white. ``info["panel_boxes"]`` lists the panels of every row, in order."""
    if not figures:
        raise ValueError("figures: expected at least one figure, got none")
    width = max(f.width for f in figures)
    stacked = Image.new("RGB", (width, sum(f.height for f in figures)), BACKGROUND)
    boxes, captions, y = [], [], 0
    for f in figures:
        stacked.paste(f.convert("RGB"), (0, y))
        for x0, y0, x1, y1 in f.info.get("panel_boxes", []):
            boxes.append((x0, y0 + y, x1, y1 + y))
        captions.extend(f.info.get("captions", []))
        y += f.height
    stacked.info["panel_boxes"] = boxes
    stacked.info["captions"] = captions
    return stacked


def save_png(figure: Image.Image, path: PathLike) -> None:
    """Write ``figure`` as a PNG, atomically (temporary file in the same folder, then rename),
    so an interrupted write never leaves a broken file at ``path``."""
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _image_panel(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.LANCZOS) if image.size != size else image.copy()


def _cluster_panel(labels: np.ndarray, image_panel: Image.Image, overlay_alpha: float) -> Image.Image:
    colours = _map_panel(label_colours(labels), image_panel.size)
    if overlay_alpha >= 1.0:
        return colours
    return Image.blend(image_panel, colours, overlay_alpha)


def _check_alpha(overlay_alpha: float) -> float:
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay_alpha: expected a number in [0, 1], got {overlay_alpha}")
    return float(overlay_alpha)


def _n_clusters_of(labels: np.ndarray) -> int:
    return int(np.unique(labels[labels >= 0]).size)


def _clusters_caption(count: int) -> str:
    return f"{count} cluster{'' if count == 1 else 's'} (NCut)"


# ------------------------------------------------------------------------------ Fig. 7, 6, 5
def cluster_figure(
    image: Image.Image | np.ndarray,
    feature_map: np.ndarray,
    labels: np.ndarray,
    *,
    panel_size: int = PANEL_SIZE,
    overlay_alpha: float = 1.0,
) -> Image.Image:
    """The paper's Fig. 7 for one image: the image | the l2 norm of the features at each
    location | the cluster map, side by side with captions.

    ``image`` is the picture the features were computed from (PIL or H×W×3 uint8);
    ``feature_map`` D×H×W; ``labels`` an H×W integer cluster map of the same grid. The maps are
    upsampled to the image panel with nearest neighbour. ``overlay_alpha`` < 1 blends the
    cluster colours over the image (1: colours only, as in the paper).
    """
    picture = _as_rgb_image(image)
    fmap = _check_feature_map(feature_map)
    labels = _check_labels(labels, fmap.shape[1:])
    alpha = _check_alpha(overlay_alpha)
    size = panel_shape(picture.size, panel_size)
    image_panel = _image_panel(picture, size)
    return compose_panels(
        [
            (image_panel, "image"),
            (_map_panel(scalar_colours(feature_norm_map(fmap)), size), "feature l2 norm"),
            (_cluster_panel(labels, image_panel, alpha), _clusters_caption(_n_clusters_of(labels))),
        ]
    )


def spatial_ablation_figure(
    image: Image.Image | np.ndarray,
    feature_map: np.ndarray,
    labels_feature_only: np.ndarray,
    labels_with_spatial: np.ndarray,
    *,
    panel_size: int = PANEL_SIZE,
    overlay_alpha: float = 1.0,
) -> Image.Image:
    """The paper's Fig. 6 for one image: the image | feature l2 norm | clusters from feature
    distance only (the paper's choice) | clusters from feature and spatial distance."""
    picture = _as_rgb_image(image)
    fmap = _check_feature_map(feature_map)
    without = _check_labels(labels_feature_only, fmap.shape[1:], "labels_feature_only")
    with_spatial = _check_labels(labels_with_spatial, fmap.shape[1:], "labels_with_spatial")
    alpha = _check_alpha(overlay_alpha)
    size = panel_shape(picture.size, panel_size)
    image_panel = _image_panel(picture, size)
    return compose_panels(
        [
            (image_panel, "image"),
            (_map_panel(scalar_colours(feature_norm_map(fmap)), size), "feature l2 norm"),
            (_cluster_panel(without, image_panel, alpha), "feature distance"),
            (_cluster_panel(with_spatial, image_panel, alpha), "feature + spatial"),
        ]
    )


def pca_dimensions_figure(
    image: Image.Image | np.ndarray,
    feature_map: np.ndarray,
    dims: Sequence[int] = (1, 2, 8, 64, 256, 512),
    *,
    panel_size: int = 240,
) -> Image.Image:
    """The paper's Fig. 5 for one image: the image, then the value of each selected PCA
    dimension (1-based) of the image's local features as a map, each stretched to its own range.

    The PCA is the per-image one of the clustering step (:func:`clustermac.pca_project` on the
    H·W local D-vectors). Dimensions beyond the rank of the centred features, min(D, H·W − 1),
    carry no information and are dropped.
    """
    from .. import _core  # imported here so the drawing code needs no build

    picture = _as_rgb_image(image)
    fmap = _check_feature_map(feature_map)
    dims = [int(d) for d in dims]
    if any(d < 1 for d in dims):
        raise ValueError(f"dims: expected 1-based PCA dimensions (>= 1), got {dims}")
    depth, height, width = fmap.shape
    rank = min(depth, height * width - 1)
    kept = [d for d in dims if d <= rank]
    size = panel_shape(picture.size, panel_size)
    panels = [(_image_panel(picture, size), "image")]
    if kept:
        features = np.ascontiguousarray(fmap.reshape(depth, -1).T)
        projection, _ = _core.pca_project(features, max(kept))
        for d in kept:
            values = np.asarray(projection)[:, d - 1].reshape(height, width)
            panels.append((_map_panel(scalar_colours(values), size), f"PCA dim {d}"))
    return compose_panels(panels)


def _cluster_with(extractor: Extractor, feature_map: np.ndarray, n_clusters: int, spatial_weight: float) -> np.ndarray:
    """One NCut partition of a feature map with the extractor's clustering settings."""
    from ..descriptors.clustermac import cluster_labels

    labels = cluster_labels(
        extractor,
        np.ascontiguousarray(feature_map, dtype=np.float32),
        None,
        n_clusters=(int(n_clusters),),
        rgb_clusters=0,
        spatial_weight=spatial_weight,
    )
    return np.asarray(labels[0])


def _image_and_features(extractor: Extractor, path: ImageInput):
    prepared = extractor.prepare(path)
    fmap, _ = extractor.feature_map(prepared)
    return prepared.image, fmap


def cluster_figure_for_file(
    extractor: Extractor,
    path: ImageInput,
    n_clusters: int = 10,
    out_png: PathLike | None = None,
    *,
    panel_size: int = PANEL_SIZE,
    overlay_alpha: float = 1.0,
) -> Image.Image:
    """Fig. 7 for one image file (``clustermac show-clusters IMAGE --out PNG``): the image at
    the extractor's ``max_size``, its backbone features, and an NCut into ``n_clusters`` (the
    paper's Fig. 7 uses 10) with the extractor's clustering settings. Written atomically to
    ``out_png`` when given."""
    if int(n_clusters) < 1:
        raise ValueError(f"n_clusters: expected a positive number of clusters, got {n_clusters}")
    picture, fmap = _image_and_features(extractor, path)
    labels = _cluster_with(extractor, fmap, n_clusters, extractor.spatial_weight)
    figure = cluster_figure(picture, fmap, labels, panel_size=panel_size, overlay_alpha=overlay_alpha)
    if out_png is not None:
        save_png(figure, out_png)
    return figure


def spatial_ablation_figure_for_file(
    extractor: Extractor,
    path: ImageInput,
    n_clusters: int = 10,
    spatial_weight: float = 1.0,
    out_png: PathLike | None = None,
    *,
    panel_size: int = PANEL_SIZE,
) -> Image.Image:
    """Fig. 6 for one image: NCut into ``n_clusters`` with ``spatial_weight`` = 0 (the paper)
    and with the given ``spatial_weight`` > 0 (see :func:`clustermac.cluster_feature_map`)."""
    if not spatial_weight > 0:
        raise ValueError(f"spatial_weight: expected a positive weight for the ablation, got {spatial_weight}")
    picture, fmap = _image_and_features(extractor, path)
    without = _cluster_with(extractor, fmap, n_clusters, 0.0)
    with_spatial = _cluster_with(extractor, fmap, n_clusters, spatial_weight)
    figure = spatial_ablation_figure(picture, fmap, without, with_spatial, panel_size=panel_size)
    if out_png is not None:
        save_png(figure, out_png)
    return figure


# ------------------------------------------------------------------------------ Fig. 4, Eq. (1)
def rmac_region_masks(regions: np.ndarray, height: int, width: int) -> np.ndarray:
    """R-MAC regions (rows ``[x0, y0, x1, y1)`` in cells, as :func:`clustermac.rmac_regions`
    returns them) as boolean masks R×H×W."""
    regions = np.asarray(regions)
    if regions.ndim != 2 or regions.shape[1] != 4:
        raise ValueError(f"regions: expected an R×4 array of [x0, y0, x1, y1) rows, got shape {regions.shape}")
    masks = np.zeros((regions.shape[0], height, width), dtype=bool)
    for k, (x0, y0, x1, y1) in enumerate(regions.astype(np.int64)):
        masks[k, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return masks


def region_precision(regions: np.ndarray, box_cells: Sequence[float]) -> np.ndarray:
    """Eq. (1) for each region: area(region ∩ ground-truth box) / area(region).

    ``regions``: boolean masks K×H×W, or an H×W integer label map (region k = the locations
    labelled k, for k = 0 … max label; negative labels belong to no region).
    ``box_cells``: the ground-truth box ``(x0, y0, x1, y1)`` in feature-map cells, half-open,
    possibly fractional; cell (i, j) is the unit square [j, j+1) × [i, i+1), and a cell only
    partly inside the box counts with the covered fraction of its area.
    Returns float64 K; an empty region (no location) gets NaN.
    """
    regions = np.asarray(regions)
    if regions.ndim == 2 and np.issubdtype(regions.dtype, np.integer):
        n_regions = int(regions.max()) + 1 if regions.size and regions.max() >= 0 else 0
        masks = regions[None, :, :] == np.arange(n_regions)[:, None, None]
    elif regions.ndim == 3 and regions.dtype == bool:
        masks = regions
    else:
        raise ValueError(
            f"regions: expected boolean masks K×H×W or an H×W integer label map, got shape "
            f"{regions.shape} dtype {regions.dtype}"
        )
    box = np.asarray(box_cells, dtype=np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"box_cells: expected finite (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box_cells}")
    height, width = masks.shape[1:]
    cover_x = np.clip(np.minimum(box[2], np.arange(1, width + 1)) - np.maximum(box[0], np.arange(width)), 0, 1)
    cover_y = np.clip(np.minimum(box[3], np.arange(1, height + 1)) - np.maximum(box[1], np.arange(height)), 0, 1)
    coverage = np.outer(cover_y, cover_x)
    area = masks.reshape(masks.shape[0], -1).sum(axis=1).astype(np.float64)
    inside = masks.reshape(masks.shape[0], -1).astype(np.float64) @ coverage.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, inside / np.maximum(area, 1), np.nan)


def precision_threshold_curve(
    precisions: Sequence[float], thresholds: Sequence[float] = PRECISION_THRESHOLDS
) -> np.ndarray:
    """The share of regions whose precision is ≥ each threshold (the y-axis of Fig. 4).
    NaN precisions (empty regions) are not regions and are left out."""
    values = np.asarray(precisions, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("precisions: expected at least one non-NaN region precision, got none")
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0 or not np.all(np.isfinite(thresholds)):
        raise ValueError(f"thresholds: expected finite numbers, got {thresholds}")
    reached = values[None, :] >= thresholds[:, None] - THRESHOLD_TOLERANCE
    return reached.mean(axis=1)


def box_to_cells(box_pixels: Sequence[float], stride: float) -> tuple[float, float, float, float]:
    """A box in (resized) image pixels as feature-map cells: cell j covers pixels
    [j·stride, (j+1)·stride)."""
    if not stride > 0:
        raise ValueError(f"stride: expected a positive number of pixels, got {stride}")
    x0, y0, x1, y1 = (float(v) / stride for v in box_pixels)
    return x0, y0, x1, y1


def region_precision_study(
    extractor: Extractor,
    query_images: Sequence[ImageInput],
    query_boxes: Sequence[Sequence[float]],
    *,
    rmac_levels: int = 3,
    n_clusters: Sequence[int] = (5, 15),
    thresholds: Sequence[float] = PRECISION_THRESHOLDS,
    progress: bool = False,
) -> dict[str, Curve]:
    """Fig. 4's computation: for each query image (whole image, resized to the extractor's
    ``max_size``) and its box (original pixels, mapped through the resize scale and the
    backbone stride to cells), the Eq. (1) precision of every R-MAC grid region (``rmac_levels``
    scales, ~20 regions) and of every feature cluster (NCut into 5 and into 15 clusters = 20
    regions, as in the paper's caption; the extractor's clustering settings, no RGB clusters).

    Returns ``{"R-MAC grid (…)": (thresholds, fractions), "clusters 5 + 15 (…)": (…)}``, the
    share of all regions of all queries reaching each precision threshold; the keys say the
    mean number of non-empty regions per image.
    """
    from .. import _core
    from ..images import load_image, map_box, resize_max

    if len(query_images) != len(query_boxes):
        raise ValueError(
            f"query_boxes: expected one box per query image, "
            f"got {len(query_boxes)} boxes for {len(query_images)} images"
        )
    if not query_images:
        raise ValueError("query_images: expected at least one query, got none")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    stride = float(extractor.backbone.stride)
    grid_precisions: list[np.ndarray] = []
    cluster_precisions: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(query_images), desc="region precision", unit="img", leave=False)
    for image, box in zip(query_images, query_boxes):
        original = load_image(image)
        resized, scale = resize_max(original, extractor.max_size)
        fmap = extractor.backbone.features(resized)
        _, height, width = fmap.shape
        cells = box_to_cells(map_box(box, scale, original.size), stride)
        grid = rmac_region_masks(_core.rmac_regions(height, width, rmac_levels), height, width)
        grid_precisions.append(region_precision(grid, cells))
        for k in n_clusters:
            labels = _cluster_with(extractor, fmap, int(k), 0.0)
            cluster_precisions.append(region_precision(labels, cells))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n_images = len(query_images)
    grid_all = np.concatenate(grid_precisions)
    clusters_all = np.concatenate(cluster_precisions)
    grid_count = np.count_nonzero(~np.isnan(grid_all)) / n_images
    cluster_count = np.count_nonzero(~np.isnan(clusters_all)) / n_images
    cluster_name = " + ".join(str(int(k)) for k in n_clusters)
    return {
        f"R-MAC grid, {rmac_levels} scales ({grid_count:.1f} regions/image)": (
            thresholds,
            precision_threshold_curve(grid_all, thresholds),
        ),
        f"clusters {cluster_name} ({cluster_count:.1f} regions/image)": (
            thresholds,
            precision_threshold_curve(clusters_all, thresholds),
        ),
    }


def region_precision_figure(curves: Mapping[str, Curve], title: str = "Regions reaching each precision (Eq. 1)") -> str:
    """Fig. 4 as an SVG line chart: precision threshold (x) against the share of regions whose
    precision reaches it (y), one line per region kind (see :func:`region_precision_study`)."""
    return line_plot_svg(
        dict(curves),
        x_label="precision threshold",
        y_label="share of regions ≥ threshold",
        title=title,
        x_range=(0.0, 1.0),
        y_range=(0.0, 1.0),
    )


# ------------------------------------------------------------------------------ SVG line chart
def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = span / max(target_ticks, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10.0 * magnitude


def _linear_ticks(low: float, high: float) -> list[float]:
    step = _nice_step(high - low)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    k = first
    while k * step <= high + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def _tick_text(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _padded_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    if high == low:
        pad = abs(low) * 0.1 if low != 0 else 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _check_range(value: tuple[float, float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"{name}: expected finite (low, high) with high > low, got {value}")
    return low, high


def line_plot_svg(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    title: str,
    *,
    width: int = 560,
    height: int = 340,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    log_x: bool = False,
) -> str:
    """A small line chart as a standalone SVG string: axes, ticks, grid, markers and a legend.

    ``series`` maps a name to ``(xs, ys)``; a point with a NaN coordinate breaks its line. With
    ``log_x`` the x axis is log2 with ticks at powers of two (e.g. the PCA dimension C of
    Fig. 3; x must then be positive). Ranges default to the data's, slightly padded.
    """
    if not series:
        raise ValueError("series: expected at least one named (xs, ys) pair, got none")
    if width < 200 or height < 150:
        raise ValueError(f"width, height: expected at least 200×150 pixels, got {width}×{height}")
    prepared: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, pair in series.items():
        try:
            xs, ys = pair
        except (TypeError, ValueError):
            raise ValueError(f"series[{name!r}]: expected a pair (xs, ys), got {type(pair).__name__}") from None
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape or xs.size == 0:
            raise ValueError(
                f"series[{name!r}]: expected xs and ys of the same non-zero length, got {xs.size} and {ys.size}"
            )
        if log_x and np.any(xs[np.isfinite(xs)] <= 0):
            raise ValueError(f"series[{name!r}]: log_x needs positive x values, got {xs}")
        prepared.append((str(name), xs, ys))
    x_range = _check_range(x_range, "x_range")
    y_range = _check_range(y_range, "y_range")
    if log_x and x_range is not None and x_range[0] <= 0:
        raise ValueError(f"x_range: log_x needs a positive range, got {x_range}")

    def transform_x(x: np.ndarray) -> np.ndarray:
        return np.log2(x) if log_x else x

    all_x = np.concatenate([transform_x(xs[np.isfinite(xs) & np.isfinite(ys)]) for _, xs, ys in prepared])
    all_y = np.concatenate([ys[np.isfinite(xs) & np.isfinite(ys)] for _, xs, ys in prepared])
    if all_x.size == 0:
        raise ValueError("series: every point has a NaN or infinite coordinate; nothing to plot")
    x_low, x_high = transform_x(np.array(x_range)) if x_range else _padded_range(all_x)
    y_low, y_high = y_range if y_range else _padded_range(all_y)

    font_px = 12
    # The legend goes under the x label, one line per series, so long names never squeeze the
    # plot; the SVG grows by one line per series.
    left, right, top, bottom = 64, 24, 36, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    legend_top = height + 4
    total_height = legend_top + 20 * len(prepared)

    def px(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" '
        f'viewBox="0 0 {width} {total_height}" font-family="sans-serif" font-size="{font_px}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{total_height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{escape(title)}</text>',
    ]
    # Grid lines and ticks.
    if log_x:
        x_ticks = [float(k) for k in range(math.ceil(x_low - 1e-9), math.floor(x_high + 1e-9) + 1)]
        x_tick_labels = [_tick_text(2.0**k) for k in x_ticks]
    else:
        x_ticks = _linear_ticks(x_low, x_high)
        x_tick_labels = [_tick_text(t) for t in x_ticks]
    y_ticks = _linear_ticks(y_low, y_high)
    parts.append('<g class="grid" stroke="#dddddd" stroke-width="1">')
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + plot_h}"/>')
    for t in y_ticks:
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + plot_w}" y2="{py(t):.1f}"/>')
    parts.append("</g>")
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>')
    parts.append('<g class="x-ticks" text-anchor="middle">')
    for t, text in zip(x_ticks, x_tick_labels):
        parts.append(
            f'<line x1="{px(t):.1f}" y1="{top + plot_h}" x2="{px(t):.1f}" y2="{top + plot_h + 5}" stroke="black"/>'
        )
        parts.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 18}">{escape(text)}</text>')
    parts.append("</g>")
    parts.append('<g class="y-ticks" text-anchor="end">')
    for t in y_ticks:
        parts.append(f'<line x1="{left - 5}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" stroke="black"/>')
        parts.append(f'<text x="{left - 8}" y="{py(t) + 4:.1f}">{escape(_tick_text(t))}</text>')
    parts.append("</g>")
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>"
    )
    # The data, clipped to the plot box.
    # Ids are global in an HTML page holding several inline charts: name the clip path after the
    # chart's content so that two different charts never share one (and output stays deterministic).
    fingerprint = hashlib.sha1(
        repr(
            (
                title,
                x_label,
                y_label,
                width,
                height,
                x_low,
                x_high,
                y_low,
                y_high,
                [(n, xs.tobytes(), ys.tobytes()) for n, xs, ys in prepared],
            )
        ).encode()
    )
    clip_id = f"plot-area-{fingerprint.hexdigest()[:12]}"
    parts.append(f'<clipPath id="{clip_id}"><rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/></clipPath>')
    for index, (name, xs, ys) in enumerate(prepared):
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        dash = "" if index < len(_SERIES_COLOURS) else ' stroke-dasharray="6 3"'
        parts.append(f'<g class="series" data-name={quoteattr(name)} clip-path="url(#{clip_id})">')
        parts.append(f"<title>{escape(name)}</title>")
        valid = np.isfinite(xs) & np.isfinite(ys)
        run: list[str] = []
        points = []
        for x, y, ok in zip(transform_x(np.where(valid, xs, 1.0)), ys, valid):
            if ok:
                run.append(f"{px(x):.1f},{py(y):.1f}")
                points.append((px(x), py(y)))
            elif run:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{" ".join(run)}"/>'
                )
                run = []
        if run:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{" ".join(run)}"/>')
        for x, y in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
        parts.append("</g>")
    # Legend, under the x label.
    legend_x = left
    parts.append('<g class="legend">')
    for index, (name, _, _) in enumerate(prepared):
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        y = legend_top + 8 + index * 20
        dash = "" if index < len(_SERIES_COLOURS) else ' stroke-dasharray="6 3"'
        parts.append(
            f'<line x1="{legend_x}" y1="{y}" x2="{legend_x + 22}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<circle cx="{legend_x + 11}" cy="{y}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 28}" y="{y + 4}">{escape(name)}</text>')
    parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


#: Frame colours of the results gallery: a true positive, a junk image (ignored by the score), a miss.
RESULT_COLOURS = {"correct": (30, 150, 60), "junk": (235, 160, 0), "wrong": (200, 30, 30)}
QUERY_BOX_COLOUR = (230, 30, 30)


def results_gallery_figure(
    query: Image.Image | np.ndarray,
    box: Sequence[float] | None,
    results: Sequence[tuple[Image.Image | np.ndarray, str]],
    *,
    thumbnail_size: int = 128,
    frame: int = 5,
) -> Image.Image:
    """One row of the demo report's results gallery: the query (its box drawn in red) and the
    ranked results, each framed by its status, ``"correct"`` (green), ``"junk"`` (orange) or
    ``"wrong"`` (red), captioned with its rank. ``box`` is (x1, y1, x2, y2) in the query's
    pixels or None. ``info["statuses"]`` keeps the statuses in rank order."""
    picture = _as_rgb_image(query, "query").copy()
    cell = thumbnail_size + 2 * frame
    original_width = picture.width
    picture.thumbnail((cell, cell), Image.BICUBIC)
    if box is not None:
        values = [float(v) for v in box]
        if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
            raise ValueError(f"box: expected (x1, y1, x2, y2) with x1 < x2 and y1 < y2, got {box!r}")
        scale = picture.width / original_width  # drawn on the thumbnail: a crisp 2-pixel line
        ImageDraw.Draw(picture).rectangle([v * scale for v in values], outline=QUERY_BOX_COLOUR, width=2)
    panels = []
    query_panel = Image.new("RGB", (cell, cell), BACKGROUND)
    query_panel.paste(picture, ((cell - picture.width) // 2, (cell - picture.height) // 2))
    panels.append((query_panel, "query"))
    statuses = []
    for rank, (image, status) in enumerate(results, 1):
        if status not in RESULT_COLOURS:
            raise ValueError(f"results[{rank - 1}]: expected a status in {sorted(RESULT_COLOURS)}, got {status!r}")
        panel = Image.new("RGB", (cell, cell), RESULT_COLOURS[status])
        thumbnail = _as_rgb_image(image, f"results[{rank - 1}]").copy()
        thumbnail.thumbnail((thumbnail_size, thumbnail_size), Image.BICUBIC)
        inner = Image.new("RGB", (thumbnail_size, thumbnail_size), BACKGROUND)
        inner.paste(thumbnail, ((thumbnail_size - thumbnail.width) // 2, (thumbnail_size - thumbnail.height) // 2))
        panel.paste(inner, (frame, frame))
        panels.append((panel, f"{rank} {status}"))
        statuses.append(status)
    figure = compose_panels(panels)
    figure.info["statuses"] = statuses
    return figure
