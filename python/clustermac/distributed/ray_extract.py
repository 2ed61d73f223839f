"""Descriptor extraction on a Ray cluster, with Ray Data.

The driver (this process) lists the images, cuts them into shards of ``shard_size`` images and
hands the shards still to do to ``ray.data.from_items(...).map_batches(...)`` with a pool of
actors. Each actor holds ONE :class:`~clustermac.Extractor` (one ONNX Runtime session whose
intra-op threads are the actor's CPUs), built once from what the driver put in Ray's object
store: the backbone's ONNX bytes and the extractor's state (settings, whitening, clustering
PCA). No shared filesystem is assumed for them; workers read the images from the paths they
are given. The descriptors of a shard come back through the object store and only the driver
writes the output (:class:`~clustermac.distributed.shards.ShardWriter`), shard by shard as they
arrive, so a killed run resumes where it stopped. A dead actor is restarted by Ray and its shard
retried (up to ``max_retries`` times per shard).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._typing import PathLike
from ..descriptors.extractor import Extractor
from ..descriptors.store import descriptor_settings, extract_rows, settings_fingerprint
from ..files import CRASH_ENVIRONMENT_VARIABLE, crash_point, output_lock, remove_stale_temporaries
from ..images import list_images
from ..kernels import kernel_record
from .shards import SHARD_SIZE, ShardWriter

__all__ = ["extract_folder_ray", "connect_ray"]

_DTYPE = np.dtype("<f4")


#: Environment variables of the driver that its workers get too: the C++ core's SIMD caps
#: (``clustermac._core.simd_level``) and the fault-injection point of the tests.
FORWARDED_VARIABLES = ("CLUSTERMAC_NO_AVX512", "CLUSTERMAC_NO_AVX2", "CLUSTERMAC_NO_BF16", CRASH_ENVIRONMENT_VARIABLE)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens at a ``host:port`` Ray address."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if address in ("auto", "local"):
            return
        raise ValueError(f"Ray address {address!r}: expected HOST:PORT (or ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"Ray address {address!r}: no Ray cluster answers there ({error})") from None


def import_ray() -> Any:
    """The ``ray`` module, or a RuntimeError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RuntimeError(f"distributed extraction needs Ray: pip install 'clustermac[ray]' ({error})") from None
    return ray


def connect_ray(address: str | None = None) -> bool:
    """Make sure this process is connected to Ray: an already initialised Ray is used as is;
    otherwise ``address`` (``HOST:PORT``, ``ray://…``, ``auto``) is joined, or, when None, a
    local Ray instance is started for this process. Returns True when this call started or
    joined Ray (the caller then shuts it down). Raises ``ConnectionError`` naming an address
    that does not answer."""
    ray = import_ray()

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _probe(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except Exception as error:  # Ray raises several types (ConnectionError, RuntimeError, …)
            raise ConnectionError(f"Ray address {address!r}: cannot join the cluster ({error})") from error
    else:
        # "local": a new instance even when RAY_ADDRESS or a `ray start` cluster exists on the machine.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return True


def _extractor_recipe(extractor: Extractor) -> dict[str, Any]:
    """What a worker needs to rebuild ``extractor`` exactly: the backbone's ONNX bytes and
    preset, and the extractor's own state (settings, whitening, clustering PCA)."""
    backbone = extractor.backbone
    state = {k: v for k, v in vars(extractor).items() if k not in ("backbone", "_method")}
    return {
        "onnx": Path(backbone.onnx_path).read_bytes(),
        "preset": backbone.preset.name,
        "backbone_name": backbone.name,
        "backbone_max_size": int(backbone.max_size),
        "method": extractor.method,
        "state": state,
    }


def _rebuild_extractor(recipe: dict[str, Any], threads: int) -> Extractor:
    """The worker's Extractor, from :func:`_extractor_recipe`, its ONNX session on ``threads``."""
    from ..backbones import Backbone

    folder = tempfile.mkdtemp(prefix="clustermac-worker-")
    onnx = Path(folder) / "backbone.onnx"
    onnx.write_bytes(recipe["onnx"])
    backbone = Backbone(onnx, preset=recipe["preset"], n_threads=threads, max_size=recipe["backbone_max_size"])
    if backbone.name != recipe["backbone_name"]:
        raise RuntimeError(f"worker backbone {backbone.name!r} differs from the driver's {recipe['backbone_name']!r}")
    extractor = Extractor(backbone, recipe["method"])
    extractor.__dict__.update(recipe["state"])
    extractor.method = recipe["method"]  # its method object again, over the restored state
    return extractor


class _ShardExtractor:
    """The Ray Data callable class: one per actor, holding one Extractor for all its shards."""

    def __init__(self, recipe: list, threads: int) -> None:
        import ray

        (reference,) = recipe  # nested in a list so that Ray hands over the reference itself
        self.extractor = _rebuild_extractor(ray.get(reference), threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, vectors, failures = [], [], []
        for shard, listing in zip(batch["shard"], batch["images"]):
            crash_point("ray.worker_shard")  # fault injection: a worker killed mid-run
            paths, names = json.loads(listing)
            rows, failed = extract_rows(self.extractor, paths, names)
            kept = [j for j, name in enumerate(names) if name not in failed]
            shards.append(int(shard))
            vectors.append(np.ascontiguousarray(rows[kept], dtype=_DTYPE).tobytes())
            failures.append(json.dumps(failed))
        return {
            "shard": np.asarray(shards, dtype=np.int64),
            "vectors": np.asarray(vectors, dtype=object),
            "failed": np.asarray(failures, dtype=object),
            "kernels": np.asarray([json.dumps(kernel_record())] * len(shards), dtype=object),  # this worker's code
        }


def extract_folder_ray(
    extractor: Extractor,
    folder: PathLike,
    out: PathLike,
    *,
    names: Sequence[str] | None = None,
    ray_address: str | None = None,
    shard_size: int = SHARD_SIZE,
    cpus_per_worker: int = 1,
    workers: int | None = None,
    max_retries: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract the descriptors of every image in ``folder`` on Ray into the shard folder ``out``.

    ``names`` (default: :func:`~clustermac.images.list_images` of ``folder``) are paths relative
    to ``folder`` (or absolute) that the workers can read. ``ray_address`` joins a running
    cluster (``HOST:PORT``, ``ray://…``, ``auto``); None starts a local Ray instance for the call
    (an already initialised Ray is used as is). ``workers`` actors (default: the cluster's CPUs
    divided by ``cpus_per_worker``) each hold one Extractor running ONNX Runtime on
    ``cpus_per_worker`` threads; Ray restarts a dead actor (always) and retries its shard up to
    ``max_retries`` times (then the run stops with a RuntimeError; the finished shards stay).

    The output layout, its resumption and its checks are in :mod:`clustermac.distributed.shards`;
    read it back with :func:`clustermac.load_descriptors`. The descriptors are the bytes
    single-process :func:`clustermac.extract_folder` writes, in the same order; unreadable images
    are skipped and listed in ``manifest["failed"]`` with their reason. Returns the manifest.
    Raises ``ConnectionError`` when ``ray_address`` does not answer, ``ValueError`` for a folder
    of another run or a bad argument, :class:`~clustermac.OutputLockedError` when another process
    writes ``out``.
    """
    for name, value, minimum in (("shard_size", shard_size, 1), ("cpus_per_worker", cpus_per_worker, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected an integer >= 1 or None, got {workers!r}")
    folder, out = Path(folder), Path(out)
    names = list(names) if names is not None else list_images(folder)
    if os.path.realpath(out) == os.path.realpath(folder):
        raise ValueError(f"--out {out}: is the image folder")
    if ray_address and not import_ray().is_initialized():
        _probe(ray_address)  # an unreachable cluster fails here, before the output is touched
    settings = descriptor_settings(extractor)
    fingerprint = settings_fingerprint(settings, names, int(shard_size))
    with output_lock(out, command="extract --ray"):
        remove_stale_temporaries(out)
        writer = ShardWriter(out, names, settings, int(shard_size), fingerprint)
        if writer.todo:
            _run_on_ray(extractor, folder, writer, ray_address, int(cpus_per_worker), workers, max_retries, progress)
        return writer.publish()


def _run_on_ray(
    extractor: Extractor,
    folder: Path,
    writer: ShardWriter,
    address: str | None,
    cpus_per_worker: int,
    workers: int | None,
    max_retries: int,
    progress: bool,
) -> None:
    ray = import_ray()
    started = connect_ray(address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
        todo = writer.todo
        items = [
            {"shard": n, "images": json.dumps([[str(folder / name) for name in writer.shards[n]], writer.shards[n]])}
            for n in todo
        ]
        # The workers do not inherit this process's environment: the core's SIMD caps (so that a
        # cluster of mixed CPUs can run one level of the core) and the fault-injection setting
        # reach them this way.
        forwarded = {name: os.environ[name] for name in FORWARDED_VARIABLES if os.environ.get(name)}
        runtime_env = {"env_vars": forwarded} if forwarded else None
        recipe = ray.put(_extractor_recipe(extractor))  # held here for the whole run (actor restarts need it)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates extra remote args, yet documents them as the way to bound retries.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _ShardExtractor,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
                num_cpus=cpus_per_worker,
                runtime_env=runtime_env,
                fn_constructor_kwargs={"recipe": [recipe], "threads": cpus_per_worker},
                max_restarts=-1,  # a dead actor always comes back ...
                max_task_retries=max_retries,  # ... but a shard that keeps killing its worker ends the run
            )
        data_logger = logging.getLogger("ray.data")
        level = data_logger.level
        data_logger.setLevel(logging.WARNING)  # our progress bar, not Ray Data's execution log
        try:
            _collect(dataset, writer, progress)
        except ray.exceptions.RayError as error:  # e.g. a worker that cannot build its extractor
            raise RuntimeError(f"extraction on Ray failed: {error}") from error
        finally:
            data_logger.setLevel(level)
    finally:
        if started:
            ray.shutdown()


def _collect(dataset: Any, writer: ShardWriter, progress: bool) -> None:
    """Write each shard as its result arrives; progress: images done / total, images/s, failures."""
    dim = int(writer.settings["dim"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = sum(len(writer.shards[n]) for n in writer.records)
        bar = tqdm(total=len(writer.names), initial=done, desc="extract (ray)", unit="img", dynamic_ncols=True)
        for message in writer.messages:
            bar.write(message)
    failures = 0
    try:
        for row in dataset.iter_rows():
            number = int(row["shard"])
            failed = json.loads(row["failed"])
            vectors = np.frombuffer(row["vectors"], dtype=_DTYPE).reshape(-1, dim)
            writer.write_shard(number, vectors, failed, kernels=json.loads(row["kernels"]))
            failures += len(failed)
            if bar is not None:
                for name, reason in failed.items():
                    bar.write(f"skipped {name}: {reason}")
                bar.set_postfix(failed=failures, refresh=False)
                bar.update(len(writer.shards[number]))
    finally:
        if bar is not None:
            bar.close()
