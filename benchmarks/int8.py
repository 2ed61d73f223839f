"""int8 against float32 backbones: full-descriptor extraction speed, in one run.

    python benchmarks/int8.py                                   # embedded EfficientNet-Lite0
    python benchmarks/int8.py --backbone vgg16 --n-images 4     # VGG16 conv5_3, random weights
    python benchmarks/int8.py --backbone resnet101 --n-images 4

For each round, the same images go through ``Extractor.extract_many`` (decode, network, the
method's pooling/clustering; ClusterMAC by default) with the float32 backbone, then with its int8
version (ONNX Runtime static quantisation, see clustermac.backbones.quantize); the rounds
alternate so that a change in machine load hits both. Prints the median images/s of each and the
ratio int8/float32, the ratio of CPU time per image (less sensitive to other jobs on a shared machine),
and the cosine between their descriptors (unwhitened) as a sanity check.
The int8 graph of a random-weight export is calibrated on the generated images, like the
embedded one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from extraction import make_backbone, photos


def int8_backbone(float_backbone, threads: int):
    from clustermac.backbones import Backbone

    return Backbone(float_backbone.onnx_path, preset=float_backbone.preset.name, n_threads=threads, precision="int8")


def time_precisions(args) -> dict:
    from clustermac.descriptors import Extractor

    float32 = make_backbone(args.backbone, args.threads, args.onnx)
    int8 = int8_backbone(float32, args.threads)
    images = photos(args.n_images, args.max_size)
    extractors = {
        "float32": Extractor(float32, args.method, max_size=args.max_size),
        "int8": Extractor(int8, args.method, max_size=args.max_size),
    }
    descriptors = {name: ex.extract_many(images, progress=False) for name, ex in extractors.items()}  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in extractors}
    cpu: dict[str, list[float]] = {name: [] for name in extractors}
    for _ in range(args.repeats):
        for name, extractor in extractors.items():
            t0, c0 = time.perf_counter(), time.process_time()
            extractor.extract_many(images, progress=False)
            runs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    cosines = np.sum(descriptors["float32"] * descriptors["int8"], axis=1)
    per_second = {name: len(images) / statistics.median(times) for name, times in runs.items()}
    return {
        "backbone": float32.name,
        "method": args.method,
        "max_size": args.max_size,
        "threads": args.threads,
        "n_images": len(images),
        "float32_images_per_s": per_second["float32"],
        "int8_images_per_s": per_second["int8"],
        "speedup": per_second["int8"] / per_second["float32"],
        # CPU seconds of this process (all threads) per image: less sensitive than wall time to other
        # jobs on a shared machine (ONNX Runtime's threads do not busy-wait, so this is work done).
        "float32_cpu_s_per_image": statistics.median(cpu["float32"]) / len(images),
        "int8_cpu_s_per_image": statistics.median(cpu["int8"]) / len(images),
        "cpu_ratio": statistics.median(cpu["float32"]) / statistics.median(cpu["int8"]),
        "descriptor_cosine_min": float(cosines.min()),
        "descriptor_cosine_median": float(np.median(cosines)),
        "runs_s": runs,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default", choices=("default", "vgg16", "resnet101"))
    parser.add_argument("--onnx", help="float32 ONNX file for --backbone vgg16/resnet101 instead of a random export")
    parser.add_argument("--method", default="clustermac")
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = time_precisions(args)
    print(json.dumps(result, indent=1))
    print(
        f"{result['backbone']} {args.method} at {args.max_size} px, {args.threads} threads, median of "
        f"{args.repeats}: float32 {result['float32_images_per_s']:.2f} images/s, int8 "
        f"{result['int8_images_per_s']:.2f} images/s, int8/float32 {result['speedup']:.2f}x; "
        f"descriptor cosine min {result['descriptor_cosine_min']:.4f}; CPU time per image float32 / int8 "
        f"{result['cpu_ratio']:.2f}x; load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
