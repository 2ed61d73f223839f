"""The embedded EfficientNet-Lite0: checkpoint reader, ONNX graph, pretrained sanity, cache."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from clustermac import Backbone
from clustermac.backbones import efficientnet_lite as lite

onnxruntime = pytest.importorskip("onnxruntime")

WEIGHTS = lite.efficientnet_lite0_weights_path()


@pytest.fixture(scope="module")
def state():
    return lite.read_torch_state_dict(WEIGHTS)


@pytest.fixture(scope="module")
def classifier_session(tmp_path_factory):
    path = lite.efficientnet_lite0_onnx_path(classifier=True, directory=tmp_path_factory.mktemp("cache"))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


# ------------------------------------------------------------------ checkpoint reader


def test_reader_gives_the_full_state_dict(state):
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_stem.weight"].dtype == np.float32
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())


def test_reader_equals_torch_load(state):
    torch = pytest.importorskip("torch")
    reference = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert list(reference) == list(state)
    for key, tensor in reference.items():
        np.testing.assert_array_equal(state[key], tensor.numpy(), err_msg=key)


@pytest.mark.parametrize("zip_format", [True, False])
def test_reader_handles_views_offsets_and_dtypes(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    saved = {
        "transposed": base.t(),  # non-contiguous strides
        "slice": base[2:5, 3:7],  # storage offset + strides
        "shared": base,  # same storage as the two above
        "double": torch.linspace(0, 1, 7, dtype=torch.float64),
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "int": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "long": torch.tensor(12345678901, dtype=torch.int64),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "small.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    loaded = lite.read_torch_state_dict(path)
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert loaded[key].dtype == tensor.numpy().dtype, key
        np.testing.assert_array_equal(loaded[key], tensor.numpy(), err_msg=key)
    assert loaded["slice"].flags["C_CONTIGUOUS"]


def _legacy_file(payload: bytes) -> bytes:
    """A legacy-format torch file whose main object pickle is ``payload``."""
    parts = [
        pickle.dumps(lite._LEGACY_MAGIC, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"little_endian": True}, protocol=2),
        payload,
        pickle.dumps([], protocol=2),
    ]
    return b"".join(parts)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(pickle.dumps({"x": _RunsCode()}, protocol=2)))
    with pytest.raises(ValueError, match=r"evil.pth.*refusing to load '(posix|os|nt)\.system'"):
        lite.read_torch_state_dict(path)


def test_reader_refuses_non_checkpoints(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="random.pth"):
        lite.read_torch_state_dict(path)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="plain.pth"):
        lite.read_torch_state_dict(plain)
    with pytest.raises(ValueError, match="does not exist"):
        lite.read_torch_state_dict(tmp_path / "missing.pth")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.999])
def test_reader_refuses_truncated_checkpoint(tmp_path, keep):
    data = WEIGHTS.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.pth"):
        lite.read_torch_state_dict(path)


class FloatStorage:  # pickled under this module's name, then renamed to torch.FloatStorage
    pass


def _FakeRebuildFunction(*args):  # renamed to torch._utils._rebuild_tensor_v2 in the bytes
    raise AssertionError("never called")


class _FakeTensor:
    def __init__(self, storage, size, stride):
        self.args = (storage, 0, size, stride, False, None)

    def __reduce__(self):
        return (_FakeRebuildFunction, self.args)


def test_reader_refuses_tensor_past_its_storage(tmp_path):
    # A hand-made legacy file: a 4-element storage, a tensor claiming 10 elements.
    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", FloatStorage, "k0", "cpu", 4, None)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": _FakeTensor(marker, (10,), (1,))})
    module = __name__.encode()
    payload = buffer.getvalue()
    for old, new in [
        (b"c" + module + b"\n_FakeRebuildFunction\n", b"ctorch._utils\n_rebuild_tensor_v2\n"),
        (b"c" + module + b"\nFloatStorage\n", b"ctorch\nFloatStorage\n"),
    ]:
        assert old in payload
        payload = payload.replace(old, new)
    tail = pickle.dumps(["k0"], protocol=2) + struct.pack("<q", 4) + np.arange(4, dtype="<f4").tobytes()
    path = tmp_path / "overrun.pth"
    path.write_bytes(_legacy_file(payload)[: -len(pickle.dumps([], protocol=2))] + tail)
    with pytest.raises(ValueError, match="overrun.pth: a tensor reaches past the end"):
        lite.read_torch_state_dict(path)
    # The same file with a 4-element tensor reads fine: the refusal above is about the size.
    path.write_bytes(path.read_bytes().replace(b"K\n\x85", b"K\x04\x85", 1))
    np.testing.assert_array_equal(lite.read_torch_state_dict(path)["w"], np.arange(4))


# ------------------------------------------------------------------ the graph


@pytest.mark.network
def test_graph_equals_the_torch_model(state, classifier_session):
    torch = pytest.importorskip("torch")
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    # image_size=None: the reference uses dynamic "SAME" padding, valid for any input size.
    model = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    session, _ = classifier_session
    rng = np.random.default_rng(0)
    for height, width in [(64, 96), (75, 101), (33, 47), (224, 224)]:  # odd sizes test padding
        image = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        features, logits = session.run(["features", "logits"], {"image": image})
        with torch.no_grad():
            expected_features = model.extract_features(torch.from_numpy(image)).numpy()
            expected_logits = model(torch.from_numpy(image)).numpy()
        assert features.shape == (1, 1280, -(-height // 32), -(-width // 32))
        assert features.shape == expected_features.shape
        np.testing.assert_allclose(features, expected_features, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(logits, expected_logits, atol=2e-4, rtol=1e-4)


def test_graph_refuses_wrong_weights(state):
    broken = dict(state)
    del broken["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(ValueError, match=r"'_blocks.3._depthwise_conv.weight' is missing"):
        lite.build_efficientnet_lite0(broken)
    reshaped = dict(state)
    reshaped["_conv_head.weight"] = np.zeros((1280, 320), np.float32)
    with pytest.raises(ValueError, match=r"_conv_head.weight' has shape \(1280, 320\)"):
        lite.build_efficientnet_lite0(reshaped)


@pytest.mark.network
@pytest.mark.parametrize(
    "name, classes",
    [
        ("chelsea", range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        ("coffee", (967, 968)),  # espresso, cup
    ],
)
def test_imagenet_head_names_the_photo(classifier_session, name, classes):
    skimage_data = pytest.importorskip("skimage.data")
    session, path = classifier_session
    backbone = Backbone(path, n_threads=1)  # preset read from the model's metadata
    assert backbone.preset.name == "efficientnet-lite0"
    image = Image.fromarray(getattr(skimage_data, name)()).resize((224, 224), Image.BICUBIC)
    (logits,) = session.run(["logits"], {"image": backbone.preprocess(image)})
    assert int(np.argmax(logits)) in classes
    # The features output alone, pooled and put through the same head, agrees.
    features = backbone.features(image)
    state = lite.read_torch_state_dict(lite.efficientnet_lite0_weights_path())
    pooled = features.mean(axis=(1, 2))
    by_hand = state["_fc.weight"] @ pooled + state["_fc.bias"]
    np.testing.assert_allclose(by_hand, logits[0], atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------ cache


@pytest.mark.network
def test_cache_directory_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERMAC_CACHE", str(tmp_path / "cache"))
    assert lite.cache_dir() == tmp_path / "cache"
    first = lite.efficientnet_lite0_onnx_path()
    assert first.parent == tmp_path / "cache" and first.suffix == ".onnx"
    stamp = first.stat().st_mtime_ns
    second = lite.efficientnet_lite0_onnx_path()
    assert second == first and second.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temp files
    monkeypatch.delenv("CLUSTERMAC_CACHE")
    assert lite.cache_dir() == lite.Path.home() / ".cache" / "clustermac"


@pytest.mark.network
def test_cache_is_keyed_by_the_weights(tmp_path):
    other = tmp_path / "other.pth"
    other.write_bytes(WEIGHTS.read_bytes() + b"\0")  # same tensors, different file hash
    a = lite.efficientnet_lite0_onnx_path(directory=tmp_path)
    b = lite.efficientnet_lite0_onnx_path(weights=other, directory=tmp_path)
    assert a != b and a.is_file() and b.is_file()
    assert Backbone(a).name != Backbone(b).name


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(lite.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        lite.efficientnet_lite0_onnx_path(directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lite.efficientnet_lite0_onnx_path(weights=tmp_path / "none.pth", directory=tmp_path)


@pytest.mark.network
def test_unwritable_default_cache_falls_back_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CLUSTERMAC_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(lite, "_FALLBACK_DIRECTORY", tmp_path / "fallback")
    with pytest.warns(RuntimeWarning, match="cannot write the EfficientNet-Lite0 model"):
        path = lite.efficientnet_lite0_onnx_path()
    assert path.parent == tmp_path / "fallback" and path.is_file()
    assert Backbone(path).dim == 1280
    # An explicit directory is not silently replaced.
    with pytest.raises(OSError, match="cannot write"):
        lite.efficientnet_lite0_onnx_path(directory=blocker / "cache")


@pytest.mark.network
def test_damaged_cache_file_is_rebuilt(tmp_path, monkeypatch):
    from clustermac.backbones import onnx as backbone_module

    monkeypatch.setenv("CLUSTERMAC_CACHE", str(tmp_path))
    monkeypatch.setattr(backbone_module, "_DEFAULT_BACKBONES", {})
    path = lite.efficientnet_lite0_onnx_path()
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 3])
    backbone = backbone_module.default_backbone(n_threads=1)
    assert backbone.onnx_path == path and path.stat().st_size == size
    assert backbone.features(np.zeros((64, 64, 3), np.uint8)).shape == (1280, 2, 2)
