"""Extraction on a real local Ray (one instance for the session): same bytes as the single-process
extractor, bad images named and skipped, a killed run resumed, shards read back memory-mapped,
and the refusals (unreachable address, a folder of other settings, a missing or corrupt shard)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clustermac[ray]')")

import clustermac  # noqa: E402
from clustermac.backbones import Backbone  # noqa: E402
from clustermac.cli import main  # noqa: E402
from clustermac.descriptors import DEFAULT_METHOD  # noqa: E402
from clustermac.distributed import ShardedArray, extract_folder_ray  # noqa: E402
from clustermac.file_info import describe_file  # noqa: E402

BAD = "broken.jpg"


@pytest.fixture(scope="session")
def ray_address():
    """One real local Ray for the whole session (2 CPUs, ~100 MB object store, no dashboard)."""
    previous = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
    else:
        os.environ["RAY_USAGE_STATS_ENABLED"] = previous


class Collection:
    """Seven small photos and a corrupt file, a tiny 512-d backbone, and a whitening learned on them."""

    def __init__(self, root: Path, write_photos, pooling_model) -> None:
        self.root = root
        self.folder = root / "photos"
        write_photos(self.folder, n=7, size=96)
        (self.folder / BAD).write_bytes(b"\xff\xd8 this is not a JPEG")
        self.onnx, _, _ = pooling_model(root / "backbone.onnx", 512, 16, seed=1)
        self.whitening = root / "whitening.npz"
        extractor = self.extractor()
        extractor.fit_whitening([str(p) for p in sorted(self.folder.glob("photo*.jpg"))], progress=False)
        extractor.save_whitening(self.whitening)

    def extractor(self, method: str = DEFAULT_METHOD) -> clustermac.Extractor:
        ex = clustermac.Extractor(Backbone(self.onnx, preset="vgg16", n_threads=1), method, max_size=96)
        # The whitening fits only the settings it was learned with (the default method's, as the CLI's).
        return ex.load_whitening(self.whitening) if self.whitening.exists() and method == DEFAULT_METHOD else ex

    def cli_options(self) -> list[str]:
        return ["--backbone", "vgg16", "--onnx", str(self.onnx), "--whitening", str(self.whitening), "--max-size", "96"]

    def single_process(self) -> tuple[np.ndarray, dict]:
        out = self.root / "single" / "desc.npy"
        assert main(["extract", str(self.folder), "--out", str(out), "--quiet", *self.cli_options()]) == 0
        vectors, manifest = clustermac.load_descriptors(out)
        return np.asarray(vectors), manifest


@pytest.fixture
def collection(tmp_path, write_photos, pooling_model):
    return Collection(tmp_path, write_photos, pooling_model)


def _cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """The real `clustermac` command in its own session (so its whole process group can be killed),
    with the environment variables ``env`` (no crash point unless given there)."""
    environment = {k: v for k, v in os.environ.items() if k != "CLUSTERMAC_CRASH_AT"}
    environment.update(RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    code = "import sys; from clustermac.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group, whatever it left behind
        except ProcessLookupError:
            pass
    return process.returncode, stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ray_extraction_equals_single_process_and_names_the_bad_file(ray_address, collection):
    reference, single = collection.single_process()
    out = collection.root / "shards"
    manifest = extract_folder_ray(collection.extractor(), collection.folder, out, shard_size=3, progress=False)
    assert manifest["images"] == single["images"] and len(manifest["images"]) == 7, manifest["failed"]
    assert set(manifest["failed"]) == set(single["failed"]) == {BAD}
    assert manifest["settings"] == single["settings"] and manifest["settings"]["whitened"]
    # The workers' code is recorded as the single process's (same machine: one record).
    assert manifest["kernels"] == single["kernels"] == [clustermac.kernel_record()]
    described = describe_file(out)  # `clustermac info` on the shard folder
    assert described["kind"] == "descriptor shards" and described["count"] == 7 and described["same_kernels_here"]
    assert [s["file"] for s in manifest["shards"]] == ["shard_000000.npy", "shard_000001.npy", "shard_000002.npy"]

    vectors, loaded = clustermac.load_descriptors(out)
    assert loaded == manifest
    assert isinstance(vectors, ShardedArray) and vectors.shape == reference.shape
    assert all(isinstance(part, np.memmap) for part in vectors.parts)
    assert np.asarray(vectors).tobytes() == reference.tobytes()  # same order, same bits
    np.testing.assert_array_equal(vectors[[6, 0, 3]], reference[[6, 0, 3]])

    # `clustermac index` takes the shard folder as it takes desc.npy.
    assert main(["index", str(out), "--out", str(collection.root / "index")]) == 0
    index = clustermac.Index.load(collection.root / "index")
    assert index.names == single["images"]
    assert int(np.ravel(index.search(reference[4], k=1)[1])[0]) == 4


def test_killed_run_resumes_and_redoes_only_unfinished_shards(ray_address, collection):
    reference, single = collection.single_process()
    out = collection.root / "shards"
    args = ["extract", str(collection.folder), "--out", str(out), "--ray-address", ray_address, "--shard-size", "2"]
    args += ["--quiet", *collection.cli_options()]
    # The driver is killed (SIGKILL, as kill -9) right after its second shard is on disk.
    code, stderr = _finish(_cli(args, {"CLUSTERMAC_CRASH_AT": "ray.shard_written:2"}))
    assert code == -signal.SIGKILL, stderr
    records = sorted(out.glob("shard_*.json"))
    assert len(records) == 2 and not (out / "manifest.json").exists()
    with pytest.raises(clustermac.CorruptFileError, match="unfinished run"):
        clustermac.load_descriptors(out)
    kept = {p.name: p.stat().st_ino for p in out.glob("shard_*.npy")}

    code, stderr = _finish(_cli(args))
    assert code == 0, stderr
    assert "skipped broken.jpg" in stderr
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # finished shards were not redone
    vectors, manifest = clustermac.load_descriptors(out)
    assert len(manifest["shards"]) == 4 and manifest["images"] == single["images"]
    assert np.asarray(vectors).tobytes() == reference.tobytes()


def _extractor_actors() -> dict[str, int]:
    """The extraction actors the cluster knows (GCS's actor table; Ray's internal reader, as the
    state API needs the dashboard): actor id -> number of restarts."""
    from ray._private.state import actors

    table = actors().values()
    return {a["ActorID"]: int(a["NumRestarts"]) for a in table if "_ShardExtractor" in a["ActorClassName"]}


def test_a_worker_killed_mid_run_costs_only_its_shard(ray_address, collection):
    reference, single = collection.single_process()
    out = collection.root / "shards"
    listing = collection.folder / "images.txt"  # the input as a list file this time
    listing.write_text("# the photos\n" + "\n".join(single["images"] + [BAD]) + "\n\n")
    args = ["extract", str(listing), "--out", str(out), "--ray-address", ray_address, "--shard-size", "1"]
    # Every worker process is killed (SIGKILL) at its third shard; Ray restarts it and retries the shard.
    crash = {"CLUSTERMAC_CRASH_AT": "ray.worker_shard:3"}
    before = set(_extractor_actors())
    code, stderr = _finish(_cli([*args, "--quiet", *collection.cli_options()], crash))
    assert code == 0, stderr
    restarts = {key: count for key, count in _extractor_actors().items() if key not in before}
    assert restarts and sum(restarts.values()) >= 1  # the workers were killed, and restarted
    vectors, manifest = clustermac.load_descriptors(out)
    assert manifest["images"] == single["images"] and set(manifest["failed"]) == {BAD}
    assert np.asarray(vectors).tobytes() == reference.tobytes()


def test_worker_extractor_rebuilt_from_the_object_store_equals_the_drivers(ray_address, collection):
    from clustermac.descriptors.store import extract_rows
    from clustermac.distributed.ray_extract import _extractor_recipe, _ShardExtractor

    driver = collection.extractor()
    worker = _ShardExtractor([ray.put(_extractor_recipe(driver))], threads=1)
    assert worker.extractor.settings() == driver.settings() and worker.extractor.dim == driver.dim
    assert worker.extractor.backbone.name == driver.backbone.name and worker.extractor.backbone.n_threads == 1
    names = ["photo1.jpg", BAD, "photo3.jpg"]
    paths = [str(collection.folder / n) for n in names]
    batch = {"shard": np.array([5]), "images": np.array([json.dumps([paths, names])], dtype=object)}
    result = worker(batch)
    expected, failed = extract_rows(driver, paths, names)
    assert list(result["shard"]) == [5] and json.loads(result["failed"][0]) == failed and set(failed) == {BAD}
    assert result["vectors"][0] == expected[[0, 2]].tobytes()
    assert json.loads(result["kernels"][0]) == clustermac.kernel_record()


def test_the_drivers_simd_caps_reach_the_workers(ray_address, collection, monkeypatch):
    if clustermac._core.simd_level() == "scalar":
        pytest.skip("this CPU runs only the core's scalar level: no cap to pass on")
    # Set after this process chose its own level: only the workers, started with it, run capped.
    monkeypatch.setenv("CLUSTERMAC_NO_AVX2", "1")
    manifest = extract_folder_ray(collection.extractor(), collection.folder, collection.root / "capped", progress=False)
    assert [record["simd_level"] for record in manifest["kernels"]] == ["scalar"]
    assert clustermac.kernel_record()["simd_level"] != "scalar"


def test_unreachable_ray_address_is_named(tmp_path, collection):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "never"
    args = ["extract", str(collection.folder), "--out", str(out), "--ray-address", f"127.0.0.1:{port}"]
    code, stderr = _finish(_cli([*args, *collection.cli_options()]))
    assert code == 2
    assert f"127.0.0.1:{port}" in stderr and "no Ray cluster answers" in stderr
    assert not out.exists()


def test_folder_of_other_settings_and_missing_or_corrupt_shards_are_refused(ray_address, collection):
    out = collection.root / "shards"
    extract_folder_ray(collection.extractor(), collection.folder, out, shard_size=4, progress=False)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"shards: this shard folder was made with other extractor settings.*method"):
        extract_folder_ray(collection.extractor("mac"), collection.folder, out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard size 4, not 3"):
        extract_folder_ray(collection.extractor(), collection.folder, out, shard_size=3, progress=False)
    assert _snapshot(out) == before  # nothing written was touched

    shard = out / "shard_000001.npy"
    data = bytearray(before[shard.name])
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(clustermac.CorruptFileError, match="shard_000001.npy.*SHA-256"):
        clustermac.load_descriptors(out)
    shard.write_bytes(before[shard.name][:-8])
    with pytest.raises(clustermac.CorruptFileError, match="shard_000001.npy.*truncated"):
        clustermac.load_descriptors(out)
    shard.unlink()
    with pytest.raises(clustermac.CorruptFileError, match="shard_000001.npy.*missing"):
        clustermac.load_descriptors(out)
    manifest = json.loads(before["manifest.json"])
    manifest["shards"][0]["rows"] = "many"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(clustermac.CorruptFileError, match="shard_000000.npy: rows"):
        clustermac.load_descriptors(out)
    # The same command repairs it: the damaged shard is extracted again, the others are kept.
    repaired = extract_folder_ray(collection.extractor(), collection.folder, out, shard_size=4, progress=False)
    assert _snapshot(out) == before and repaired == json.loads(before["manifest.json"])


def test_list_file_input_is_checked(tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text("a.jpg\nb.jpg\na.jpg\n")
    assert main(["extract", str(listing), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert "images.txt: lists an image more than once" in capsys.readouterr().err
    listing.write_bytes(b"\xff\xfe\x00bad")
    assert main(["extract", str(listing), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert "cannot read the list of images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_addresses_are_checked():
    from clustermac.distributed.ray_extract import _probe

    with pytest.raises(ValueError, match="'nowhere': expected HOST:PORT"):
        _probe("nowhere")
    _probe("auto")  # resolved by Ray itself
    with pytest.raises(ValueError, match="shard_size"):
        extract_folder_ray(None, "photos", "out", shard_size=0)
    with pytest.raises(ValueError, match="workers"):
        extract_folder_ray(None, "photos", "out", workers=0)
