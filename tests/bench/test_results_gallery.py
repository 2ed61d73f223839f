"""The demo report's results gallery (bench/figures.results_gallery_figure)."""

from __future__ import annotations

import numpy as np
import pytest

from clustermac.bench.figures import QUERY_BOX_COLOUR, RESULT_COLOURS, results_gallery_figure


def _flat(colour, height=60, width=90):
    return np.full((height, width, 3), colour, dtype=np.uint8)


def test_each_result_is_framed_by_its_status_and_ranked():
    statuses = ["correct", "wrong", "junk", "correct"]
    results = [(_flat((10 * i, 100, 200)), status) for i, status in enumerate(statuses)]
    figure = results_gallery_figure(_flat((255, 255, 255), 100, 200), (20, 10, 120, 90), results, thumbnail_size=64)
    assert figure.info["statuses"] == statuses
    assert figure.info["captions"] == ["query", "1 correct", "2 wrong", "3 junk", "4 correct"]
    pixels = np.asarray(figure)
    boxes = figure.info["panel_boxes"]
    assert len(boxes) == 5
    for (x0, y0, x1, y1), status in zip(boxes[1:], statuses):
        # The frame (outer 5 pixels) has the status colour, the middle is the result's picture.
        assert tuple(pixels[y0 + 2, x0 + 2]) == RESULT_COLOURS[status]
        assert tuple(pixels[y1 - 3, x1 - 3]) == RESULT_COLOURS[status]
    # The query box is drawn in red on the white query.
    x0, y0, x1, y1 = boxes[0]
    query_panel = pixels[y0:y1, x0:x1].reshape(-1, 3)
    assert (query_panel == QUERY_BOX_COLOUR).all(axis=1).sum() > 20


def test_no_box_and_no_results():
    figure = results_gallery_figure(_flat((0, 0, 0)), None, [])
    assert figure.info["captions"] == ["query"] and figure.info["statuses"] == []
    assert not (np.asarray(figure) == QUERY_BOX_COLOUR).all(axis=2).any()


@pytest.mark.parametrize(
    ("box", "results", "message"),
    [
        ((10, 10, 5, 20), [], "box"),
        ((1, 2, 3), [], "box"),
        (None, [(_flat((0, 0, 0)), "maybe")], "status"),
    ],
)
def test_bad_input_is_refused(box, results, message):
    with pytest.raises(ValueError, match=message):
        results_gallery_figure(_flat((0, 0, 0)), box, results)
