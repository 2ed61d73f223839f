"""Many images at once (Backbone.features(side_by_side=True), the extractor's pipeline): the same bits
as the backbone's own multi-thread session, in input order, errors named; images in flight capped."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.backbones import Backbone, default_backbone
from clustermac.backbones.onnx import MAX_PARALLEL_IMAGES


def photos(folder, write_photos, n=5, size=256):
    return [str(folder / name) for name in write_photos(folder, n=n, size=size)]


@pytest.mark.parametrize(
    ("threads", "images", "per_image"), [(1, 1, 1), (2, 2, 1), (3, 3, 1), (8, 8, 1), (10, 5, 2), (16, 8, 2), (64, 8, 8)]
)
def test_parallel_images_one_per_core_up_to_the_cap(tmp_path, pooling_model, threads, images, per_image):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, preset="vgg16")
    backbone = Backbone(path, n_threads=threads)
    assert (backbone.parallel_images, backbone.threads_per_image) == (images, per_image)
    assert images <= MAX_PARALLEL_IMAGES and images * per_image <= threads


def test_parallel_images_of_all_cores(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, preset="vgg16")
    assert Backbone(path).parallel_images == min(len(os.sched_getaffinity(0)), MAX_PARALLEL_IMAGES)


@pytest.mark.parametrize(("threads", "session_threads"), [(2, 1), (16, 2)])
def test_side_by_side_session_is_opened_once(tmp_path, pooling_model, threads, session_threads):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, preset="vgg16")
    backbone = Backbone(path, n_threads=threads)
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(backbone.features(image, side_by_side=True), backbone.features(image))
    session = backbone._side_by_side_session
    assert session.get_session_options().intra_op_num_threads == session_threads
    backbone.features(image, side_by_side=True)
    assert backbone._side_by_side_session is session
    # A one-thread backbone has nothing to open: its own session already runs one image on one thread.
    single = Backbone(path, n_threads=1)
    single.features(image, side_by_side=True)
    assert single._side_by_side_session is None


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_embedded_backbone_same_bits_on_one_and_two_threads(tmp_path, write_photos, precision):
    backbone = default_backbone(n_threads=2, precision=precision)
    for path in photos(tmp_path, write_photos, n=3, size=320):
        image = Image.open(path).convert("RGB")
        np.testing.assert_array_equal(backbone.features(image, side_by_side=True), backbone.features(image))


@pytest.mark.parametrize("method", ["clustermac", "rmac"])
def test_extract_many_on_two_images_at_once_equals_one_by_one(tmp_path, write_photos, method):
    paths = photos(tmp_path, write_photos, n=5)
    two = clustermac.Extractor(default_backbone(n_threads=2, max_size=256), method, max_size=256)
    one = clustermac.Extractor(default_backbone(n_threads=1, max_size=256), method, max_size=256)
    many = two.extract_many(paths, progress=False)
    np.testing.assert_array_equal(many, np.stack([two.extract(p) for p in paths]))
    np.testing.assert_array_equal(many, one.extract_many(paths, progress=False))


def test_bad_images_come_back_named_and_in_order(tmp_path, write_photos, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, preset="vgg16")
    extractor = clustermac.Extractor(Backbone(path, n_threads=2, max_size=96), "mac", max_size=96)
    good = photos(tmp_path / "photos", write_photos, n=4, size=96)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good[0], "rb").read()[:200])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2)).save(tiny)
    images = [good[0], str(truncated), good[1], str(tiny), good[2], good[3]]
    results = list(extractor.iter_extract(images, progress=False))
    assert [i for i, _ in results] == list(range(len(images)))
    for (_, result), image in zip(results, images):
        if image in good:
            np.testing.assert_array_equal(result, extractor.extract(image))
        else:
            assert isinstance(result, (ValueError, OSError)) and image in str(result)
