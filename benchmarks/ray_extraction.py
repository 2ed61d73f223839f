"""Extraction on Ray against the threaded single-process extractor, and a two-node run.

    python benchmarks/ray_extraction.py                         # 80 photos at 1024 px, 3 rounds
    python benchmarks/ray_extraction.py --n-images 40 --max-size 512 --repeats 1 --no-two-node

Overhead (same photos, same run, the two measurements alternated over --repeats rounds, medians):
"single" = `clustermac.extract_folder` (one process: decoding, the network on all cores and the
pooling overlapped on threads), writing desc.npy; "ray" = `extract_folder_ray` on a local Ray
instance started once by this script (``ray.init(num_cpus=--cpus)``, its start-up not counted),
writing a shard folder; each call's wall time includes Ray Data's planning and the actors'
start (each loads its ONNX session), as a user's run does. Both write to a fresh folder every
round. The descriptors are checked to be the same bytes. Two ratios of ray images/s ÷ single
images/s: "wall" = whole calls on --n-images photos (start-up included); "marginal" = the rate of
the images beyond a small run of one shard per worker, (N − k) / (T_N − T_k), both timed in the
same round: the steady-state throughput a long run approaches, without the fixed start-up.

Two-node (--two-node, default on): a head node (`ray start --head --num-cpus=1`) and a worker
node (`ray start --address=… --num-cpus=1`) on this machine, each in its own process group
started by this script (and only those groups are stopped at the end: `ray stop` would stop
every Ray on the machine); then `clustermac extract DIR --out OUT --ray-address HEAD` with two
one-CPU workers, which Ray can only place one per node. The result must equal the
single-process bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction import photos  # the same real photographs as benchmarks/extraction.py


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_photos(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(photos(n, size)):
        image.save(folder / f"photo{i:04d}.jpg", quality=90)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed(function, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - t0


def overhead(args: argparse.Namespace, folder: Path, work: Path) -> dict:
    import ray

    import clustermac
    from clustermac.distributed import extract_folder_ray

    backbone = clustermac.default_backbone(n_threads=args.cpus)
    extractor = clustermac.Extractor(backbone, args.method, max_size=args.max_size)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    names = sorted(p.name for p in folder.iterdir())
    n, k = len(names), (args.cpus // args.cpus_per_worker) * args.shard_size
    if k >= n:
        raise SystemExit(f"--n-images {n}: needs more than one shard per worker ({k})")
    ray_options = {"shard_size": args.shard_size, "cpus_per_worker": args.cpus_per_worker, "progress": False}
    times: dict[str, list[float]] = {"single": [], "ray": [], "single_small": [], "ray_small": []}
    try:
        # Warm-up, not timed: the first Ray Data run of a new Ray instance starts its worker pool.
        extract_folder_ray(extractor, folder, work / "warm-up", names=names[:2], **ray_options)
        clustermac.extract_folder(extractor, folder, work / "warm-up.npy", names=names[:2], progress=False)
        for r in range(args.repeats):
            out = work / f"single{r}" / "desc.npy"
            times["single"].append(_timed(clustermac.extract_folder, extractor, folder, out, progress=False))
            times["ray"].append(_timed(extract_folder_ray, extractor, folder, work / f"ray{r}", **ray_options))
            small = work / f"small{r}"
            times["single_small"].append(
                _timed(clustermac.extract_folder, extractor, folder, small / "d.npy", names=names[:k], progress=False)
            )
            times["ray_small"].append(
                _timed(extract_folder_ray, extractor, folder, small / "shards", names=names[:k], **ray_options)
            )
            single, _ = clustermac.load_descriptors(out)
            sharded, _ = clustermac.load_descriptors(work / f"ray{r}")
            if np.asarray(sharded).tobytes() != np.asarray(single).tobytes():
                raise SystemExit("the Ray descriptors differ from the single-process ones")
            print(f"round {r}: " + ", ".join(f"{key} {value[-1]:.1f} s" for key, value in times.items()), flush=True)
    finally:
        ray.shutdown()
    median = {key: statistics.median(value) for key, value in times.items()}
    rates = {
        "single_images_per_s": n / median["single"],
        "ray_images_per_s": n / median["ray"],
        "single_marginal_images_per_s": (n - k) / (median["single"] - median["single_small"]),
        "ray_marginal_images_per_s": (n - k) / (median["ray"] - median["ray_small"]),
    }
    result: dict = {"seconds": times, "small_run_images": k}
    result.update({key: round(value, 2) for key, value in rates.items()})
    result["wall_ratio"] = round(rates["ray_images_per_s"] / rates["single_images_per_s"], 3)
    result["marginal_ratio"] = round(rates["ray_marginal_images_per_s"] / rates["single_marginal_images_per_s"], 3)
    result["same_bytes"] = True
    return result


def _start_node(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, count: int, env: dict, starter: subprocess.Popen, timeout: float = 180) -> list:
    """The alive nodes' ids once ``count`` nodes are up (polling); SystemExit when ``starter`` dies."""
    probe = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([n['NodeID'][:8] for n in ray.nodes() if n['Alive']]))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if starter.poll() is not None:
            raise SystemExit(f"`ray start` exited ({starter.returncode}): {starter.stderr.read()[-2000:]}")
        run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        lines = run.stdout.strip().splitlines()
        if run.returncode == 0 and lines and len(json.loads(lines[-1])) >= count:
            return json.loads(lines[-1])
        time.sleep(3)
    raise SystemExit(f"{address}: {count} Ray nodes did not come up within {timeout:.0f} s")


def two_node(args: argparse.Namespace, folder: Path, work: Path) -> dict:
    import clustermac

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Its own temporary folder, so this cluster is not the one `ray.init()` finds on the machine.
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    temp = tempfile.mkdtemp(prefix="crb-", dir="/tmp")
    head_options = [f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"]
    head = _start_node([ray_cli, "start", "--head", *head_options, *common], env)
    worker = None
    try:
        nodes = _wait_for_nodes(address, 1, env, head)
        worker = _start_node([ray_cli, "start", f"--address={address}", *common], env)
        nodes = _wait_for_nodes(address, 2, env, worker)
        out = work / "two-node"
        command = [sys.executable, "-m", "clustermac.cli", "extract", str(folder), "--out", str(out)]
        command += ["--ray-address", address, "--shard-size", str(args.shard_size), "--max-size", str(args.max_size)]
        command += ["--method", args.method, "--quiet"]
        t0 = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - t0
        if result.returncode != 0:
            raise SystemExit(f"two-node run failed ({result.returncode}): {result.stderr[-2000:]}")
        sharded, manifest = clustermac.load_descriptors(out)
        single, _ = clustermac.load_descriptors(work / "single0" / "desc.npy")
        same = np.asarray(sharded).tobytes() == np.asarray(single).tobytes()
        return {
            "command": " ".join(command[1:]),
            "alive_nodes": nodes,
            "seconds": round(seconds, 1),
            "images_per_s": round(len(manifest["images"]) / seconds, 2),
            "same_bytes_as_single_process": same,
        }
    finally:
        if worker is not None:
            _stop_group(worker)
        _stop_group(head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=80)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--method", default="clustermac")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray and threads of the single process")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-two-node", dest="two_node", action="store_false")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="clustermac-ray-bench-") as tmp:
        work = Path(tmp)
        folder = work / "photos"
        write_photos(folder, args.n_images, args.max_size)
        results = {
            "cpu": cpu_name(),
            "n_images": args.n_images,
            "max_size": args.max_size,
            "method": args.method,
            "cpus": args.cpus,
            "cpus_per_worker": args.cpus_per_worker,
            "shard_size": args.shard_size,
            "overhead": overhead(args, folder, work),
        }
        print(json.dumps(results["overhead"]), flush=True)
        if args.two_node:
            results["two_node"] = two_node(args, folder, work)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
