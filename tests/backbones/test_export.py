"""export_backbone: VGG16 / ResNet101 to ONNX, checked numerically against torch.

Only the tests that build a torch model skip without torch; the argument checks and the
"torch missing" error are checked everywhere."""

from __future__ import annotations

import functools
import sys

import numpy as np
import onnx
import onnxruntime
import pytest

from clustermac import Backbone
from clustermac.backbones.export import _randomise, build_torch_backbone, export_backbone, load_backbone_weights

try:
    import torch
except ImportError:  # the export tests that need no torch still run
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install clustermac[export])")


@functools.lru_cache(maxsize=4)
def random_model(arch: str, seed: int):
    """Seeded random weights, as export_backbone draws them (shared: do not modify)."""
    model = build_torch_backbone(arch)
    _randomise(model, seed)
    return model.eval()


def torch_features(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image)).numpy()


@functools.lru_cache(maxsize=4)
def onnx_session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_features(path, image: np.ndarray) -> np.ndarray:
    return onnx_session(path).run(["features"], {"image": image})[0]


@pytest.fixture(scope="module", params=["vgg16", "resnet101"])
def exported(request, tmp_path_factory):
    arch = request.param
    directory = tmp_path_factory.mktemp(arch)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        path = export_backbone(arch, directory / f"{arch}.onnx", seed=3)
    return arch, path


# ------------------------------------------------------------------ random-weight round trip

# (height, width) → expected feature-map size, from the layer arithmetic (floor at each pool).
SIZES = {
    "vgg16": [((96, 128), (6, 8)), ((75, 101), (4, 6)), ((33, 200), (2, 12))],
    "resnet101": [((96, 128), (3, 4)), ((75, 101), (3, 4)), ((33, 200), (2, 7))],
}


@needs_torch
@pytest.mark.network
def test_onnx_equals_torch_on_several_sizes(exported):
    arch, path = exported
    model = random_model(arch, seed=3)  # the same seeded weights the export drew
    rng = np.random.default_rng(0)
    for (height, width), (h, w) in SIZES[arch]:
        image = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        expected = torch_features(model, image)
        result = onnx_features(path, image)
        assert result.shape == expected.shape == (1, model_dim(arch), h, w)
        assert expected.std() > 1e-3  # the comparison is not between two zero maps
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert result.min() >= 0  # ends with a ReLU


def model_dim(arch: str) -> int:
    return {"vgg16": 512, "resnet101": 2048}[arch]


@needs_torch
@pytest.mark.network
def test_file_is_self_contained_with_dynamic_size(exported):
    arch, path = exported
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no external data, no temp
    model = onnx.load(str(path), load_external_data=False)
    assert all(not t.HasField("data_location") or t.data_location == 0 for t in model.graph.initializer)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[:2]] == [1, 3]
    assert dims[2].dim_param and dims[3].dim_param  # symbolic H and W
    properties = {p.key: p.value for p in model.metadata_props}
    assert properties["clustermac.preset"] == arch
    assert properties["clustermac.weights"] == "random-seed3"


@needs_torch
@pytest.mark.network
def test_backbone_reads_the_export(exported):
    arch, path = exported
    backbone = Backbone(path)
    assert backbone.preset.name == arch
    assert backbone.dim == model_dim(arch)
    assert backbone.stride == {"vgg16": 16, "resnet101": 32}[arch]
    rgb = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    expected = torch_features(random_model(arch, seed=3), backbone.preprocess(rgb))[0]
    np.testing.assert_allclose(backbone.features(rgb), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# ------------------------------------------------------------------ weight files


def _bare_sequential_keys(arch: str, state):
    """cnnimageretrieval-pytorch's Caffe-converted features: an nn.Sequential of children."""
    if arch == "vgg16":
        return {k[len("features.") :]: v for k, v in state.items()}
    numbers = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {numbers[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in state.items()}


def _weight_files(arch: str, state, directory, layouts_wanted=None):
    """The same weights in every layout export_backbone accepts (or those asked for)."""
    classifier = (
        {"classifier.0.weight": torch.zeros(4, 4)}
        if arch == "vgg16"
        else {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    )
    bare = _bare_sequential_keys(arch, state)
    cirtorch = {"features." + k: v for k, v in bare.items()}
    cirtorch.update({"pool.p": torch.tensor([3.0]), "whiten.weight": torch.eye(3)})
    layouts = {
        "torchvision": {**state, **classifier},
        "caffe-features": bare,
        "retrieval-sfm120k": {
            "epoch": 7,
            "meta": {"architecture": arch, "pooling": "gem", "mean": [0.485, 0.456, 0.406]},
            "state_dict": cirtorch,
        },
        "data-parallel": {"module." + k: v for k, v in state.items()},
    }
    files = {}
    for name, content in layouts.items():
        if layouts_wanted is not None and name not in layouts_wanted:
            continue
        files[name] = directory / f"{arch}-{name}.pth"
        torch.save(content, files[name])
    return files


@needs_torch
@pytest.mark.network
@pytest.mark.parametrize(
    "arch, layouts",
    [
        ("vgg16", None),
        # ResNet101 files are 170 MB each: only the layouts whose key names need mapping.
        ("resnet101", ("caffe-features", "retrieval-sfm120k")),
    ],
)
def test_every_weight_layout_loads(tmp_path, arch, layouts):
    source = random_model(arch, seed=3)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    for layout, path in _weight_files(arch, state, tmp_path, layouts).items():
        target = build_torch_backbone(arch)
        ignored = load_backbone_weights(target, arch, path)
        for key, value in source.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            assert torch.equal(target.state_dict()[key], value), f"{layout}: {key}"
        extra = {
            "torchvision": 2 if arch == "resnet101" else 1,
            "caffe-features": 0,
            "retrieval-sfm120k": 2,
            "data-parallel": 0,
        }[layout]
        assert len(ignored) == extra, (layout, ignored)


@needs_torch
@pytest.mark.network
def test_export_with_a_weights_file_and_caffe_convention(tmp_path):
    source = random_model("vgg16", seed=3)
    weights = tmp_path / "retrievalSfM120k-vgg16-gem.pth"
    torch.save({"state_dict": {k: v for k, v in source.state_dict().items()}}, weights)
    path = export_backbone("vgg16", tmp_path / "out" / "vgg16-caffe.onnx", weights=weights, convention="caffe")
    properties = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert properties["clustermac.preset"] == "vgg16-caffe"
    assert len(properties["clustermac.weights"]) == 12
    image = np.random.default_rng(2).standard_normal((1, 3, 64, 80)).astype(np.float32)
    expected = torch_features(source, image)
    np.testing.assert_allclose(onnx_features(path, image), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert Backbone(path).preset.channel_order == "BGR"


# ------------------------------------------------------------------ refusals


@needs_torch
@pytest.mark.network
def test_shape_mismatch_is_refused(tmp_path):
    state = random_model("vgg16", seed=3).state_dict()
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError,
        match=r"bad.pth.*'features.0.weight' has shape \(64, 3, 5, 5\).*"
        r"needs \(64, 3, 3, 3\)",
    ):
        export_backbone("vgg16", tmp_path / "x.onnx", weights=tmp_path / "bad.pth")
    assert not (tmp_path / "x.onnx").exists()


@needs_torch
@pytest.mark.network
def test_other_architecture_is_refused(tmp_path):
    # ResNet50-like: layer3 has 6 blocks instead of 23.
    state = {
        k: v
        for k, v in random_model("resnet101", seed=3).state_dict().items()
        if not (k.startswith("layer3.") and int(k.split(".")[1]) >= 6)
    }
    torch.save(state, tmp_path / "resnet50ish.pth")
    with pytest.raises(ValueError, match=r"not a resnet101 backbone: \d+ weights missing \(layer3.6"):
        export_backbone("resnet101", tmp_path / "x.onnx", weights=tmp_path / "resnet50ish.pth")
    # VGG weights offered as ResNet.
    torch.save(random_model("vgg16", seed=3).state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="not a resnet101 backbone|does not belong"):
        export_backbone("resnet101", tmp_path / "x.onnx", weights=tmp_path / "vgg.pth")
    assert not (tmp_path / "x.onnx").exists()


class NotAStateDict:
    pass


@needs_torch
@pytest.mark.network
def test_unreadable_weights_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="tensor.pth.*does not hold a state dict"):
        export_backbone("vgg16", tmp_path / "x.onnx", weights=tmp_path / "tensor.pth")
    torch.save({"object": NotAStateDict()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth.*cannot be read"):  # weights_only refuses
        export_backbone("vgg16", tmp_path / "x.onnx", weights=tmp_path / "pickled.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ValueError, match="text.pth.*cannot be read"):
        export_backbone("vgg16", tmp_path / "x.onnx", weights=tmp_path / "text.pth")
    with pytest.raises(ValueError, match="does not exist"):
        export_backbone("vgg16", tmp_path / "x.onnx", weights=tmp_path / "none.pth")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"arch": "alexnet"}, "arch must be one of"),
        ({"arch": "vgg16", "convention": "matconvnet"}, "convention must be one of"),
        ({"arch": "vgg16", "stride_in_1x1": True}, "resnet101 only"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        export_backbone(out_path=tmp_path / "x.onnx", **kwargs)


def test_out_path_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        export_backbone("vgg16", tmp_path)


@needs_torch
@pytest.mark.network
def test_stride_in_1x1_moves_the_stride():
    default = build_torch_backbone("resnet101")
    caffe = build_torch_backbone("resnet101", stride_in_1x1=True)
    assert default.layer2[0].conv2.stride == (2, 2) and default.layer2[0].conv1.stride == (1, 1)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)


def test_missing_torch_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"needs torch.*clustermac\[export\]"):
        export_backbone("vgg16", tmp_path / "x.onnx")
