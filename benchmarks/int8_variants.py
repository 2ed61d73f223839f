"""Quantisation recipes for the embedded EfficientNet-Lite0: speed of the bare network and descriptor cosine.

    python benchmarks/int8_variants.py                        # every variant, timed against float32
    python benchmarks/int8_variants.py --variants qdq qop --profile   # + ONNX Runtime kernel times per op type
    python benchmarks/int8_variants.py --variants qdq qdq-percentile --cosine   # + descriptor cosines

Each variant is ``onnxruntime.quantization.quantize_static`` on the embedded float32 graph with the
32 generated calibration images of clustermac.backbones.quantize, changing one setting of the
recipe clustermac ships (QDQ, per-channel int8 weights, uint8 activations, MinMax). The variants
are written to --work (kept between runs). Timing: the bare network (session.run) on --n-images
photos at --max-size px, float32 and every variant alternating over --repeats rounds, median
ms/image and float32 / variant. --cosine: the cosine of ClusterMAC, R-MAC and MAC descriptors
(unwhitened) to float32's, minimum over the 5 scikit-image photographs of the tests and the photos.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from extraction import photos


def variant_settings(float_path: Path) -> dict[str, dict]:
    """quantize_static keyword arguments of each variant (on top of the shipped recipe)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    convs = [node for node in onnx.load(str(float_path)).graph.node if node.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    symmetric = {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}
    return {
        "qdq": {},  # the recipe clustermac ships
        "qop": {"quant_format": QuantFormat.QOperator},
        "qdq-float-depthwise": {"nodes_to_exclude": depthwise},
        "qop-float-depthwise": {"quant_format": QuantFormat.QOperator, "nodes_to_exclude": depthwise},
        "qdq-float-stem-head": {"nodes_to_exclude": [convs[0].name, convs[-1].name]},
        "qdq-conv-only": {"op_types_to_quantize": ["Conv"]},
        "qdq-s8s8": symmetric,
        "qop-s8s8": {"quant_format": QuantFormat.QOperator, **symmetric},
        "qdq-per-tensor": {"per_channel": False},
        "qdq-keep-activations": {"extra_options": {"QDQKeepRemovableActivations": True}},
        "qdq-percentile": {"calibrate_method": CalibrationMethod.Percentile},
        "qdq-entropy": {"calibrate_method": CalibrationMethod.Entropy},
    }


def quantize_variant(float_backbone, settings: dict, out: Path) -> Path:
    """Write one variant (kept if it exists)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from clustermac.backbones.quantize import _CalibrationReader, _quiet_root_logger, calibration_images

    if out.is_file():
        return out
    arguments = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
        **settings,
    }
    inputs = (float_backbone.preprocess(image) for image in calibration_images())
    reader = _CalibrationReader(inputs, float_backbone.input_name)
    with _quiet_root_logger():
        quantize_static(str(float_backbone.onnx_path), str(out), reader, **arguments)
    return out


def op_type_times(session, inputs, runs: int = 2) -> dict[str, float]:
    """ms/image of each op type's kernels, from ONNX Runtime's profile of ``runs`` passes over ``inputs``."""
    for _ in range(runs):
        for x in inputs:
            session.run(None, x)
    with open(session.end_profiling()) as file:
        events = json.load(file)
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: microseconds / 1000 / (runs * len(inputs)) for op, microseconds in totals.most_common()}


def descriptor_cosines(float_backbone, path: Path, images) -> dict[str, float]:
    from clustermac.backbones import Backbone
    from clustermac.descriptors import Extractor

    variant = Backbone(path, preset=float_backbone.preset.name, n_threads=float_backbone.n_threads)
    cosines = {}
    for method in ("clustermac", "rmac", "mac"):
        reference = Extractor(float_backbone, method, max_size=1024)
        candidate = Extractor(variant, method, max_size=1024)
        cosines[method] = min(float(reference.extract(i) @ candidate.extract(i)) for i in images)
    return cosines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", help="default: all")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "clustermac-int8-variants"))
    parser.add_argument("--n-images", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print kernel times per op type")
    parser.add_argument("--cosine", action="store_true", help="also print descriptor cosines to float32")
    args = parser.parse_args(argv)

    from PIL import Image
    from skimage import data

    from clustermac.backbones import default_backbone
    from clustermac.backbones.onnx import _open_session
    from clustermac.images import resize_max

    float_backbone = default_backbone(n_threads=args.threads)
    settings = variant_settings(float_backbone.onnx_path)
    names = args.variants or list(settings)
    unknown = sorted(set(names) - set(settings))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {sorted(settings)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"float32": Path(float_backbone.onnx_path)}
    for name in names:
        print(f"quantising {name}", flush=True)
        paths[name] = quantize_variant(float_backbone, settings[name], work / f"{name}.onnx")

    images = [resize_max(p, args.max_size)[0] for p in photos(args.n_images, args.max_size)]
    inputs = [{float_backbone.input_name: float_backbone.preprocess(image)} for image in images]
    sessions = {name: _open_session(path, args.threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, inputs[0])  # warm-up
    for _ in range(args.repeats):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            for x in inputs:
                session.run(None, x)
            times[name].append(1000 * (time.perf_counter() - t0) / len(inputs))
    reference = statistics.median(times["float32"])
    print(
        f"bare network, {args.max_size} px, {args.threads} threads, median of {args.repeats}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"  {name:22s} {median:7.1f} ms/image   float32 / this {reference / median:.2f}x")

    if args.profile:
        import onnxruntime

        for name, path in paths.items():
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.enable_profiling = True
            options.profile_file_prefix = str(work / f"profile-{name}")
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            totals = op_type_times(session, inputs)
            print(f"  {name}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in totals.items()) + " (ms/image)")

    if args.cosine:
        skimage_photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.stereo_motorcycle()[0]]
        cosine_images = [Image.fromarray(p).convert("RGB") for p in skimage_photos] + images
        for name in names:
            cosines = descriptor_cosines(float_backbone, paths[name], cosine_images)
            print(f"  {name:22s} min cosine " + ", ".join(f"{m} {c:.4f}" for m, c in cosines.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
