"""int8 backbones: ONNX Runtime static quantisation (QDQ, per-channel weights) of a float32 graph.

int8 changes the feature maps, so it is never chosen by timing: it is a *precision* the user asks
for (``Backbone(path, precision="int8")``, ``default_backbone(precision="int8")``,
``clustermac export … --int8``), and it is recorded in the backbone's name and in the
extractor's settings (``backbone_precision``), so descriptors, whitening files and indexes made
with it are never mixed with float32 ones.

The quantisation is fixed, not tuned per run:

- ``onnxruntime.quantization.quantize_static`` in the QDQ format, int8 symmetric weights with one
  scale per output channel, uint8 activations (the U8S8 kernels of ONNX Runtime on x86),
  MinMax calibration (deterministic: the same graph and images give the same file);
- calibration images: by default :func:`calibration_images`, 32 images *generated* from a fixed
  seed (smooth colour fields, ellipses, bars and texture; no photograph, no user data, no
  licence question), or the images of a folder the user gives (``clustermac export --calibration``).

Quantised files carry the metadata ``clustermac.precision = int8`` and ``clustermac.calibration``
(what they were calibrated on) besides the float graph's ``clustermac.preset`` and
``clustermac.weights``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._typing import PathLike
from ..files import atomic_write_bytes
from .metadata import METADATA_CALIBRATION, METADATA_PRECISION, METADATA_PRESET, METADATA_WEIGHTS, PRECISIONS

if TYPE_CHECKING:  # the backbone imports this module, not the other way round
    from .onnx import Backbone

__all__ = [
    "PRECISIONS",
    "METADATA_PRECISION",
    "METADATA_CALIBRATION",
    "CALIBRATION_VERSION",
    "calibration_images",
    "load_calibration_folder",
    "quantize_backbone",
    "int8_products_saturate",
]

#: Bump when :func:`calibration_images` or the quantisation settings change (cache files are keyed by it).
CALIBRATION_VERSION = 1
_CALIBRATION_COUNT = 32
_CALIBRATION_SIZE = (448, 336)  # width, height: a few feature-map locations even at stride 32
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


#: x86 CPU flags (as Linux's /proc/cpuinfo names them) with which ONNX Runtime's int8 convolutions
#: add the u8 x s8 products in 32 bits: VNNI's vpdpbusd (AVX512-VNNI, AVX-VNNI) and AMX tiles.
_EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_products_saturate(cpuinfo: str | None = None) -> bool:
    """Whether ONNX Runtime's int8 convolutions saturate on this CPU (x86 without VNNI or AMX).

    Without VNNI, its AVX2 / AVX-512BW kernels multiply uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds each pair of products in 16 bits with saturation (255 * 127 * 2
    exceeds 32767): some sums are clipped, so the int8 feature maps drift further from float32's
    than on a CPU with VNNI (described in ONNX Runtime's quantisation guide,
    https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html, and OpenVINO's
    https://docs.openvino.ai/latest/pot_saturation_issue.html). Minimum descriptor cosine int8 vs
    float32 with the embedded EfficientNet-Lite0 (MAC / R-MAC / ClusterMAC): on an AMD EPYC with
    AVX512-VNNI at least 0.98 on the test's 5 photos at 512 px (0.976 / 0.984 / 0.979 over 11 photos
    at 1024 px); on an AMD EPYC with AVX2 only 0.935 / 0.953 / 0.935 on the test's photos.
    Neither 7-bit weights (``reduce_range``, 0.963-0.976) nor uint8 weights (0.987-0.991 but 5.7x
    slower than float32 there) made a recipe worth switching to, so the quantised file is the same on
    every CPU and this is reported instead (:class:`~clustermac.Backbone` warns).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when ``None``). False where it cannot tell
    (not x86, no /proc/cpuinfo).
    """
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags_line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags_line is None:
        return False
    flags = set(flags_line.split(":", 1)[-1].split())
    return "avx2" in flags and not (flags & _EXACT_INT8_FLAGS)


def calibration_images(
    count: int = _CALIBRATION_COUNT, size: tuple[int, int] = _CALIBRATION_SIZE, seed: int = 0
) -> list[np.ndarray]:
    """``count`` RGB uint8 images (height×width×3) made deterministically from ``seed``.

    Each image is a smooth colour field (a few low-frequency cosines per channel), a dozen
    filled ellipses and bars of random colours, and fine-grained noise, so that the network
    sees flat regions, edges, blobs and texture over the whole 0…255 range. Same arguments,
    same bytes, on every machine (NumPy's PCG64 generator, float64 arithmetic).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    width, height = size
    rng = np.random.Generator(np.random.PCG64(seed))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ys /= height
    xs /= width
    images = []
    for _ in range(count):
        image = np.zeros((height, width, 3), np.float64)
        for channel in range(3):
            for _ in range(3):
                fy, fx = rng.uniform(0.3, 3.0, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                image[:, :, channel] += rng.uniform(20, 60) * np.cos(2 * np.pi * (fy * ys + fx * xs) + phase)
            image[:, :, channel] += rng.uniform(60, 200)
        for _ in range(12):
            colour = rng.uniform(0, 255, size=3)
            cy, cx = rng.uniform(0, 1, size=2)
            if rng.uniform() < 0.6:  # an ellipse
                ry, rx = rng.uniform(0.03, 0.3, size=2)
                inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
            else:  # a bar
                half_y, half_x = rng.uniform(0.01, 0.25, size=2)
                inside = (np.abs(ys - cy) <= half_y) & (np.abs(xs - cx) <= half_x)
            image[inside] = colour
        image += rng.normal(0.0, rng.uniform(2, 25), size=image.shape)
        images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return images


def load_calibration_folder(folder: PathLike, max_size: int = 512) -> list[np.ndarray]:
    """The images of ``folder`` (sorted by name), each resized so its longer side is at most ``max_size``.

    Raises ``ValueError`` if the folder does not exist or holds no readable image.
    """
    from ..images import load_image, resize_max

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"calibration folder {str(path)!r} does not exist or is not a directory")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"calibration folder {str(path)!r} holds no image ({', '.join(_IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        try:
            image, _ = resize_max(load_image(file), max_size)
        except (OSError, ValueError) as error:
            raise ValueError(f"calibration image {str(file)!r} cannot be read: {error}") from error
        images.append(np.asarray(image))
    return images


def calibration_id(images: Sequence[np.ndarray]) -> str:
    """A short hash identifying a calibration set (its pixels and the quantisation settings)."""
    digest = hashlib.sha256(f"clustermac-int8-v{CALIBRATION_VERSION}".encode())
    for image in images:
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs advice ("consider pre-processing") on the root logger: mute it."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _CalibrationReader:
    """Feeds the preprocessed calibration images to ONNX Runtime's calibrator, one per call."""

    def __init__(self, inputs: Iterator[np.ndarray], input_name: str):
        self._inputs = inputs
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._inputs, None)
        return None if batch is None else {self._input_name: batch}


def quantize_backbone(
    float_backbone: Backbone,
    out_path: PathLike,
    images: Sequence[np.ndarray] | None = None,
    calibration_name: str | None = None,
) -> Path:
    """Write the int8 (QDQ, per-channel) version of the float32 backbone ``float_path`` to ``out_path``.

    Args:
        float_backbone: a float32 :class:`clustermac.Backbone` (its file, preset and preprocessing).
        out_path: the ``.onnx`` file to write (atomically).
        images: RGB uint8 calibration images; ``None`` = :func:`calibration_images`.
        calibration_name: what is recorded as ``clustermac.calibration``; default
            ``"generated-v<version>"`` for the default images, else ``"images-<hash>"``.

    Returns ``out_path``. Raises ``ValueError`` for a model that is already quantised or cannot
    be loaded, or an image smaller than the backbone's stride.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if float_backbone.precision != "float32":
        raise ValueError(f"{str(float_backbone.onnx_path)!r} is already quantised ({float_backbone.precision})")
    if images is None:
        images = calibration_images()
        calibration_name = calibration_name or f"generated-v{CALIBRATION_VERSION}"
    elif len(images) == 0:
        raise ValueError("images: the calibration set is empty")
    calibration_name = calibration_name or f"images-{calibration_id(images)}"
    inputs = (float_backbone.preprocess(image) for image in images)
    reader = _CalibrationReader(inputs, float_backbone.input_name)

    source = onnx.load(str(float_backbone.onnx_path))
    properties = {p.key: p.value for p in source.metadata_props}
    properties[METADATA_PRESET] = float_backbone.preset.name
    properties[METADATA_WEIGHTS] = float_backbone.weights_id
    properties[METADATA_PRECISION] = "int8"
    properties[METADATA_CALIBRATION] = calibration_name
    with tempfile.TemporaryDirectory(prefix="clustermac-quantize-") as work, _quiet_root_logger():
        quantized = Path(work) / "int8.onnx"
        quantize_static(
            str(float_backbone.onnx_path),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        model = onnx.load(str(quantized))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, properties)
    out = Path(out_path)
    atomic_write_bytes(out, model.SerializeToString())
    return out
