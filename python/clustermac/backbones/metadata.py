"""The ONNX metadata keys clustermac writes into backbone files, and the precisions a backbone runs in.

Kept apart so that :mod:`.onnx` (which reads them) and :mod:`.quantize` (which writes them) do not
import each other.
"""

from __future__ import annotations

#: ONNX metadata keys written by clustermac's exporters and read by :class:`clustermac.Backbone`.
METADATA_PRESET = "clustermac.preset"
METADATA_WEIGHTS = "clustermac.weights"
#: ONNX metadata key of a quantised graph's precision.
METADATA_PRECISION = "clustermac.precision"
#: ONNX metadata key naming the calibration set of a quantised graph.
METADATA_CALIBRATION = "clustermac.calibration"
#: Precisions a backbone can run in. float32 is the default.
PRECISIONS = ("float32", "int8")
