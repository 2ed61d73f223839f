"""clustermac.Backbone on small ONNX models built here, and the embedded default backbone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from clustermac import Backbone, default_backbone  # noqa: E402
from clustermac.backbones.onnx import PRESETS  # noqa: E402


def reference_features(network_input: np.ndarray, weight, bias, stride: int) -> np.ndarray:
    _, channels, height, width = network_input.shape
    h, w = height // stride, width // stride
    blocks = network_input[0, :, : h * stride, : w * stride].reshape(channels, h, stride, w, stride)
    pooled = blocks.mean(axis=(2, 4))
    return np.einsum("dc,chw->dhw", weight[:, :, 0, 0], pooled) + bias[:, None, None]


def random_image(height=70, width=100, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------ preprocessing

# Published constants, restated here so that a change in backbone.py is caught.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
VGG_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
RESNET_CAFFE_MEAN_BGR = np.array([102.9801, 115.9465, 122.7717])


def expected_input(rgb: np.ndarray, preset: str) -> np.ndarray:
    x = rgb.astype(np.float64)
    if preset.endswith("-caffe"):
        mean = VGG_CAFFE_MEAN_BGR if preset.startswith("vgg16") else RESNET_CAFFE_MEAN_BGR
        x = x[:, :, ::-1] - mean
    else:
        x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preprocess_follows_the_preset_convention(tmp_path, preset, pooling_model):
    stride, dim = PRESETS[preset].stride, PRESETS[preset].dim
    path, _, _ = pooling_model(tmp_path / "m.onnx", dim, stride, preset=preset)
    backbone = Backbone(path, n_threads=1)
    rgb = random_image()
    result = backbone.preprocess(Image.fromarray(rgb))
    assert result.dtype == np.float32 and result.shape == (1, 3, 70, 100)
    assert result.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(result, expected_input(rgb, preset), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(backbone.preprocess(rgb), result)  # arrays too


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preprocess_gives_the_table_of_earlier_versions_bit_for_bit(tmp_path, preset, pooling_model):
    """Every uint8 value of every channel maps to float32(x)·scale − offset, rounded after the
    product and after the difference: the 256-entry tables of earlier versions."""
    stride, dim = PRESETS[preset].stride, PRESETS[preset].dim
    path, _, _ = pooling_model(tmp_path / "m.onnx", dim, stride, preset=preset)
    backbone = Backbone(path, n_threads=1)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([values, values.T, np.flipud(values)], axis=2)  # each channel holds all 256 values
    rgb = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)  # 32 x 32, at least one stride
    info = PRESETS[preset]
    scale = (info.pixel_scale / np.asarray(info.std, np.float64)).astype(np.float32)
    offset = (np.asarray(info.mean, np.float64) / np.asarray(info.std, np.float64)).astype(np.float32)
    table = np.arange(256, dtype=np.float32)[None, :] * scale[:, None] - offset[:, None]
    sources = (2, 1, 0) if info.channel_order == "BGR" else (0, 1, 2)
    expected = np.stack([table[c][rgb[:, :, s]] for c, s in enumerate(sources)])[None]
    got = backbone.preprocess(rgb)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_caffe_input_is_bgr(tmp_path, pooling_model):
    # A pure red image lights up the LAST input channel under the Caffe convention.
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    red = np.zeros((32, 32, 3), np.uint8)
    red[:, :, 0] = 255
    caffe = Backbone(path, preset="vgg16-caffe").preprocess(red)[0, :, 0, 0]
    np.testing.assert_allclose(caffe, [-103.939, -116.779, 255 - 123.68], rtol=1e-6)
    torchvision = Backbone(path, preset="vgg16").preprocess(red)[0, :, 0, 0]
    np.testing.assert_allclose(torchvision, (np.array([1.0, 0, 0]) - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6)


@pytest.mark.parametrize("preset", ["vgg16", "resnet101-caffe", "efficientnet-lite0"])
def test_features_match_numpy_reference(tmp_path, preset, pooling_model):
    stride, dim = PRESETS[preset].stride, PRESETS[preset].dim
    path, weight, bias = pooling_model(tmp_path / "m.onnx", dim, stride)
    backbone = Backbone(path, preset=preset, n_threads=1)
    rgb = random_image(3 * stride + 5, 2 * stride + 1)
    features = backbone.features(Image.fromarray(rgb))
    assert features.dtype == np.float32 and features.shape == (dim, 3, 2)
    assert features.flags["C_CONTIGUOUS"]
    network_input = expected_input(rgb, preset)
    expected = reference_features(network_input, weight, bias, stride)
    # float32 sums over stride² pixels of inputs up to ±150 (Caffe): scale the tolerance.
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=2e-5 * np.abs(network_input).max())


def test_image_modes_reach_the_network_as_rgb(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, preset="vgg16")
    backbone = Backbone(path, n_threads=1)
    gray = random_image()[:, :, 0]
    from_gray = backbone.preprocess(Image.fromarray(gray, "L"))
    np.testing.assert_array_equal(from_gray, backbone.preprocess(np.repeat(gray[:, :, None], 3, 2)))
    rgba = np.dstack([random_image(), np.full((70, 100), 255, np.uint8)])
    np.testing.assert_array_equal(
        backbone.preprocess(Image.fromarray(rgba, "RGBA")), backbone.preprocess(rgba[:, :, :3])
    )


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("preset", ["vgg16", "efficientnet-lite0"])
def test_image_smaller_than_a_stride_is_refused(tmp_path, preset, pooling_model):
    stride, dim = PRESETS[preset].stride, PRESETS[preset].dim
    path, _, _ = pooling_model(tmp_path / "m.onnx", dim, stride, preset=preset)
    backbone = Backbone(path, n_threads=1)
    for height, width in [(stride - 1, 200), (200, stride - 1), (1, 1)]:
        with pytest.raises(ValueError, match=rf"{width}×{height} pixels.*smaller than the stride {stride}"):
            backbone.features(random_image(height, width))
    assert backbone.features(random_image(stride, stride)).shape == (dim, 1, 1)


@pytest.mark.network
def test_embedded_backbone_on_tiny_and_odd_images():
    backbone = default_backbone(n_threads=1)
    assert backbone.features(random_image(32, 32)).shape == (1280, 1, 1)
    assert backbone.features(random_image(33, 95)).shape == (1280, 2, 3)  # ceil(size / 32)
    with pytest.raises(ValueError, match="smaller than the stride 32"):
        backbone.features(random_image(31, 500))


# ------------------------------------------------------------------ the model file


def test_preset_from_metadata_and_name(tmp_path, pooling_model):
    a, _, _ = pooling_model(tmp_path / "a.onnx", 2048, 32, preset="resnet101", weights_id="abc123")
    backbone = Backbone(a, n_threads=1)
    assert backbone.preset.name == "resnet101"
    assert (backbone.dim, backbone.stride) == (2048, 32)
    assert backbone.name == "resnet101-abc123"
    assert backbone.max_size == 1024
    # An explicit preset wins over the metadata.
    assert Backbone(a, preset="resnet101-caffe").preset.name == "resnet101-caffe"


def test_name_tells_weights_apart_without_metadata(tmp_path, pooling_model):
    a, _, _ = pooling_model(tmp_path / "a.onnx", 512, 16, seed=0)
    b, _, _ = pooling_model(tmp_path / "b.onnx", 512, 16, seed=1)
    c, _, _ = pooling_model(tmp_path / "c.onnx", 512, 16, seed=0)
    names = [Backbone(p, preset="vgg16").name for p in (a, b, c)]
    assert names[0] != names[1] and names[0] == names[2]
    assert names[0].startswith("vgg16-")


def test_dynamic_channel_count_is_probed(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16, dynamic_dim=True)
    assert Backbone(path, preset="vgg16").dim == 512
    with pytest.raises(ValueError, match="gives 512 channels but preset 'resnet101' is for 2048"):
        Backbone(path, preset="resnet101")


def test_wrong_preset_for_the_model(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    with pytest.raises(ValueError, match="wrong preset or model"):
        Backbone(path, preset="efficientnet-lite0")


def test_missing_or_unknown_preset(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    with pytest.raises(ValueError, match=r"pass preset= one of \['efficientnet-lite0', 'resnet101'"):
        Backbone(path)
    with pytest.raises(ValueError, match="preset must be one of .* got 'alexnet'"):
        Backbone(path, preset="alexnet")


def test_bad_model_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Backbone(tmp_path / "none.onnx", preset="vgg16")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="garbage.onnx.*cannot load"):
        Backbone(garbage, preset="vgg16")


def test_model_with_wrong_interface(tmp_path):
    # Output is 2-D (a classifier, not a feature map).
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "classifier.onnx"))
    with pytest.raises(ValueError, match="expected a 1×D×H×W feature map"):
        Backbone(tmp_path / "classifier.onnx", preset="vgg16")
    # Input with one channel.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["features"])],
        "gray",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 1, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "gray.onnx"))
    with pytest.raises(ValueError, match="has 1 channels, expected 3"):
        Backbone(tmp_path / "gray.onnx", preset="vgg16")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_count(tmp_path, bad, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    with pytest.raises(ValueError, match="n_threads"):
        Backbone(path, preset="vgg16", n_threads=bad)


@pytest.mark.parametrize("bad", [0, -5, 10.5, None])
def test_bad_max_size(tmp_path, bad, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    with pytest.raises(ValueError, match="max_size"):
        Backbone(path, preset="vgg16", max_size=bad)


def test_thread_count_reaches_the_session(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    assert Backbone(path, preset="vgg16", n_threads=1)._session.get_session_options().intra_op_num_threads == 1
    assert Backbone(path, preset="vgg16", n_threads=2)._session.get_session_options().intra_op_num_threads == 2


def test_session_threads_sleep_instead_of_spinning(tmp_path, pooling_model):
    from clustermac.backbones.onnx import _open_session

    path, _, _ = pooling_model(tmp_path / "m.onnx", 512, 16)
    backbone = Backbone(path, preset="vgg16", n_threads=2)
    options = backbone._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # Busy-waiting is a scheduling choice only: the same model gives the same bits either way.
    spinning = _open_session(path, 2, spinning=True)
    assert spinning.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    network_input = backbone.preprocess(random_image(96, 128))
    (expected,) = spinning.run(None, {backbone.input_name: network_input})
    np.testing.assert_array_equal(backbone.features(random_image(96, 128)), expected[0])


def test_features_are_repeatable_and_follow_the_image(tmp_path, pooling_model):
    path, weight, bias = pooling_model(tmp_path / "m.onnx", 512, 16)
    backbone = Backbone(path, preset="vgg16", n_threads=1)
    rgb, other = random_image(), random_image(seed=2)
    first = backbone.features(rgb)
    np.testing.assert_array_equal(backbone.features(rgb), first)
    # Each call computes the features of the image it is given (nothing stale is returned):
    # both equal the NumPy reference, and they differ from each other.
    for image, features in ((rgb, first), (other, backbone.features(other))):
        network_input = expected_input(image, "vgg16")
        np.testing.assert_allclose(
            features,
            reference_features(network_input, weight, bias, 16),
            rtol=1e-4,
            atol=2e-5 * np.abs(network_input).max(),
        )
    assert np.abs(backbone.features(other) - first).max() > 0.1


# ------------------------------------------------------------------ the default backbone


@pytest.mark.network
def test_default_backbone_is_shared_and_described():
    first = default_backbone(n_threads=1)
    assert default_backbone(n_threads=1) is first
    assert (first.dim, first.stride, first.preset.name) == (1280, 32, "efficientnet-lite0")
    assert first.name.startswith("efficientnet-lite0-")
    assert default_backbone(n_threads=1, max_size=512) is not first
    assert default_backbone(n_threads=1, max_size=512).max_size == 512
    with pytest.raises(ValueError, match="n_threads"):
        default_backbone(n_threads=0)


@pytest.mark.network
def test_default_backbone_features_respond_to_content():
    from skimage import data

    backbone = default_backbone(n_threads=1)
    textured = backbone.features(random_image(96, 128))
    assert textured.shape == (1280, 3, 4)
    assert np.isfinite(textured).all() and textured.min() >= 0 and textured.max() <= 6  # ReLU6

    def photo(array, box=None):
        image = Image.fromarray(array if box is None else array[box[1] : box[3], box[0] : box[2]])
        return np.asarray(image.convert("RGB").resize((320, 224), Image.BILINEAR))

    cat = photo(data.chelsea())
    # Convolutional: shifting the image by one stride (32 px) shifts the map by one cell, away
    # from the borders (SAME padding); the misaligned comparison is the control.
    whole, shifted = backbone.features(cat), backbone.features(cat[:, 32:])
    assert whole.shape == (1280, 7, 10) and shifted.shape == (1280, 7, 9)
    aligned = np.corrcoef(whole[:, 2:-2, 3:-2].ravel(), shifted[:, 2:-2, 2:-2].ravel())[0, 1]
    misaligned = np.corrcoef(whole[:, 2:-2, 3:-2].ravel(), shifted[:, 2:-2, 3:-1].ravel())[0, 1]
    assert aligned > 0.98 and misaligned < aligned - 0.1, (aligned, misaligned)

    # ImageNet features: another crop of the same photo is far closer (MAC cosine) than other photos.
    def mac(image):
        vector = backbone.features(image).max(axis=(1, 2))
        return vector / np.linalg.norm(vector)

    same = mac(cat) @ mac(photo(data.chelsea(), (30, 20, 451, 300)))
    others = [mac(cat) @ mac(photo(p)) for p in (data.coffee(), data.astronaut())]
    assert same > 0.8 and max(others) < same - 0.3, (same, others)
