"""Write VGG16 / ResNet101 feature-map backbones as ONNX files (the logic of ``clustermac export``).

torch is needed here and only here (the ``export`` extra); it is imported inside the
functions. torchvision is NOT needed: both architectures are defined below with torchvision's
module names, so these weight files load directly:

- torchvision ImageNet weights (``vgg16-397923af.pth``, ``resnet101-63fe2227.pth`` …):
  keys ``features.N.*`` (VGG16) / ``conv1.*``, ``bn1.*``, ``layerK.*`` (ResNet101);
- the Caffe-converted ``imagenet-caffe-vgg16-features-*.pth`` /
  ``imagenet-caffe-resnet101-features-*.pth`` of cnnimageretrieval-pytorch: a bare
  ``nn.Sequential`` of the convolutional part, keys ``N.*``;
- the fine-tuned ``retrievalSfM120k-*.pth`` networks of cnnimageretrieval-pytorch: a checkpoint
  whose ``state_dict`` holds ``features.N.*`` (plus pooling/whitening, ignored here).

Classifier, pooling and whitening weights are ignored; a missing backbone weight or a shape
that does not match is refused with a ``ValueError`` naming the key.

The networks of cnnimageretrieval-pytorch, including its Caffe-converted ones, take torchvision-
normalised RGB input (its ``init_network`` uses the ImageNet mean/std for all networks), so
export them with ``convention="torchvision"``. ``convention="caffe"`` is for weights converted
from the original Caffe models, which take BGR 0…255 input minus the mean pixel. The convention
only selects the preprocessing preset recorded in the file (``clustermac.preset`` metadata,
read by :class:`clustermac.Backbone`); the graph itself is the same.

Outputs: VGG16 → conv5_3 + ReLU (512 channels, stride 16, the last max-pool dropped);
ResNet101 → res5c + ReLU (the output of ``layer4``, 2048 channels, stride 32). The file is one
self-contained ONNX model (opset 17, weights inside), input ``image`` 1×3×H×W and output
``features`` with dynamic H and W, written atomically.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..files import atomic_write_bytes, file_sha256
from .metadata import PRECISIONS
from .onnx import Backbone
from .quantize import load_calibration_folder, quantize_backbone

__all__ = ["export_backbone", "build_torch_backbone", "load_backbone_weights", "ARCHITECTURES", "CONVENTIONS"]


ARCHITECTURES = ("vgg16", "resnet101")
CONVENTIONS = ("torchvision", "caffe")
_ONNX_OPSET = 17

# VGG16 configuration "D" (Simonyan & Zisserman 2015): channels per 3×3 conv, "M" = max-pool.
_VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)  # the final "M" is dropped: conv5_3 + ReLU
# ResNet101 bottleneck blocks per stage (He et al. 2016, Table 1).
_RESNET101_BLOCKS = (3, 4, 23, 3)
# Top-level children of torchvision's ResNet in order, as numbered by nn.Sequential(*children):
# how cnnimageretrieval-pytorch's ``features`` of a ResNet names them.
_RESNET_CHILD_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _require_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "exporting a backbone needs torch, which is not installed: pip install "
            "'clustermac[export]' (or pip install torch). The embedded default backbone "
            "(EfficientNet-Lite0) does not need it."
        ) from error
    return torch


def build_torch_backbone(arch: str, stride_in_1x1: bool = False):
    """The torch module of ``arch`` (``vgg16`` or ``resnet101``) up to its last conv + ReLU.

    Module names equal torchvision's, so torchvision state dicts load with ``strict=False``
    (only the classifier is absent). ``stride_in_1x1`` puts ResNet's stride on the first 1×1
    convolution of each downsampling block, as in the original Caffe ResNets; torchvision and
    cnnimageretrieval-pytorch put it on the 3×3 convolution (the default).
    """
    torch = _require_torch()
    nn = torch.nn

    if arch == "vgg16":

        class VGG16Features(nn.Module):
            def __init__(self):
                super().__init__()
                layers: list[Any] = []
                channels = 3
                for item in _VGG16_LAYERS:
                    if item == "M":
                        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    else:
                        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                        channels = item
                self.features = nn.Sequential(*layers)

            def forward(self, image):
                return self.features(image)

        return VGG16Features()

    if arch == "resnet101":

        class Bottleneck(nn.Module):
            expansion = 4

            def __init__(self, in_channels: int, width: int, stride: int):
                super().__init__()
                out_channels = width * self.expansion
                stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
                self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(out_channels)
                self.relu = nn.ReLU(inplace=False)
                self.downsample = None
                if stride != 1 or in_channels != out_channels:
                    self.downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
                    )

            def forward(self, x):
                out = self.relu(self.bn1(self.conv1(x)))
                out = self.relu(self.bn2(self.conv2(out)))
                out = self.bn3(self.conv3(out))
                shortcut = x if self.downsample is None else self.downsample(x)
                return self.relu(out + shortcut)

        class ResNet101Features(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
                self.bn1 = nn.BatchNorm2d(64)
                self.relu = nn.ReLU(inplace=False)
                self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                in_channels = 64
                for index, (blocks, width) in enumerate(zip(_RESNET101_BLOCKS, (64, 128, 256, 512))):
                    stride = 1 if index == 0 else 2
                    stage = []
                    for block in range(blocks):
                        stage.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                        in_channels = width * Bottleneck.expansion
                    setattr(self, f"layer{index + 1}", nn.Sequential(*stage))

            def forward(self, image):
                x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
                # layer4 ends with the ReLU of its last block: res5c + ReLU.
                return self.layer4(self.layer3(self.layer2(self.layer1(x))))

        return ResNet101Features()

    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def _normalise_keys(arch: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """Map the key names of the supported weight files to torchvision's."""
    result: dict[str, Any] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if arch == "vgg16":
            if name.split(".", 1)[0].isdigit():  # cirtorch's bare Sequential
                name = "features." + name
        else:
            if name.startswith("features."):  # cirtorch ImageRetrievalNet
                name = name[len("features.") :]
            head, _, rest = name.partition(".")
            if head.isdigit():
                if head not in _RESNET_CHILD_NAMES:
                    raise ValueError(f"weights: key {key!r} does not belong to a ResNet101 feature extractor")
                name = f"{_RESNET_CHILD_NAMES[head]}.{rest}"
        result[name] = value
    return result


def load_backbone_weights(model, arch: str, weights: PathLike) -> list[str]:
    """Load a weights file (see module docstring) into ``model``; returns the ignored keys.

    Raises ``ValueError`` naming the file when it cannot be read safely, holds no state dict,
    misses a backbone weight, or has a weight of the wrong shape.
    """
    torch = _require_torch()
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        # weights_only: never run code from the file.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"weights file {str(path)!r} cannot be read as a torch state dict "
            f"({type(error).__name__}: {str(error)[:300]})"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # cnnimageretrieval-pytorch checkpoints
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict (found {type(loaded).__name__})")
    state = _normalise_keys(arch, {k: v for k, v in loaded.items() if torch.is_tensor(v)})

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ValueError(
            f"weights file {str(path)!r} is not a {arch} backbone: {len(missing)} weights missing ({shown})"
        )
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"weights file {str(path)!r}: {key!r} has shape "
                f"{tuple(state[key].shape)}, the {arch} architecture needs "
                f"{tuple(tensor.shape)}"
            )
    usable = {k: v.to(tensor.dtype) for k, v in state.items() if (tensor := expected.get(k)) is not None}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in state if k not in expected)


def _randomise(model, seed: int) -> None:
    """Seeded random weights, batch-norm statistics included (so BN is not an identity)."""
    torch = _require_torch()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                # He initialisation keeps activations from vanishing through 100 layers.
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def _to_onnx_bytes(model, example) -> bytes:
    torch = _require_torch()
    buffer = io.BytesIO()
    arguments = dict(
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {2: "height", 3: "width"}, "features": {2: "feature_height", 3: "feature_width"}},
        opset_version=_ONNX_OPSET,
        do_constant_folding=True,
    )
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in recent torch but needs no onnxscript.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        try:
            torch.onnx.export(model, (example,), buffer, dynamo=False, **arguments)
        except TypeError:  # torch older than 2.5: no `dynamo` argument, TorchScript is default
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, **arguments)
    return buffer.getvalue()


def export_backbone(
    arch: str,
    out_path: PathLike,
    weights: PathLike | None = None,
    convention: str = "torchvision",
    seed: int = 0,
    stride_in_1x1: bool = False,
    verify: bool = True,
    precision: str = "float32",
    calibration: PathLike | None = None,
) -> Path:
    """Write the ``arch`` feature-map backbone as one self-contained ONNX file.

    Args:
        arch: ``"vgg16"`` (conv5_3 + ReLU) or ``"resnet101"`` (res5c + ReLU).
        out_path: the ``.onnx`` file to write (atomically: temp file + rename).
        weights: a torch weights file (torchvision ImageNet, cnnimageretrieval-pytorch
            Caffe-converted features or retrievalSfM120k checkpoint; see the module docstring).
            ``None``: torchvision's ImageNet weights if torchvision is installed and has them
            cached, else seeded random weights (with a warning; for tests and timing only).
        convention: ``"torchvision"`` (RGB, ImageNet mean/std) or ``"caffe"`` (BGR, mean
            subtraction): the preprocessing recorded as the file's preset.
        seed: seed of the random weights.
        stride_in_1x1: ResNet only; see :func:`build_torch_backbone`.
        verify: run the exported file with ONNX Runtime on a 96×128 input and compare it with
            torch; raise ``RuntimeError`` if they differ.
        precision: ``"float32"`` or ``"int8"`` (the float32 graph quantised by
            :func:`clustermac.backbones.quantize.quantize_backbone`; ``verify`` checks the
            float32 graph before quantisation).
        calibration: with ``precision="int8"``, a folder of calibration images; ``None`` = the
            generated ones (:func:`clustermac.backbones.quantize.calibration_images`).

    Returns the path written. The file's metadata holds ``clustermac.preset``
    (``vgg16``, ``vgg16-caffe``, ``resnet101`` or ``resnet101-caffe``) and
    ``clustermac.weights`` (a hash of the weights file, or ``random-seed<N>``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if stride_in_1x1 and arch != "resnet101":
        raise ValueError("stride_in_1x1 applies to resnet101 only")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if calibration is not None and precision != "int8":
        raise ValueError("calibration images are for precision='int8' only")
    images = load_calibration_folder(calibration) if calibration is not None else None
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"out_path {str(out)!r} is a directory; give a file name")
    torch = _require_torch()
    import onnx

    model = build_torch_backbone(arch, stride_in_1x1=stride_in_1x1)
    if weights is not None:
        load_backbone_weights(model, arch, weights)  # classifier/pooling/whitening keys ignored
        weights_id = file_sha256(Path(weights))[:12]
    else:
        weights_id = _torchvision_imagenet(model, arch)
        if weights_id is None:
            warnings.warn(
                f"export_backbone: no weights given and torchvision's ImageNet {arch} "
                f"weights are not available; writing RANDOM weights (seed {seed})",
                stacklevel=2,
            )
            _randomise(model, seed)
            weights_id = f"random-seed{seed}"
    if stride_in_1x1:
        weights_id += "-stride1x1"
    model.eval()

    example = torch.zeros(1, 3, 96, 128)
    with torch.no_grad():
        data = _to_onnx_bytes(model, example)
    proto = onnx.load_from_string(data)
    preset = arch if convention == "torchvision" else f"{arch}-caffe"
    onnx.helper.set_model_props(proto, {"clustermac.preset": preset, "clustermac.weights": weights_id})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if verify:
        _verify(model, data, arch)
    if precision == "float32":
        atomic_write_bytes(out, data)
        return out
    with tempfile.TemporaryDirectory(prefix="clustermac-export-") as work:
        float_path = Path(work) / "float32.onnx"
        float_path.write_bytes(data)
        return quantize_backbone(Backbone(float_path, n_threads=1), out, images=images)


def _torchvision_imagenet(model, arch: str) -> str | None:
    """Load torchvision's ImageNet weights into ``model`` if available offline; else None."""
    try:
        import torchvision  # noqa: F401
        from torch.hub import get_dir
    except Exception:  # torchvision missing or broken (it does not import beside torch here)
        return None
    file_names = {"vgg16": "vgg16-397923af.pth", "resnet101": "resnet101-63fe2227.pth"}
    cached = Path(get_dir()) / "checkpoints" / file_names[arch]
    if not cached.is_file():
        return None
    load_backbone_weights(model, arch, cached)
    return file_sha256(cached)[:12]


def _verify(model, data: bytes, arch: str) -> None:
    torch = _require_torch()
    import onnxruntime

    rng = np.random.default_rng(0)
    example = rng.standard_normal((1, 3, 96, 128)).astype(np.float32)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (result,) = session.run(["features"], {"image": example})
    with torch.no_grad():
        expected = model(torch.from_numpy(example)).numpy()
    scale = max(float(np.abs(expected).max()), 1e-6)
    if result.shape != expected.shape or float(np.abs(result - expected).max()) > 1e-3 * scale:
        raise RuntimeError(
            f"export of {arch}: ONNX Runtime output differs from torch (shapes {result.shape} vs {expected.shape})"
        )
