"""The search server under load: a real ``clustermac serve`` on loopback, many concurrent clients.

Builds (once, in ``--work``) a collection of ``--images`` photos, the way a user would with the
CLI: ``fit-whitening`` on separate photos, ``extract``, ``index --whitening --store
--write-store``. The photos are augmented views of the real photographs bundled with
scikit-image and scikit-learn (astronaut, cat, coffee, rocket, motorcycle, …): seeded random
crops (30–100 % of the area), aspect changes, flips, small rotations and brightness/contrast
changes, 200–360 px on the longer side. Queries are other augmented views of the same photos
with a box around most of the view, uploaded as JPEG.

Then starts ``clustermac serve`` in a subprocess, warms it up, and runs ``--rounds`` rounds of
``--searches`` searches from ``--clients`` threads (each its own HTTP connection, urllib).
Prints per round: p50 / p95 / p99 latency seen by the clients, throughput, errors (any answer
but 200), and the server's resident memory (VmRSS) before and after each round.

    python benchmarks/serve.py                        # 1000 images, 2 rounds of 500 searches, 8 clients
    python benchmarks/serve.py --rerank               # the same with AML re-ranking of the top 100
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def source_photos() -> list[np.ndarray]:
    """The real colour photographs installed with scikit-image and scikit-learn."""
    from skimage import data

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        try:
            photos.append(np.asarray(getattr(data, name)()))
        except Exception:  # a photo that would need a download
            pass
    photos.append(np.asarray(data.stereo_motorcycle()[0]))
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(np.asarray(image) for image in load_sample_images().images)
    except Exception:
        pass
    return [photo[..., :3] for photo in photos if photo.ndim == 3]


def augmented_view(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A seeded random view of a photo: crop, aspect, flip, rotation, brightness, contrast, size."""
    image = Image.fromarray(photo)
    width, height = image.size
    area = rng.uniform(0.3, 1.0)
    aspect = rng.uniform(0.75, 1.33)
    crop_width = int(min(width, width * np.sqrt(area * aspect)))
    crop_height = int(min(height, height * np.sqrt(area / aspect)))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    image = image.crop((left, top, left + crop_width, top + crop_height))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.rotate(float(rng.uniform(-8, 8)), resample=Image.BICUBIC, expand=False)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    longer = int(rng.integers(200, 361))
    image.thumbnail((longer, longer), Image.BICUBIC)
    return image


def write_photos(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    photos = source_photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        augmented_view(photos[i % len(photos)], rng).save(folder / f"img{i:05d}.jpg", quality=90)


def clustermac(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "clustermac.cli", *arguments], check=True)


def build_index(work: Path, images: int, max_size: int) -> Path:
    index = work / "index"
    if (index / "CURRENT").is_file():
        return index
    size = ["--max-size", str(max_size)]
    write_photos(work / "photos", images, seed=1)
    write_photos(work / "whitening", 40, seed=2)
    clustermac("fit-whitening", str(work / "whitening"), "--out", str(work / "w.npz"), "--quiet", *size)
    whitening = ["--whitening", str(work / "w.npz")]
    clustermac("extract", str(work / "photos"), "--out", str(work / "d.npy"), "--quiet", *whitening, *size)
    store = ["--store", str(work / "db.cmfm"), "--write-store"]
    root = ["--image-root", str(work / "photos")]
    clustermac("index", str(work / "d.npy"), "--out", str(index), *root, *whitening, *store)
    return index


def queries(count: int, seed: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, box) of ``count`` query views; the box covers the middle 80 % of the view."""
    photos = source_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        view = augmented_view(photos[i % len(photos)], rng)
        buffer = io.BytesIO()
        view.save(buffer, "JPEG", quality=90)
        w, h = view.size
        out.append((buffer.getvalue(), f"{0.1 * w:.1f},{0.1 * h:.1f},{0.9 * w:.1f},{0.9 * h:.1f}"))
    return out


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_round(url: str, jobs: list[tuple[bytes, str]], clients: int, rerank: bool) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))

    def client() -> None:
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                return
            image, box = jobs[i]
            body, content_type = multipart({"box": box, "k": "20", "rerank": "1" if rerank else "0"}, image)
            request = urllib.request.Request(
                url + "/api/search", data=body, headers={"Content-Type": content_type}, method="POST"
            )
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    results = json.loads(answer.read())["results"]
                    problem = None if results else "no results"
            except (urllib.error.URLError, OSError, ValueError) as error:
                problem = str(error)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if problem:
                    errors.append(problem)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "throughput": len(latencies) / wall,
        "errors": errors,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/clustermac-serve-bench", help="folder of the photos and index (kept)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="the server's --workers")
    parser.add_argument("--queue", type=int, default=16, help="the server's --queue")
    parser.add_argument("--rerank", action="store_true", help="AML re-ranking of the top 100 in every search")
    args = parser.parse_args()

    work = Path(args.work)
    started = time.perf_counter()
    index = build_index(work, args.images, args.max_size)
    print(f"index of {args.images} images ready in {time.perf_counter() - started:.0f} s: {index}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "clustermac.cli", "serve", "--index", str(index), "--port", str(port)]
    command += ["--workers", str(args.workers), "--queue", str(args.queue), "--threads", "1"]
    command += ["--reload-interval", "0", "--log-level", "warning"]
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                    health = json.loads(answer.read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not start")
        jobs = queries(args.searches, seed=3)
        run_round(url, jobs[:20], args.clients, args.rerank)  # warm-up: sessions, caches, allocator
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        )
        print(
            f"server: {health['images']} images, {health['method']}, workers {args.workers} × 1 ONNX thread, "
            f"queue {args.queue}; {args.clients} clients; rerank {'on' if args.rerank else 'off'}; CPU {cpu}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
        )
        print("round  searches  p50 ms  p95 ms  p99 ms  searches/s  errors  RSS before MB  RSS after MB")
        for round_number in range(1, args.rounds + 1):
            before = rss_mb(server.pid)
            result = run_round(url, jobs, args.clients, args.rerank)
            after = rss_mb(server.pid)
            print(
                f"{round_number:5d}  {len(jobs):8d}  {result['p50']:6.0f}  {result['p95']:6.0f}  {result['p99']:6.0f}"
                f"  {result['throughput']:10.1f}  {len(result['errors']):6d}  {before:13.0f}  {after:12.0f}"
            )
            for problem in sorted(set(result["errors"]))[:5]:
                print(f"   error: {problem}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
