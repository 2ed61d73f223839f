"""Multi-scale extraction (``Extractor(scales=...)``, issue 16): single-scale is bit-identical to
the default, the multi-scale descriptor and whitening equal a NumPy reference built from the
single-scale extractor on images resized here, settings are recorded and mismatches refused, bad
scales refused, and a scale whose image is under the network stride is skipped. The backbone is
the tiny ONNX stand-in of tests/conftest.py (average pool with stride 16, then a 1×1 conv)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.cli import main
from clustermac.descriptors.multiscale import check_scales
from clustermac.descriptors.whitening import fit_whitening_on_vectors
from clustermac.search.index_info import _extractor_keywords

SCALES = (1.0, 0.7071, 0.5)
MAX_SIZE = 96
STRIDE = 16


@pytest.fixture
def backbone(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, STRIDE, preset="vgg16")
    return clustermac.Backbone(path, n_threads=1)


def photo(seed: int, size=(120, 90)) -> np.ndarray:
    """A smooth random photo (coarse noise upsampled), so resizing changes it a little, not wholly."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.BILINEAR))


def l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0)


def resized(image: np.ndarray, scale: float) -> tuple[Image.Image, float]:
    """The image fed to the network at ``scale``, resized here with PIL (one bicubic resize of the
    original to a longer side of round(scale · min(longer, MAX_SIZE))), and the resize factor."""
    pil = Image.fromarray(image)
    longer = max(pil.size)
    target = round(scale * min(longer, MAX_SIZE))
    if target >= longer:
        return pil, 1.0
    factor = target / longer
    size = (max(1, round(pil.size[0] * factor)), max(1, round(pil.size[1] * factor)))
    return pil.resize(size, Image.BICUBIC, reducing_gap=3.0), factor


def reference_rows(backbone, method, image, scales, crop="image", box=None) -> list[np.ndarray]:
    """Each scale's un-normalised rows from a single-scale extractor on an image resized here:
    regional vectors (R-MAC) or the pooled vector (global methods). ``box`` in original pixels."""
    rows = []
    for scale in scales:
        small, factor = resized(image, scale)
        single = clustermac.Extractor(backbone, method, crop=crop, max_size=max(small.size))
        scaled_box = None if box is None else [v * factor for v in box]
        if crop == "image" and box is not None:
            small = small.crop(
                tuple(int(round(v)) for v in scaled_box)
            )  # crop_box rounds outwards; boxes here are whole
        prepared = single.prepare(small, None)
        if crop == "activations" and box is not None:
            prepared.activation_box = tuple(scaled_box)
        fmap, rgb = single.feature_map(prepared)
        rows.append(single.regional_vectors(fmap, rgb) if single._method.regional else single.pooled_vector(fmap)[None])
    return rows


def reference_descriptor(rows, mean=None, projection=None) -> np.ndarray:
    """l2 → whitening → l2 for every row of every scale, all summed, l2 (plain NumPy)."""
    unit = l2(np.concatenate(rows))
    unit = unit[np.linalg.norm(unit, axis=1) > 0]
    if mean is not None:
        unit = l2((unit - mean.astype(np.float64)) @ projection.astype(np.float64).T)
    return l2(unit.sum(axis=0))


@pytest.mark.parametrize("method", ["mac", "gem", "rmac", "clustermac", "clustermac-box"])
def test_single_scale_is_bit_identical_to_the_default(backbone, method):
    images = [photo(i) for i in range(4)]
    default = clustermac.Extractor(backbone, method, max_size=MAX_SIZE, n_clusters=(3,), rgb_clusters=2)
    explicit = clustermac.Extractor(backbone, method, max_size=MAX_SIZE, n_clusters=(3,), rgb_clusters=2, scales=[1.0])
    assert explicit.scales == (1.0,) and explicit.settings() == default.settings()
    assert "scales" not in default.settings()
    default.fit_whitening(images[:3], progress=False)
    explicit.fit_whitening(images[:3], progress=False)
    assert default.whitening_projection.tobytes() == explicit.whitening_projection.tobytes()
    a = default.extract_many(images, progress=False)
    b = explicit.extract_many(images, progress=False)
    assert a.tobytes() == b.tobytes()
    assert (
        explicit.extract(images[0], box=(10, 10, 80, 70)).tobytes()
        == default.extract(images[0], box=(10, 10, 80, 70)).tobytes()
    )


@pytest.mark.parametrize("method", ["rmac", "gem", "mac"])
def test_multiscale_descriptor_and_whitening_equal_a_numpy_reference(backbone, method):
    training = [photo(10 + i) for i in range(5)]
    queries = [photo(i, size=(120 - 8 * i, 90 + 4 * i)) for i in range(3)]
    ex = clustermac.Extractor(backbone, method, max_size=MAX_SIZE, scales=SCALES)
    # Before whitening: l2 of the sum of every scale's l2-normalised rows.
    for image in queries:
        expected = reference_descriptor(reference_rows(backbone, method, image, SCALES))
        np.testing.assert_allclose(ex.extract(image), expected, rtol=1e-5, atol=1e-6)
    # Multi-scale is not the single-scale descriptor.
    single = clustermac.Extractor(backbone, method, max_size=MAX_SIZE)
    assert np.abs(single.extract(queries[0]) - ex.extract(queries[0])).max() > 1e-3
    # Whitening learned on the l2-normalised rows of every scale of every training image.
    ex.fit_whitening(training, progress=False)
    vectors = [l2(np.concatenate(reference_rows(backbone, method, t, SCALES))).astype(np.float32) for t in training]
    mean, projection = fit_whitening_on_vectors(vectors, None, ex.whitening_shrinkage)
    np.testing.assert_allclose(ex.whitening_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(ex.whitening_projection), np.abs(projection), rtol=1e-3, atol=1e-4)
    got = ex.extract_many(queries, progress=False)
    for image, vector in zip(queries, got):
        expected = reference_descriptor(
            reference_rows(backbone, method, image, SCALES), ex.whitening_mean, ex.whitening_projection
        )
        np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("crop", ["image", "activations"])
def test_query_boxes_at_every_scale(backbone, crop):
    """Crop I: each scale's resized image cropped to the box; crop X: the box mapped into each
    scale's feature map."""
    image = photo(7, size=(192, 128))  # resized to 96×64 at scale 1; the box is whole at every scale
    box = (16, 16, 176, 112)  # ×0.5 → (8, 8, 88, 56); ×0.25 → (4, 4, 44, 28)
    scales = (1.0, 0.5)
    ex = clustermac.Extractor(backbone, "rmac", crop=crop, max_size=MAX_SIZE, scales=scales)
    expected = reference_descriptor(reference_rows(backbone, "rmac", image, scales, crop=crop, box=box))
    np.testing.assert_allclose(ex.extract(image, box=box), expected, rtol=1e-5, atol=1e-6)
    assert len(ex.prepare_scales(image, box)) == 2


def test_a_scale_under_the_stride_is_skipped(backbone):
    image = photo(3, size=(40, 24))  # scale 0.7071: 28×17 (kept); 0.5: 20×12, shorter side < 16 (skipped)
    ex = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES)
    prepared = ex.prepare_scales(image)
    assert [p.image.size for p in prepared] == [(40, 24), (28, 17)]
    two = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=(1.0, 0.7071))
    assert ex.extract(image).tobytes() == two.extract(image).tobytes()
    # Crop I: the crop decides; a 16×16 box at scale 1 is 11×11 at 0.7071, skipped.
    assert len(ex.prepare_scales(photo(3, size=(96, 64)), box=(0, 0, 16, 16))) == 1


@pytest.mark.parametrize(
    "scales, message",
    [
        ((), "at least one scale"),
        ((0.5,), "first scale must be 1.0"),
        ((1.0, 1.0), "strictly decreasing"),
        ((1.0, 0.5, 0.7), "strictly decreasing"),
        ((1.0, 0.0), r"in \(0, 1\]"),
        ((1.0, -0.5), r"in \(0, 1\]"),
        ((1.0, 1.5), r"in \(0, 1\]"),
        ((1.0, float("nan")), r"in \(0, 1\]"),
        ((1.0, True), "expected numbers"),
        ("1", "expected a sequence"),
        (1.0, "expected a sequence"),
    ],
)
def test_bad_scales_are_refused(scales, message):
    with pytest.raises(ValueError, match=f"scales: .*{message}"):
        check_scales(scales)


def test_bad_scales_are_refused_before_a_backbone_is_loaded():
    with pytest.raises(ValueError, match="scales: the first scale must be 1.0"):
        clustermac.Extractor(method="rmac", scales=(0.7, 0.5))


def test_settings_record_scales_and_mismatches_are_refused(backbone, tmp_path):
    images = [photo(i) for i in range(4)]
    multi = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES)
    assert multi.settings()["scales"] == list(SCALES)
    # The settings travel as JSON and give the same extractor back (a list becomes the tuple).
    keywords = _extractor_keywords(json.loads(json.dumps(multi.settings())))
    assert keywords["scales"] == SCALES
    assert clustermac.Extractor(backbone, **keywords).settings() == multi.settings()
    multi.fit_whitening(images, progress=False).save_whitening(tmp_path / "multi.npz")
    single = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE)
    single.fit_whitening(images, progress=False).save_whitening(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="scales: file has \\[1.0, 0.7071, 0.5\\], extractor has \\[1.0\\]"):
        clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE).load_whitening(tmp_path / "multi.npz")
    with pytest.raises(ValueError, match="scales: file has \\[1.0\\]"):
        clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES).load_whitening(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="scales: file has \\[1.0, 0.7071, 0.5\\], extractor has \\[1.0, 0.5\\]"):
        clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=(1.0, 0.5)).load_whitening(
            tmp_path / "multi.npz"
        )
    loaded = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES).load_whitening(
        tmp_path / "multi.npz"
    )
    assert loaded.extract(images[0]).tobytes() == multi.extract(images[0]).tobytes()
    with pytest.raises(ValueError, match="AML re-ranking .* not available with scales"):
        multi.box_descriptor()


def test_cli_scales_reach_the_files_and_search_refuses_to_mix(backbone, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(photo(i)).save(folder / f"img{i}.png")
    model = str(backbone.onnx_path)
    common = ["--quiet", "--backbone", model, "--method", "rmac", "--max-size", str(MAX_SIZE)]
    scales = ["--scales", "1", "0.7071", "0.5"]
    assert main(["extract", str(folder), "--out", str(tmp_path / "d.npy"), *common, *scales]) == 0
    vectors, manifest = clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)
    assert manifest["settings"]["scales"] == list(SCALES)
    expected = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES).extract_many(
        [str(folder / f"img{i}.png") for i in range(4)], progress=False
    )
    np.testing.assert_allclose(vectors, expected, rtol=1e-6, atol=1e-7)
    assert main(["index", str(tmp_path / "d.npy"), "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    # Search takes the index's scales when none are given: the image itself ranks first.
    search = ["search", str(folder / "img2.png"), "--index", str(tmp_path / "index"), "--backbone", model, "-k", "1"]
    assert main(search) == 0
    assert "img2.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="would mix them"):
        main([*search, "--scales", "1", "0.5"])


def test_the_evaluation_pipeline_gives_the_extractor_descriptors(backbone, tmp_path):
    """`clustermac evaluate` keeps every scale's map per image (float16) and pools them as the extractor does."""
    from clustermac.bench.pipeline import (
        DatasetFeatureMaps,
        MethodSpec,
        compute_feature_maps,
        descriptors_from_maps,
        evaluate_methods,
        fitted_extractor,
    )

    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(photo(i)).save(paths[-1])
    ex = clustermac.Extractor(backbone, "mac", max_size=MAX_SIZE, scales=SCALES)
    database = compute_feature_maps(ex, paths[:3], progress=False)
    whitening = compute_feature_maps(ex, paths[3:], progress=False)
    assert [len(item) for item in database] == [3, 3, 3]
    maps = DatasetFeatureMaps(database, whitening, {"image": database}, 0.0)
    spec = MethodSpec("rmac", "rmac", {"scales": SCALES})
    direct = clustermac.Extractor(backbone, "rmac", max_size=MAX_SIZE, scales=SCALES)
    pooled = descriptors_from_maps(direct, database)  # float16 maps: close, not bit-identical
    np.testing.assert_allclose(pooled, direct.extract_many(paths[:3], progress=False), atol=2e-3)
    # The whitening is learned on every scale of the whitening images (3 images, few vectors: its
    # mean is stable, its projection's trailing directions are not, so the mean is compared).
    fitted = fitted_extractor(backbone, spec, maps, MAX_SIZE)
    direct.fit_whitening(paths[3:], progress=False)
    np.testing.assert_allclose(fitted.whitening_mean, direct.whitening_mean, atol=2e-3)
    assert fitted.whitening_projection.shape == direct.whitening_projection.shape
    with pytest.raises(ValueError, match="rerank: AML re-ranking works on single-scale"):
        evaluate_methods(None, backbone, maps, [spec], rerank=True, progress=False)
