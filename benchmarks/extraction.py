"""Extraction cost: full ClusterMAC (or another method) against the bare backbone.

    python benchmarks/extraction.py                        # embedded EfficientNet-Lite0, 1024 px
    python benchmarks/extraction.py --backbone vgg16       # VGG16 conv5_3 (random weights, exported with torch)
    python benchmarks/extraction.py --memory 100 500 1000  # peak RSS of `extract_folder` for growing folders
    python benchmarks/extraction.py --method clustermac-box --compare rmac   # two methods in one run

Timing: the same images, in the same run, alternating the two measurements over --repeats rounds;
"bare" = decode + resize + the network on every image, sequentially, on the backbone's --threads session;
"bare per core" = the same work one image per core (side-by-side session), as the extractor runs it (the
bare network at its fastest over many images); "full" = Extractor.extract_many (one image per core:
decode, network and pooling/clustering). Prints medians and the overhead over both bare references.
With --compare METHOD, that method's "full" time is measured in the same rounds (its own
embedded-backbone head, see DescriptorMethod.backbone_head) and the ratio of the two is printed.
With --spinning-reference, the bare network on the same backbone with ONNX Runtime's busy-waiting threads
(its default, which clustermac turns off) is timed too, in the same rounds. (The full extraction runs its
images on the side-by-side session, one thread per image up to 8 cores, where spinning changes nothing,
so it is not timed again.)
With --breakdown, each step of the full extraction is also timed on its own, sequentially (median over
the rounds, ms/image): decode, resize, network input, network, RGB at feature resolution (methods that
cluster colours only), clustering, pooling, aggregation (l2, a whitening learned on the same images, sum);
the network's share and the rest are what the overlapped pipeline has to hide. The network input is also
made the way earlier versions made it (a gather from a 256-entry table per channel), checked equal bit
for bit: the same-run reference of the current arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photos(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """n distinct real photographs at least `size` px on the long side (random crops of the
    installed photos, upsampled where needed, so that the network sees `size`-px inputs)."""
    from clustermac.bench.photo_benchmark import find_photo_sources

    sources = find_photo_sources()
    paths = [s.path for role in ("background", "object", "training") for s in sources[role]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.open(paths[i % len(paths)]).convert("RGB")
        w, h = img.size
        scale = size / max(w, h) * (1.0 + 0.1 * rng.random())
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
        out.append(img)
    return out


def make_backbone(name: str, threads: int, onnx: str | None, method: str = "clustermac", precision: str = "float32"):
    from clustermac.backbones import Backbone, default_backbone
    from clustermac.descriptors.registry import method_class

    if name == "default":
        return default_backbone(n_threads=threads, head=method_class(method).backbone_head, precision=precision)
    if onnx is None:
        from clustermac.backbones.export import export_backbone

        onnx = os.path.join(tempfile.gettempdir(), f"clustermac-bench-{name}-random.onnx")
        if not os.path.exists(onnx):
            print(f"exporting {name} with random weights to {onnx}", flush=True)
            export_backbone(name, onnx, weights=None)
    return Backbone(onnx, preset=name, n_threads=threads, precision=precision)


def spinning_backbone(backbone):
    """A copy of ``backbone`` whose session lets ONNX Runtime's threads busy-wait (ORT's default)."""
    from clustermac.backbones import Backbone
    from clustermac.backbones.onnx import _open_session

    copy = Backbone(backbone.onnx_path, preset=backbone.preset.name, n_threads=backbone.n_threads)
    copy._session = _open_session(copy.onnx_path, backbone.n_threads or 0, spinning=True)
    return copy


def time_bare(extractor, images, cpu: list[float] | None = None) -> float:
    """Seconds for decode + resize + network on every image, sequentially (CPU seconds appended to ``cpu``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for img in images:
        extractor.backbone.features(extractor.prepare(img).image)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def time_bare_per_core(extractor, images, cpu: list[float] | None = None) -> float:
    """Seconds for decode + resize + network on every image, one image per core (side-by-side session)
    as the extractor runs them (per_image_in_order): the bare network at its fastest over many images."""
    from clustermac.descriptors.pipeline import per_image_in_order

    def network(i: int, side_by_side: bool):
        return extractor.backbone.features(extractor.prepare(images[i]).image, side_by_side=side_by_side)

    t0, c0 = time.perf_counter(), time.process_time()
    for _, result in per_image_in_order(extractor, len(images), network):
        if isinstance(result, Exception):
            raise result
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def time_full(extractor, images, cpu: list[float] | None = None) -> float:
    """Seconds for Extractor.extract_many on the images, the overlapped pipeline (CPU seconds appended to ``cpu``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    extractor.extract_many(images, progress=False)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def table_preprocess(backbone, image) -> np.ndarray:
    """The network input as versions before the tenth session made it: a gather from a 256-entry
    table per channel (the reference of the "network input (256-entry table)" step)."""
    table = np.arange(256, dtype=np.float32)[None, :] * backbone._scale[:, None] - backbone._offset[:, None]
    rgb = np.asarray(image)
    out = np.empty((1, 3, *rgb.shape[:2]), np.float32)
    for channel, source in enumerate(backbone._source_channels):
        np.take(table[channel], rgb[:, :, source], out=out[0, channel])
    return out


def time_steps(extractor, images) -> dict[str, float]:
    """Seconds spent in each step of a regional method's extraction, sequentially, over the images."""
    from clustermac import _core
    from clustermac.descriptors.extractor import rgb_at_feature_resolution
    from clustermac.images import load_image, resize_max

    backbone, steps = extractor.backbone, {}

    def timed(step, function, *arguments):
        t0 = time.perf_counter()
        result = function(*arguments)
        steps[step] = steps.get(step, 0.0) + time.perf_counter() - t0
        return result

    for img in images:
        decoded = timed("decode", load_image, img)
        resized, _ = timed("resize", resize_max, decoded, extractor.max_size)
        network_input = timed("network input", backbone.preprocess, resized)
        reference = timed("network input (256-entry table)", table_preprocess, backbone, resized)
        if not np.array_equal(reference.view(np.uint32), network_input.view(np.uint32)):
            raise SystemExit("preprocess differs from the 256-entry table")
        fmap = timed("network", lambda x: backbone._run(x)[0], network_input)
        rgb = (
            timed("rgb at feature resolution", rgb_at_feature_resolution, resized, *fmap.shape[1:])
            if extractor.uses_rgb
            else None
        )
        labels = timed("clustering", extractor.cluster_labels, fmap, rgb) if extractor.clusters else None
        vectors = timed("pooling", extractor.regional_vectors, fmap, rgb, labels)
        timed("aggregation", _core.aggregate_regions, vectors, extractor.whitening_mean, extractor.whitening_projection)
    return steps


def time_extraction(args) -> dict:
    from clustermac.descriptors import Extractor

    backbone = make_backbone(args.backbone, args.threads, args.onnx, args.method, args.precision)
    images = photos(args.n_images, args.max_size)
    extractor = Extractor(backbone, args.method, max_size=args.max_size)
    bare_times, full_times, compare_times, bare_cpu, full_cpu = [], [], [], [], []
    per_core_times, per_core_cpu = [], []
    extractor.extract_many(images[:1], progress=False)  # warm-up (session, caches)
    other = None
    if args.compare:
        other_backbone = make_backbone(args.backbone, args.threads, args.onnx, args.compare, args.precision)
        other = Extractor(other_backbone, args.compare, max_size=args.max_size)
        other.extract_many(images[:1], progress=False)
    spinning = None
    spinning_times: list[float] = []
    if args.spinning_reference:
        spinning = Extractor(spinning_backbone(backbone), args.method, max_size=args.max_size)
        time_bare(spinning, images[:1])  # warm-up
    for _ in range(args.repeats):
        if other is not None:
            compare_times.append(time_full(other, images))
        if spinning is not None:
            spinning_times.append(time_bare(spinning, images))
        bare_times.append(time_bare(extractor, images, bare_cpu))
        per_core_times.append(time_bare_per_core(extractor, images, per_core_cpu))
        full_times.append(time_full(extractor, images, full_cpu))
    bare, full = statistics.median(bare_times), statistics.median(full_times)
    per_core = statistics.median(per_core_times)
    if spinning is not None:
        compared = {
            "spinning_bare_s_per_image": statistics.median(spinning_times) / len(images),
            "spinning_bare_runs_s": spinning_times,
        }
    else:
        compared = {}
    if other is not None:
        other_full = statistics.median(compare_times)
        compared = {
            "compare_method": args.compare,
            "compare_full_s_per_image": other_full / len(images),
            "full_over_compare": full / other_full,
            "compare_runs_s": compare_times,
        }
    result = {
        "backbone": backbone.name,
        "method": args.method,
        "max_size": args.max_size,
        "n_images": len(images),
        "threads": args.threads,
        "bare_s_per_image": bare / len(images),
        "full_s_per_image": full / len(images),
        "overhead_percent": 100.0 * (full / bare - 1.0),
        "bare_per_core_s_per_image": per_core / len(images),
        "overhead_over_per_core_percent": 100.0 * (full / per_core - 1.0),
        # CPU seconds of the process (all threads): the work added, less sensitive to other jobs than wall time.
        "bare_cpu_s_per_image": statistics.median(bare_cpu) / len(images),
        "full_cpu_s_per_image": statistics.median(full_cpu) / len(images),
        "bare_per_core_cpu_s_per_image": statistics.median(per_core_cpu) / len(images),
        "load_average": os.getloadavg()[0],
        "bare_runs_s": bare_times,
        "full_runs_s": full_times,
        "bare_per_core_runs_s": per_core_times,
        **compared,
    }
    if args.breakdown:
        extractor.fit_whitening(images, progress=False)  # so that the aggregation step does its real work
        rounds = [time_steps(extractor, images) for _ in range(args.repeats)]
        result["steps_ms_per_image"] = {
            step: 1000 * statistics.median(r[step] for r in rounds) / len(images) for step in rounds[0]
        }
    return result


def peak_memory_child(n: int, backbone: str, method: str, max_size: int) -> None:
    """Run `extract_folder` on a folder of n images and print the peak RSS (MB)."""
    from clustermac.descriptors import Extractor, extract_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        base = photos(8, max_size)
        for i in range(n):
            base[i % len(base)].save(folder / f"{i:05d}.jpg", quality=85)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extract_folder(
            Extractor(make_backbone(backbone, 2, None), method, max_size=max_size),
            folder,
            Path(tmp) / "d.npy",
            progress=False,
        )
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"n_images": n, "peak_rss_mb": after, "peak_before_extract_mb": before}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default", choices=("default", "vgg16", "resnet101"))
    parser.add_argument("--onnx", help="use this ONNX file for --backbone vgg16/resnet101 instead of a random export")
    parser.add_argument("--method", default="clustermac")
    parser.add_argument("--precision", default="float32", choices=("float32", "int8"), help="the backbone's precision")
    parser.add_argument("--compare", help="also time this method's full extraction in the same rounds")
    parser.add_argument("--n-images", type=int, default=12)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spinning-reference", action="store_true", help="also time busy-waiting ORT threads")
    parser.add_argument("--breakdown", action="store_true", help="also time each step on its own")
    parser.add_argument("--memory", type=int, nargs="*", help="peak-memory mode: folder sizes to extract")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breakdown:
        from clustermac.descriptors.registry import method_class

        if not method_class(args.method).regional:
            parser.error(f"--breakdown times the steps of a regional method (R-MAC, ClusterMAC), not {args.method}")

    if args.memory_child is not None:
        peak_memory_child(args.memory_child, args.backbone, args.method, args.max_size)
        return 0
    if args.memory:
        rows = []
        for n in args.memory:
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                str(n),
                "--backbone",
                args.backbone,
                "--method",
                args.method,
                "--max-size",
                str(args.max_size),
            ]
            rows.append(
                json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                )
            )
            print(f"{rows[-1]['n_images']:6d} images: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        return 0
    result = time_extraction(args)
    print(json.dumps(result, indent=1))
    print(
        f"{result['backbone']} at {args.max_size} px, {args.threads} threads, median of {args.repeats}: "
        f"bare {1000 * result['bare_s_per_image']:.0f} ms/image, "
        f"full {args.method} {1000 * result['full_s_per_image']:.0f} ms/image, "
        f"overhead {result['overhead_percent']:+.1f} %; CPU time bare {1000 * result['bare_cpu_s_per_image']:.0f} "
        f"ms/image, full {1000 * result['full_cpu_s_per_image']:.0f} ms/image; "
        f"load average {result['load_average']:.1f}"
    )
    print(
        f"bare network one image per core (as the extractor runs them): "
        f"{1000 * result['bare_per_core_s_per_image']:.0f} ms/image, CPU time "
        f"{1000 * result['bare_per_core_cpu_s_per_image']:.0f} ms/image; full over it "
        f"{result['overhead_over_per_core_percent']:+.1f} %"
    )
    if args.spinning_reference:
        bare_spin = result["spinning_bare_s_per_image"]
        print(
            f"bare network with busy-waiting ONNX Runtime threads: {1000 * bare_spin:.0f} ms/image; full over it "
            f"{100 * (result['full_s_per_image'] / bare_spin - 1):+.1f} %"
        )
    if args.breakdown:
        print(", ".join(f"{step} {ms:.1f}" for step, ms in result["steps_ms_per_image"].items()), "(ms/image)")
    if args.compare:
        print(
            f"full {args.compare} {1000 * result['compare_full_s_per_image']:.0f} ms/image; "
            f"{args.method} / {args.compare} = {result['full_over_compare']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
