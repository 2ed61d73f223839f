"""Tests of the paper's figures (figures.py) and the report (report.py).

References are plain NumPy counts and loops computed here; the end-to-end tests run the real
embedded EfficientNet-Lite0 backbone and the real C++ clustering on scikit-image's photo.
"""

from __future__ import annotations

import base64
import io
import os
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from PIL import Image

from clustermac import _core
from clustermac.bench import figures
from clustermac.bench.report import format_table, render_report, write_report

SVG_NS = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------------------ Eq. (1)
def _precision_by_count(masks: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Eq. (1) by counting cells one by one (integer box, half-open)."""
    x0, y0, x1, y1 = box
    out = []
    for mask in masks:
        area = inside = 0
        for i in range(mask.shape[0]):
            for j in range(mask.shape[1]):
                if mask[i, j]:
                    area += 1
                    inside += int(x0 <= j < x1 and y0 <= i < y1)
        out.append(inside / area if area else np.nan)
    return np.array(out)


def test_region_precision_matches_direct_count_on_hand_made_masks():
    masks = np.zeros((4, 5, 6), dtype=bool)
    masks[0, 1:3, 1:4] = True  # entirely inside the box
    masks[1, :, :] = True  # the whole map
    masks[2, 4, 5] = True  # one location, outside
    masks[3, 0:2, 2:6] = True  # half in, half out
    box = (1, 1, 5, 4)
    got = figures.region_precision(masks, box)
    np.testing.assert_allclose(got, _precision_by_count(masks, box))
    np.testing.assert_allclose(got, [1.0, 12 / 30, 0.0, 3 / 8])


def test_region_precision_random_masks_and_label_maps_agree_with_count():
    rng = np.random.default_rng(3)
    for _ in range(20):
        height, width = rng.integers(1, 9, size=2)
        labels = rng.integers(-1, 6, size=(height, width)).astype(np.int32)
        x0, x1 = sorted(rng.choice(width + 1, 2, replace=False)) if width > 1 else (0, 1)
        y0, y1 = sorted(rng.choice(height + 1, 2, replace=False)) if height > 1 else (0, 1)
        masks = labels[None] == np.arange(labels.max() + 1)[:, None, None]
        expected = _precision_by_count(masks, (x0, y0, x1, y1))
        np.testing.assert_allclose(figures.region_precision(labels, (x0, y0, x1, y1)), expected)
        np.testing.assert_allclose(figures.region_precision(masks, (x0, y0, x1, y1)), expected)


def test_region_precision_fractional_box_matches_supersampled_count():
    rng = np.random.default_rng(5)
    masks = rng.random((3, 4, 7)) < 0.5
    masks[2] = False  # an empty region
    box = (0.5, 1.3, 6.2, 3.7)
    factor = 10  # each cell becomes 10×10 sub-cells; the box falls on sub-cell edges
    fine = masks.repeat(factor, axis=1).repeat(factor, axis=2)
    fine_box = tuple(int(round(v * factor)) for v in box)
    x0, y0, x1, y1 = fine_box
    area = fine.sum(axis=(1, 2))
    inside = fine[:, y0:y1, x0:x1].sum(axis=(1, 2))
    expected = np.where(area > 0, inside / np.maximum(area, 1), np.nan)
    got = figures.region_precision(masks, box)
    np.testing.assert_allclose(got[:2], expected[:2], atol=1e-12)
    assert np.isnan(got[2])


def test_region_precision_box_partly_outside_is_clipped_and_empty_label_is_nan():
    labels = np.array([[0, 0], [2, 2]], dtype=np.int32)  # label 1 unused
    got = figures.region_precision(labels, (-3, -3, 1, 10))
    assert got[0] == 0.5 and got[2] == 0.5 and np.isnan(got[1])


@pytest.mark.parametrize("box", [(2, 0, 2, 3), (0, 3, 4, 1), (0, 0, np.nan, 1), (0, 0, 1)])
def test_region_precision_rejects_bad_boxes(box):
    with pytest.raises(ValueError, match="box_cells"):
        figures.region_precision(np.ones((1, 3, 4), dtype=bool), box)


def test_region_precision_rejects_float_regions():
    with pytest.raises(ValueError, match="regions"):
        figures.region_precision(np.ones((3, 4)), (0, 0, 1, 1))


def test_rmac_region_masks_cover_the_core_grid_regions():
    regions = _core.rmac_regions(7, 10, 3)
    masks = figures.rmac_region_masks(regions, 7, 10)
    assert masks.shape == (len(regions), 7, 10)
    for mask, (x0, y0, x1, y1) in zip(masks, regions):
        assert mask.sum() == (x1 - x0) * (y1 - y0)
        assert mask[y0:y1, x0:x1].all()


# ------------------------------------------------------------------------------ threshold curve
def test_precision_threshold_curve_equals_reference_and_is_monotone():
    rng = np.random.default_rng(0)
    precisions = np.concatenate([rng.random(50), [0.0, 1.0, 0.15, 0.5, np.nan]])
    thresholds = np.linspace(0, 1, 21)
    got = figures.precision_threshold_curve(precisions, thresholds)
    valid = [p for p in precisions if not np.isnan(p)]
    # Reference on exact decimal thresholds k/20, so no tolerance is involved.
    expected = [sum(1 for p in valid if p * 20 >= k) / len(valid) for k in range(21)]
    np.testing.assert_allclose(got, expected)
    assert np.all(np.diff(got) <= 0)
    assert got[0] == 1.0


def test_precision_threshold_curve_counts_a_precision_equal_to_an_inexact_threshold():
    thresholds = np.linspace(0, 1, 21)
    assert thresholds[3] != 0.15  # 0.15000000000000002
    got = figures.precision_threshold_curve([0.15], thresholds)
    assert got[3] == 1.0 and got[4] == 0.0


def test_precision_threshold_curve_rejects_no_regions():
    with pytest.raises(ValueError, match="precisions"):
        figures.precision_threshold_curve([np.nan, np.nan])


# ------------------------------------------------------------------------------ picture figures
def _cells_of_panel(figure: Image.Image, box: tuple[int, int, int, int], cell: int) -> np.ndarray:
    """Colour at the centre of each cell of a panel drawn at ``cell`` pixels per map location."""
    x0, y0, x1, y1 = box
    pixels = np.asarray(figure)[y0:y1, x0:x1]
    return pixels[cell // 2 :: cell, cell // 2 :: cell]


def _test_scene(height=8, width=12, depth=6, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height * 10, width * 10, 3), dtype=np.uint8)
    fmap = rng.random((depth, height, width)).astype(np.float32)
    labels = rng.integers(0, 7, size=(height, width)).astype(np.int32)
    return image, fmap, labels


def test_cluster_figure_panels_sizes_and_colours_map_one_to_one_to_labels():
    image, fmap, labels = _test_scene()
    figure = figures.cluster_figure(image, fmap, labels, panel_size=120)  # 10 px per location
    boxes = figure.info["panel_boxes"]
    assert len(boxes) == 3 and figure.info["captions"][0] == "image"
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == (120, 80)
    m = figures.MARGIN
    assert figure.size == (m + 3 * (120 + m), m + 80 + figures.CAPTION_HEIGHT + m)
    # Image panel: the image itself (same size, not resampled).
    x0, y0, x1, y1 = boxes[0]
    np.testing.assert_array_equal(np.asarray(figure)[y0:y1, x0:x1], image)
    # Cluster panel: the colour of every cell is the palette colour of its label, and distinct
    # labels get distinct colours.
    cells = _cells_of_panel(figure, boxes[2], 10)
    palette = figures.cluster_palette(labels.max() + 1)
    np.testing.assert_array_equal(cells, palette[labels])
    colour_of = {}
    for label, colour in zip(labels.ravel(), cells.reshape(-1, 3)):
        colour_of.setdefault(int(label), tuple(colour))
        assert colour_of[int(label)] == tuple(colour)
    assert len(set(colour_of.values())) == len(colour_of) == len(np.unique(labels))
    # Norm panel: the scalar colour map of the per-location l2 norms.
    norms = np.sqrt((fmap.astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_array_equal(_cells_of_panel(figure, boxes[1], 10), figures.scalar_colours(norms))
    brightest = np.unravel_index(np.argmax(norms), norms.shape)
    assert tuple(_cells_of_panel(figure, boxes[1], 10)[brightest]) == (253, 231, 37)


def test_cluster_figure_is_deterministic_and_overlay_blends():
    image, fmap, labels = _test_scene()
    first = figures.cluster_figure(image, fmap, labels, panel_size=120)
    second = figures.cluster_figure(image, fmap, labels, panel_size=120)
    assert first.tobytes() == second.tobytes()
    blended = figures.cluster_figure(image, fmap, labels, panel_size=120, overlay_alpha=0.5)
    box = blended.info["panel_boxes"][2]
    got = _cells_of_panel(blended, box, 10).astype(int)
    pure = figures.cluster_palette(labels.max() + 1)[labels].astype(int)
    under = image[5::10, 5::10].astype(int)
    assert np.abs(got - (pure + under) / 2).max() <= 1


def test_cluster_palette_is_distinct_for_many_clusters_and_avoids_no_data_grey():
    palette = figures.cluster_palette(60)
    assert len({tuple(c) for c in palette}) == 60
    assert figures.NO_DATA_COLOUR not in {tuple(c) for c in palette}
    np.testing.assert_array_equal(palette[:10], figures.cluster_palette(10))


def test_negative_labels_and_nan_features_are_grey():
    image, fmap, labels = _test_scene(height=4, width=6)
    labels[0, 0] = -1
    fmap[:, 1, 1] = np.nan
    figure = figures.cluster_figure(image, fmap, labels, panel_size=60)
    boxes = figure.info["panel_boxes"]
    assert tuple(_cells_of_panel(figure, boxes[2], 10)[0, 0]) == figures.NO_DATA_COLOUR
    assert tuple(_cells_of_panel(figure, boxes[1], 10)[1, 1]) == figures.NO_DATA_COLOUR


def test_constant_features_and_one_location_draw():
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    fmap = np.ones((3, 1, 1), dtype=np.float32)
    figure = figures.cluster_figure(image, fmap, np.zeros((1, 1), dtype=np.int32), panel_size=32)
    box = figure.info["panel_boxes"][1]
    norm_panel = np.asarray(figure)[box[1] : box[3], box[0] : box[2]]
    assert (norm_panel == norm_panel[0, 0]).all()  # one flat colour, the middle of the map


def test_cluster_figure_rejects_mismatched_or_bad_inputs():
    image, fmap, labels = _test_scene()
    with pytest.raises(ValueError, match="labels"):
        figures.cluster_figure(image, fmap, labels[:, :5])
    with pytest.raises(ValueError, match="labels"):
        figures.cluster_figure(image, fmap, labels.astype(np.float32))
    with pytest.raises(ValueError, match="feature_map"):
        figures.cluster_figure(image, fmap[0], labels)
    with pytest.raises(ValueError, match="image"):
        figures.cluster_figure(image.astype(np.float32), fmap, labels)
    with pytest.raises(ValueError, match="overlay_alpha"):
        figures.cluster_figure(image, fmap, labels, overlay_alpha=2.0)


def test_spatial_ablation_figure_has_four_panels_in_order():
    image, fmap, labels = _test_scene()
    other = (labels + 1) % 7
    figure = figures.spatial_ablation_figure(image, fmap, labels, other, panel_size=120)
    boxes = figure.info["panel_boxes"]
    assert len(boxes) == 4
    assert figure.info["captions"] == ["image", "feature l2 norm", "feature distance", "feature + spatial"]
    palette = figures.cluster_palette(7)
    np.testing.assert_array_equal(_cells_of_panel(figure, boxes[2], 10), palette[labels])
    np.testing.assert_array_equal(_cells_of_panel(figure, boxes[3], 10), palette[other])
    with pytest.raises(ValueError, match="labels_with_spatial"):
        figures.spatial_ablation_figure(image, fmap, labels, other[:2])


def _reference_pca(features: np.ndarray, n: int) -> np.ndarray:
    centred = features.astype(np.float64) - features.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    projection = u[:, :n] * s[:n]
    # The core's sign convention: the largest-magnitude entry of each column is positive.
    signs = np.sign(projection[np.argmax(np.abs(projection), axis=0), np.arange(n)])
    return projection * signs


def test_pca_dimensions_figure_maps_each_kept_dimension():
    rng = np.random.default_rng(1)
    depth, height, width = 16, 5, 6  # rank min(16, 29) = 16: dims 64, 256, 512 are dropped
    basis = rng.normal(size=(4, depth))
    coefficients = rng.normal(size=(height * width, 4)) * np.array([8.0, 4.0, 2.0, 1.0])
    fmap = (coefficients @ basis + 0.1 * rng.normal(size=(height * width, depth))).T.reshape(depth, height, width)
    fmap = np.ascontiguousarray(fmap, dtype=np.float32)
    image = rng.integers(0, 256, size=(height * 10, width * 10, 3), dtype=np.uint8)
    figure = figures.pca_dimensions_figure(image, fmap, panel_size=60)
    assert figure.info["captions"] == ["image", "PCA dim 1", "PCA dim 2", "PCA dim 8"]
    reference = _reference_pca(fmap.reshape(depth, -1).T, 8)
    for panel, dim in zip(figure.info["panel_boxes"][1:], (1, 2, 8)):
        got = _cells_of_panel(figure, panel, 10).astype(int)
        expected = figures.scalar_colours(reference[:, dim - 1].reshape(height, width)).astype(int)
        assert np.abs(got - expected).max() <= 2  # float32 core vs float64 reference


def test_pca_dimensions_figure_one_location_and_bad_dims():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    fmap = np.ones((8, 1, 1), dtype=np.float32)
    figure = figures.pca_dimensions_figure(image, fmap, panel_size=10)
    assert figure.info["captions"] == ["image"]  # no PCA of a single location
    with pytest.raises(ValueError, match="dims"):
        figures.pca_dimensions_figure(image, fmap, dims=(0, 1))


def test_stack_figures_keeps_panel_boxes_of_every_row():
    image, fmap, labels = _test_scene()
    row = figures.cluster_figure(image, fmap, labels, panel_size=120)
    stacked = figures.stack_figures([row, row])
    assert stacked.size == (row.width, 2 * row.height)
    assert len(stacked.info["panel_boxes"]) == 6
    assert stacked.info["panel_boxes"][3][1] == row.info["panel_boxes"][0][1] + row.height


# ------------------------------------------------------------------------------ SVG charts
def _parse_svg(svg: str) -> ElementTree.Element:
    root = ElementTree.fromstring(svg)
    assert root.tag == SVG_NS + "svg"
    return root


def test_line_plot_svg_parses_and_contains_every_series():
    series = {
        "ClusterMAC <crop I> & QE": ([1, 2, 4, 8, 16], [60.0, 62.5, 61.0, np.nan, 55.0]),
        "R-MAC": ([1, 16], [59.0, 59.0]),
        "single point": ([4], [57.0]),
    }
    svg = figures.line_plot_svg(series, "PCA dimension C", "mAP (%)", "Fig. 3", log_x=True)
    root = _parse_svg(svg)
    groups = [g for g in root.iter(SVG_NS + "g") if g.get("class") == "series"]
    assert [g.get("data-name") for g in groups] == list(series)
    # The NaN breaks the first line in two; the single point draws a marker only.
    assert len(groups[0].findall(SVG_NS + "polyline")) == 2
    assert len(groups[0].findall(SVG_NS + "circle")) == 4
    assert len(groups[2].findall(SVG_NS + "circle")) == 1
    texts = [t.text for t in root.iter(SVG_NS + "text")]
    for name in series:
        assert name in texts  # the legend
    for tick in ("1", "2", "4", "8", "16"):
        assert tick in texts  # log2 axis: ticks at the powers of two
    assert "PCA dimension C" in texts and "mAP (%)" in texts and "Fig. 3" in texts
    assert svg == figures.line_plot_svg(series, "PCA dimension C", "mAP (%)", "Fig. 3", log_x=True)
    # Charts inlined in one HTML page must not share a clip-path id (ids are page-global).
    other = figures.line_plot_svg({"R-MAC": ([1, 16], [59.0, 58.0])}, "C", "mAP", "other", log_x=True)
    clip_ids = [re.search(r'clipPath id="([^"]+)"', s).group(1) for s in (svg, other)]
    assert clip_ids[0] != clip_ids[1]
    assert all(f"url(#{i})" in s for i, s in zip(clip_ids, (svg, other)))


def test_line_plot_svg_places_points_on_linear_axes():
    svg = figures.line_plot_svg({"a": ([0, 1], [0, 1])}, "x", "y", "t", x_range=(0, 1), y_range=(0, 1))
    root = _parse_svg(svg)
    frame = next(r for r in root.iter(SVG_NS + "rect") if r.get("fill") == "none")
    left, top = float(frame.get("x")), float(frame.get("y"))
    right, bottom = left + float(frame.get("width")), top + float(frame.get("height"))
    circles = next(g for g in root.iter(SVG_NS + "g") if g.get("class") == "series").findall(SVG_NS + "circle")
    assert (float(circles[0].get("cx")), float(circles[0].get("cy"))) == pytest.approx((left, bottom), abs=0.06)
    assert (float(circles[1].get("cx")), float(circles[1].get("cy"))) == pytest.approx((right, top), abs=0.06)


@pytest.mark.parametrize(
    "series, kwargs, match",
    [
        ({}, {}, "series"),
        ({"a": ([1, 2], [1])}, {}, "series"),
        ({"a": ([0, 2], [1, 2])}, {"log_x": True}, "log_x"),
        ({"a": ([np.nan], [1])}, {}, "series"),
        ({"a": ([1, 2], [1, 2])}, {"y_range": (1, 1)}, "y_range"),
        ({"a": 5}, {}, "series"),
    ],
)
def test_line_plot_svg_rejects_bad_input(series, kwargs, match):
    with pytest.raises(ValueError, match=match):
        figures.line_plot_svg(series, "x", "y", "t", **kwargs)


def test_region_precision_figure_has_both_curves_on_unit_axes():
    thresholds = np.linspace(0, 1, 21)
    curves = {"R-MAC grid": (thresholds, 1 - thresholds), "clusters 5 + 15": (thresholds, 1 - thresholds**2)}
    root = _parse_svg(figures.region_precision_figure(curves))
    names = [g.get("data-name") for g in root.iter(SVG_NS + "g") if g.get("class") == "series"]
    assert names == list(curves)
    texts = [t.text for t in root.iter(SVG_NS + "text")]
    assert "0" in texts and "1" in texts


# ------------------------------------------------------------------------------ report
def test_format_table_lays_out_like_table_1():
    text = format_table(
        ["Method", "Dim.", "Oxf5k"],
        [["R-MAC, crop I", 512, 66.94], ["Ours, crop I", 512, 70.3], ["missing", 512, None]],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["Method", "Dim.", "Oxf5k"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2] == "R-MAC, crop I   512   66.9"
    assert lines[4].endswith("    -")
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    with pytest.raises(ValueError, match="row 1"):
        format_table(["a", "b"], [[1, 2], [3]])


def _report_parts(image: Image.Image, svg: str):
    tables = [("Table 1: mAP", ["Method", "mAP"], [["MAC", 50.0], ["R-MAC", 60.25]])]
    figures_list = [("a picture", image), ("a chart", svg)]
    notes = ["ClusterMAC < R-MAC here & that is reported"]
    return tables, figures_list, notes


def test_write_report_embeds_every_figure_and_is_self_contained(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    svg = figures.line_plot_svg({"series-one": ([1, 2], [3, 4])}, "x", "y", "chart title")
    path = tmp_path / "out" / "report.html"
    write_report(path, "demo <report>", *_report_parts(image, svg))
    html = path.read_text(encoding="utf-8")
    assert html.count("<figure") == 2
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
    assert "series-one" in html and "<svg" in html
    assert "60.2" in html or "60.3" in html
    assert "ClusterMAC &lt; R-MAC here &amp; that is reported" in html
    assert "demo &lt;report&gt;" in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from elsewhere
    assert os.listdir(path.parent) == ["report.html"]  # no temporary file left behind


class _ImageThatFailsToSave(Image.Image):
    def save(self, *args, **kwargs):  # a figure whose encoding raises half-way
        raise OSError("disk full while encoding")


@pytest.mark.parametrize("bad", ["not svg <", "<html></html>", 42, "broken-image"])
def test_write_report_failure_leaves_existing_report_untouched(tmp_path, bad):
    path = tmp_path / "report.html"
    path.write_text("previous report")
    image = Image.new("RGB", (4, 4))
    if bad == "broken-image":
        bad = _ImageThatFailsToSave()
        bad.__dict__.update(Image.new("RGB", (4, 4)).__dict__)
    tables, figures_list, notes = _report_parts(image, "<svg xmlns='http://www.w3.org/2000/svg'/>")
    with pytest.raises((ValueError, OSError)):
        write_report(path, "t", tables, figures_list + [("bad", bad)], notes)
    assert path.read_text() == "previous report"
    assert os.listdir(tmp_path) == ["report.html"]


def test_render_report_inlines_svg_without_its_xml_declaration():
    svg = '<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>'
    html = render_report("t", [], [("chart", svg)], [])
    assert "<?xml" not in html and '<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>' in html


def test_render_report_rejects_a_malformed_table():
    with pytest.raises(ValueError, match=r"tables\[0\]"):
        render_report("t", [("caption", ["a", "b"], [[1]])], [], [])


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def extractor():
    from clustermac import Extractor, default_backbone

    return Extractor(default_backbone(n_threads=1), max_size=320)


@pytest.fixture(scope="module")
def chelsea():
    from skimage import data

    return data.chelsea()  # 451×300 photo of a cat, bundled with scikit-image


@pytest.mark.network
def test_show_clusters_on_a_real_photo_with_the_default_backbone(extractor, chelsea, tmp_path):
    out = tmp_path / "clusters.png"
    figure = figures.cluster_figure_for_file(extractor, chelsea, n_clusters=10, out_png=out)
    saved = Image.open(out)
    assert saved.size == figure.size
    np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(figure))
    assert len(figure.info["panel_boxes"]) == 3
    # The cluster panel uses between 2 and 10 palette colours, each a whole block of cells.
    x0, y0, x1, y1 = figure.info["panel_boxes"][2]
    colours = {tuple(c) for c in np.asarray(figure)[y0:y1, x0:x1].reshape(-1, 3)}
    assert 2 <= len(colours) <= 10
    assert colours <= {tuple(c) for c in figures.cluster_palette(10)}
    assert figure.info["captions"][2] == f"{len(colours)} clusters (NCut)"
    # An image of one stride: one feature-map location, one cluster, no PCA maps.
    tiny = np.asarray(Image.fromarray(chelsea).resize((32, 32)))
    one = figures.cluster_figure_for_file(extractor, tiny, n_clusters=10)
    assert one.info["captions"][2] == "1 cluster (NCut)"
    prepared = extractor.prepare(tiny)
    assert figures.pca_dimensions_figure(prepared.image, extractor.feature_map(prepared)[0]).info["captions"] == [
        "image"
    ]
    again = figures.cluster_figure_for_file(extractor, chelsea, n_clusters=10)
    assert again.tobytes() == figure.tobytes()


@pytest.mark.network
def test_spatial_ablation_and_pca_figures_on_a_real_photo(extractor, chelsea):
    ablation = figures.spatial_ablation_figure_for_file(extractor, chelsea, n_clusters=6, spatial_weight=2.0)
    assert len(ablation.info["panel_boxes"]) == 4
    prepared = extractor.prepare(chelsea)
    fmap, _ = extractor.feature_map(prepared)
    pca = figures.pca_dimensions_figure(prepared.image, fmap)
    n_locations = fmap.shape[1] * fmap.shape[2]
    kept = [d for d in (1, 2, 8, 64, 256, 512) if d <= min(fmap.shape[0], n_locations - 1)]
    assert pca.info["captions"] == ["image"] + [f"PCA dim {d}" for d in kept]


@pytest.mark.network
def test_region_precision_study_on_a_real_photo(extractor, chelsea):
    # Two queries: the cat's face and a box in the top-left corner.
    boxes = [(100, 20, 360, 280), (0, 0, 150, 100)]
    curves = figures.region_precision_study(extractor, [chelsea, chelsea], boxes)
    assert len(curves) == 2
    grid_name, cluster_name = curves
    assert grid_name.startswith("R-MAC grid") and cluster_name.startswith("clusters 5 + 15")
    for thresholds, fractions in curves.values():
        assert fractions[0] == 1.0 and np.all(np.diff(fractions) <= 0)
        assert len(thresholds) == len(fractions) == 21
    # The grid curve equals Eq. (1) computed here from the core's regions and the mapped box.
    fmap = extractor.backbone.features(extractor.prepare(chelsea).image)
    _, height, width = fmap.shape
    from clustermac.images import resize_max

    _, scale = resize_max(Image.fromarray(chelsea), extractor.max_size)
    stride = extractor.backbone.stride
    # Independently of the figures module: a grid region is a rectangle of cells, so Eq. (1) is
    # the overlap of two rectangles over the region's area; then the share reaching each k / 20.
    precisions = []
    for box in boxes:
        x0, y0, x1, y1 = (v * scale / stride for v in box)
        for rx0, ry0, rx1, ry1 in _core.rmac_regions(height, width, 3):
            overlap = max(0.0, min(x1, rx1) - max(x0, rx0)) * max(0.0, min(y1, ry1) - max(y0, ry0))
            precisions.append(overlap / ((rx1 - rx0) * (ry1 - ry0)))
    assert any(0 < p < 1 for p in precisions)  # partial overlaps: the fractional geometry matters
    expected = [np.mean([p >= k / 20 - 1e-9 for p in precisions]) for k in range(21)]
    np.testing.assert_allclose(curves[grid_name][1], expected)
    root = _parse_svg(figures.region_precision_figure(curves))
    assert [g.get("data-name") for g in root.iter(SVG_NS + "g") if g.get("class") == "series"] == list(curves)
    with pytest.raises(ValueError, match="query_boxes"):
        figures.region_precision_study(extractor, [chelsea], boxes)


def test_write_search_page_embeds_query_and_results(tmp_path):
    from clustermac.bench.report import write_search_page

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (300, 200), (0, 120, 0)).save(root / "a.jpg")
    Image.new("RGB", (100, 100), (0, 0, 200)).save(root / "b.png")
    query = tmp_path / "query.png"
    Image.new("RGB", (400, 400), (255, 255, 255)).save(query)
    page = tmp_path / "page.html"
    write_search_page(page, str(query), (100, 100, 300, 300), [("a.jpg", 0.9), ("b.png", 0.5), ("gone.jpg", 0.1)], root)
    html = page.read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(images) == 3  # query + two readable results
    query_thumbnail = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0]))))
    assert query_thumbnail.shape[:2] == (200, 200)
    pixels = query_thumbnail.astype(int)
    red = (pixels[..., 0] - pixels[..., 1] > 100) & (pixels[..., 0] - pixels[..., 2] > 100)
    assert red[48:53, 60:140].any(axis=0).all()  # the box's top edge: y = 100 px → 50 px
    assert not red[:40].any() and not red[60:140, 60:140].any()  # white outside the edges
    assert html.index("a.jpg") < html.index("b.png") < html.index("gone.jpg")
    assert "no thumbnail" in html and "0.9000" in html
    assert set(os.listdir(tmp_path)) == {"images", "query.png", "page.html"}  # no temporary file left
