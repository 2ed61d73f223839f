"""CNN backbones: an image in, a D×H×W feature map out (ONNX Runtime on the CPU).

:mod:`clustermac.backbones.onnx` runs any ONNX feature-map model; the embedded default,
EfficientNet-Lite0, is built by :mod:`clustermac.backbones.efficientnet_lite`;
:mod:`clustermac.backbones.export` writes VGG16 / ResNet101 graphs (needs torch). Only the first is
imported here: the other two load onnx or torch when used.
"""

from __future__ import annotations

from .onnx import PRESETS, Backbone, Preset, default_backbone

__all__ = ["Backbone", "Preset", "PRESETS", "default_backbone"]
