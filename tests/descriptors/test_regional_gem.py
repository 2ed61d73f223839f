"""Regional GeM (box and label versions) against a plain per-region, per-channel NumPy loop."""

from __future__ import annotations

import numpy as np
import pytest

from clustermac import _core
from clustermac.descriptors.regional_gem import box_gem, label_gem


def _reference(fmap, cells, p):
    """GeM of one region given as a list of (y, x) cells, channel by channel."""
    out = []
    for channel in fmap:
        values = [max(float(channel[y, x]), 1e-6) ** p for y, x in cells]
        out.append((sum(values) / len(values)) ** (1.0 / p))
    return np.array(out)


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_box_gem_matches_reference(p):
    rng = np.random.default_rng(0)
    fmap = np.maximum(rng.standard_normal((6, 7, 9)), 0).astype(np.float32)  # zeros exercise the clamp
    boxes = np.array([[0, 0, 9, 7], [2, 1, 5, 4], [8, 6, 9, 7], [0, 3, 1, 7]], dtype=np.int32)
    got = box_gem(fmap, boxes, p)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    for r, (x0, y0, x1, y1) in enumerate(boxes):
        cells = [(y, x) for y in range(y0, y1) for x in range(x0, x1)]
        np.testing.assert_allclose(got[r], _reference(fmap, cells, p), rtol=1e-5, atol=1e-6)


def test_box_gem_of_the_whole_map_is_gem_pool():
    rng = np.random.default_rng(1)
    fmap = rng.uniform(0, 8, (5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(box_gem(fmap, np.array([[0, 0, 6, 4]]), 3.0)[0], _core.gem_pool(fmap, 3.0), rtol=1e-5)


def test_box_gem_of_a_single_cell_is_the_cell():
    rng = np.random.default_rng(2)
    fmap = rng.uniform(0.5, 8, (5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(box_gem(fmap, np.array([[3, 2, 4, 3]]), 3.0)[0], fmap[:, 2, 3], rtol=1e-5)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_label_gem_matches_reference(p):
    rng = np.random.default_rng(3)
    fmap = np.maximum(rng.standard_normal((5, 6, 8)), 0).astype(np.float32)
    labels = rng.integers(-1, 4, (6, 8)).astype(np.int32)
    labels[labels == 2] = 3  # id 2 names no cell: a zero row
    got = label_gem(fmap, labels, p)
    assert got.shape == (4, 5)
    for k in range(4):
        cells = list(zip(*np.nonzero(labels == k)))
        expected = _reference(fmap, cells, p) if cells else np.zeros(5)
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6)


def test_label_gem_every_label_negative():
    assert label_gem(np.ones((3, 2, 2), np.float32), -np.ones((2, 2), np.int32)).shape == (0, 3)


@pytest.mark.parametrize(
    "boxes,message",
    [
        (np.array([[0, 0, 0, 2]]), "empty"),
        (np.array([[0, 0, 7, 2]]), "outside"),
        (np.array([[-1, 0, 2, 2]]), "outside"),
        (np.array([[0.0, 0, 2, 2]]), "integer"),
        (np.array([0, 0, 2, 2]), "R×4"),
    ],
)
def test_box_gem_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        box_gem(np.ones((3, 4, 6), np.float32), boxes)


@pytest.mark.parametrize("p", [0, -1.0, float("nan"), float("inf"), True, "3"])
def test_bad_p(p):
    with pytest.raises(ValueError, match="p:"):
        box_gem(np.ones((3, 4, 6), np.float32), np.array([[0, 0, 1, 1]]), p)
    with pytest.raises(ValueError, match="p:"):
        label_gem(np.ones((3, 4, 6), np.float32), np.zeros((4, 6), np.int32), p)


def test_bad_maps_and_labels():
    with pytest.raises(ValueError, match="fmap"):
        box_gem(np.ones((4, 6), np.float32), np.array([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="fmap"):
        label_gem(np.ones((3, 0, 6), np.float32), np.zeros((0, 6), np.int32))
    with pytest.raises(ValueError, match="labels"):
        label_gem(np.ones((3, 4, 6), np.float32), np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="labels"):
        label_gem(np.ones((3, 4, 6), np.float32), np.zeros((4, 6), np.float32))
