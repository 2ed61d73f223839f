"""`clustermac datasets download` against a real HTTP server on loopback, started here, serving
small synthetic archives in the real layouts (nothing leaves the machine)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pickle
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clustermac.bench import download
from clustermac.bench.dataset_sources import CATALOGUE, DatasetSource, RemoteFile
from clustermac.bench.datasets import load_classic, load_dataset
from clustermac.cli import main
from clustermac.errors import CorruptFileError

# --- the loopback host ------------------------------------------------------------------------


class Host:
    """What the test server serves and how it misbehaves, and what it was asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # path -> number of HTTP 500 answers still to give
        self.cut: dict[str, int] = {}  # path -> send only this many bytes once, then close
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: dict[str, int] = {}  # path -> body bytes sent in all
        self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    host: Host

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        host = self.host
        with host.lock:
            host.requests.append((self.path, self.headers.get("Range")))
            data = host.files.get(self.path)
            failing = host.fail.get(self.path, 0) > 0
            if failing:
                host.fail[self.path] -= 1
            cut = host.cut.pop(self.path, None)
        if data is None:
            self.send_error(404)
            return
        if failing:
            self.send_error(500)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not host.ignore_range:
            start = int(match[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut is not None:
            body = body[:cut]  # the promised length is not delivered: a connection cut mid-file
        self.wfile.write(body)
        with host.lock:
            host.sent[self.path] = host.sent.get(self.path, 0) + len(body)
        self.close_connection = True


@pytest.fixture
def host():
    state = Host()
    handler = type("BoundHandler", (Handler,), {"host": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# --- synthetic data in the real layouts -----------------------------------------------------


def jpeg(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize(size, Image.BILINEAR).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TOY_IMAGES = [f"all_souls_{i:06d}" for i in range(6)] + [f"radcliffe_camera_{i:06d}" for i in range(6)]
TOY_QUERIES = [("all_souls_1", 0, [1, 2], [3], [4]), ("radcliffe_camera_1", 6, [7, 8, 9], [], [10])]
TOY_BOX = (4.0, 4.0, 80.0, 56.0)


def toy_files() -> dict[str, bytes]:
    """The toy Oxford: images (Paris-like per-landmark folders), classic txt ground truth,
    the classic pickle and a revisited pickle."""
    images = {f"toy/{name.rsplit('_', 1)[0]}/{name}.jpg": jpeg(i) for i, name in enumerate(TOY_IMAGES)}
    images["toy/README"] = b"not an image"
    gt = {}
    classic, revisited = [], []
    for stem, query, good, ok, junk in TOY_QUERIES:
        gt[f"{stem}_query.txt"] = f"oxc1_{TOY_IMAGES[query]} {' '.join(str(v) for v in TOY_BOX)}\n".encode()
        for kind, indices in (("good", [query, *good]), ("ok", ok), ("junk", junk)):
            gt[f"{stem}_{kind}.txt"] = "".join(f"{TOY_IMAGES[i]}\n" for i in indices).encode()
        classic.append({"ok": [query, *good, *ok], "junk": junk, "bbx": list(TOY_BOX)})
        revisited.append({"easy": [query, *good], "hard": ok, "junk": junk, "bbx": list(TOY_BOX)})
    queries = [TOY_IMAGES[query] for _, query, *_ in TOY_QUERIES]
    return {
        "toy_images.tgz": tar_gz(images),
        "toy_gt.tgz": tar_gz(gt),
        "gnd_oxtoy.pkl": pickle.dumps({"imlist": TOY_IMAGES, "qimlist": queries, "gnd": classic}, protocol=2),
        "gnd_rtoy.pkl": pickle.dumps({"imlist": TOY_IMAGES, "qimlist": queries, "gnd": revisited}, protocol=2),
    }


def distractor_files(n_archives: int = 3, per_archive: int = 4) -> dict[str, bytes]:
    files, listed = {}, []
    for k in range(1, n_archives + 1):
        members = {f"{k}/{j}/d{k}_{j}.jpg": jpeg(100 * k + j, (32, 32)) for j in range(per_archive)}
        listed += list(members)
        files[f"toy1m.{k}.tar.gz"] = tar_gz(members)
    files["toy1m.txt"] = "".join(f"{name}\n" for name in listed).encode()
    return files


def toy_catalogue(url: str, sha256: dict[str, str] | None = None) -> dict[str, DatasetSource]:
    """The real catalogue's structure, on the loopback host, with its own counts."""

    def remote(name: str, kind: str) -> RemoteFile:
        return RemoteFile(name, (f"{url}/official/{name}",), kind, sha256=(sha256 or {}).get(name))

    images = remote("toy_images.tgz", "images")
    return {
        "oxtoy": DatasetSource(
            "oxtoy",
            (images, remote("toy_gt.tgz", "ground_truth"), remote("gnd_oxtoy.pkl", "pickle")),
            database_images=12,
            queries=2,
        ),
        "rtoy": DatasetSource("rtoy", (images, remote("gnd_rtoy.pkl", "pickle")), database_images=12, queries=2),
        "toy1m": DatasetSource(
            "toy1m",
            (remote("toy1m.txt", "list"), *(remote(f"toy1m.{k}.tar.gz", "distractors") for k in (1, 2, 3))),
            per_file=True,
        ),
    }


def serve(host: Host, files: dict[str, bytes], prefix: str = "official") -> None:
    for name, data in files.items():
        host.files[f"/{prefix}/{name}"] = data


def fetch(root: Path, name: str, catalogue, **options):
    options = {"progress": False, "backoff": 0.0, "retries": 0, **options}
    return download.download_dataset(name, root, catalogue=catalogue, **options)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- tests ------------------------------------------------------------------------------------


def test_complete_download_lays_out_what_the_loaders_read(host, tmp_path):
    files = toy_files()
    serve(host, files)
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    record = tmp_path / "checksums.json"
    result = fetch(root, "oxtoy", catalogue, record_checksums_to=record)
    assert result.complete and result.folder == root / "oxtoy"
    folder = root / "oxtoy"
    # Images flat in jpg/ (sub-folders and non-images of the archive dropped), txt files in gt/.
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == sorted(f"{n}.jpg" for n in TOY_IMAGES)
    assert (folder / "jpg" / "radcliffe_camera_000003.jpg").read_bytes() == jpeg(9)
    assert len(list((folder / "gt").glob("*.txt"))) == 4 * len(TOY_QUERIES)
    assert (folder / "gnd_oxtoy.pkl").read_bytes() == files["gnd_oxtoy.pkl"]
    # Both formats load, from ROOT (as `evaluate --data-root ROOT --dataset oxtoy`) and from the folder.
    dataset = load_dataset(root, "oxtoy")
    assert dataset.images == TOY_IMAGES and len(dataset.queries) == 2 and not dataset.has_revisited
    assert dataset.classic_gnd()[1]["ok"] == [6, 7, 8, 9]
    classic = load_classic(folder / "gt", folder / "jpg", "oxtoy")
    assert classic.classic_gnd() == dataset.classic_gnd() and classic.query_boxes == [TOY_BOX, TOY_BOX]
    # Nothing half-done is left: no .part, no archive, no staging folder.
    assert list((root / ".downloads").iterdir()) == []
    assert [p.name for p in root.iterdir() if re.match(r"\.oxtoy\.(tmp|old)-", p.name)] == []
    # The recorded checksums are the served bytes'.
    recorded = download.read_checksums(record)
    for name in ("toy_images.tgz", "toy_gt.tgz", "gnd_oxtoy.pkl"):
        assert recorded[name] == {"size": len(files[name]), "sha256": hashlib.sha256(files[name]).hexdigest()}
    # A second run finds it complete and asks the server nothing.
    count = len(host.requests)
    assert "complete already" in fetch(root, "oxtoy", catalogue).message and len(host.requests) == count
    # The revisited set shares the image archive: its images are taken from oxtoy, not downloaded again.
    assert fetch(root, "rtoy", catalogue).complete
    assert [path for path, _ in host.requests[count:]] == ["/official/gnd_rtoy.pkl"]
    revisited = load_dataset(root, "rtoy")
    assert revisited.has_revisited and revisited.revisited_gnd()[0]["easy"] == [0, 1, 2]
    assert (root / "rtoy" / "jpg" / "all_souls_000002.jpg").read_bytes() == jpeg(2)
    # A checksum file holds a later download to the recorded values.
    assert fetch(root, "oxtoy", catalogue, checksums=record, force=True).complete


def test_interrupted_download_resumes_with_only_the_remaining_bytes(host, tmp_path):
    files = toy_files()
    serve(host, files)
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    archive = "/official/toy_images.tgz"
    cut = len(files["toy_images.tgz"]) // 3
    host.cut[archive] = cut
    with pytest.raises(download.DownloadError, match=r"toy_images\.tgz.*connection"):
        fetch(root, "oxtoy", catalogue)
    part = root / ".downloads" / "toy_images.tgz.part"
    assert part.read_bytes() == files["toy_images.tgz"][:cut]
    assert not (root / "oxtoy").exists()  # nothing half-done in the final place
    # The next run asks for the rest only, and the file it assembles is the served one.
    result = fetch(root, "oxtoy", catalogue)
    assert result.complete
    ranges = [header for path, header in host.requests if path == archive]
    assert ranges == [None, f"bytes={cut}-"]
    assert host.sent[archive] == len(files["toy_images.tgz"])  # every byte sent once
    assert result.files["toy_images.tgz"]["sha256"] == hashlib.sha256(files["toy_images.tgz"]).hexdigest()
    # Within one run, a cut connection is retried from where it stopped.
    host.cut[archive] = 100
    path, values = download.fetch_file(
        catalogue["oxtoy"].files[0], tmp_path / "single", retries=2, backoff=0.0, progress=False
    )
    assert path.read_bytes() == files["toy_images.tgz"] and values["url"] == f"{host.url}{archive}"
    assert [h for p, h in host.requests if p == archive][-2:] == [None, "bytes=100-"]


def test_server_without_range_support_restarts_the_file_cleanly(host, tmp_path):
    files = toy_files()
    serve(host, files)
    host.ignore_range = True
    remote = toy_catalogue(host.url)["oxtoy"].files[0]
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "toy_images.tgz.part").write_bytes(b"\0" * 700)  # bytes a resume would keep
    path, _ = download.fetch_file(remote, folder, retries=0, backoff=0.0, progress=False)
    assert host.requests == [("/official/toy_images.tgz", "bytes=700-")]  # asked for, ignored (200)
    assert path.read_bytes() == files["toy_images.tgz"]
    assert not (folder / "toy_images.tgz.part").exists()


def test_a_failing_host_falls_back_to_the_next_mirror(host, tmp_path):
    files = toy_files()
    serve(host, files, prefix="good")
    for name in files:
        host.files[f"/flaky/{name}"] = files[name]
        host.fail[f"/flaky/{name}"] = 10**6  # HTTP 500 for ever
    catalogue = toy_catalogue(host.url)  # the official URLs are not served at all (404)
    root = tmp_path / "data"
    result = fetch(root, "oxtoy", catalogue, mirrors=[f"{host.url}/flaky/", f"{host.url}/good"], retries=1)
    assert result.complete and result.files["toy_gt.tgz"]["url"] == f"{host.url}/good/toy_gt.tgz"
    asked = [path for path, _ in host.requests if path.endswith("toy_images.tgz")]
    # Official first (404: no retry), then the flaky mirror (1 + 1 retry), then the good one.
    assert asked == [
        "/official/toy_images.tgz",
        "/flaky/toy_images.tgz",
        "/flaky/toy_images.tgz",
        "/good/toy_images.tgz",
    ]
    # When every host fails, the error names the file and what each host did.
    host.files.clear()
    with pytest.raises(download.DownloadError, match=r"gnd_rtoy\.pkl: no host.*official/gnd_rtoy\.pkl: HTTP 404"):
        fetch(root, "rtoy", catalogue, mirrors=[f"{host.url}/good"], force=True)
    with pytest.raises(ValueError, match="no host to try"):
        fetch(root, "rtoy", catalogue, official=False)
    with pytest.raises(ValueError, match="mirror: 'ftp://x' is not a URL prefix"):
        fetch(root, "rtoy", catalogue, mirrors=["ftp://x"])


def corrupt_gzip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("gzip", CorruptFileError, r"toy_images\.tgz: not a readable tar archive"),
        ("truncated", CorruptFileError, r"toy_images\.tgz: not a readable tar archive"),
        ("checksum", download.DownloadError, r"toy_images\.tgz: .*SHA-256 [0-9a-f]{64} differs"),
        ("missing image", CorruptFileError, r"do not fit together.*radcliffe_camera_000005"),
        ("query count", CorruptFileError, r"gnd_oxtoy\.pkl: 1 queries; expected 2"),
    ],
)
def test_a_corrupt_download_is_removed_and_the_previous_copy_kept(host, tmp_path, damage, error, message):
    files = toy_files()
    serve(host, files)
    root = tmp_path / "data"
    assert fetch(root, "oxtoy", toy_catalogue(host.url)).complete
    before = tree(root / "oxtoy")
    catalogue = toy_catalogue(host.url)
    archive = files["toy_images.tgz"]
    if damage == "gzip":
        archive = corrupt_gzip(archive)
    elif damage == "truncated":
        archive = archive[: len(archive) - 200]
    elif damage == "checksum":
        catalogue = toy_catalogue(host.url, sha256={"toy_images.tgz": "0" * 64})
    elif damage == "query count":  # the published counts are checked
        content = pickle.loads(files["gnd_oxtoy.pkl"])
        content.update(qimlist=content["qimlist"][:1], gnd=content["gnd"][:1])
        host.files["/official/gnd_oxtoy.pkl"] = pickle.dumps(content)
    else:  # a well-formed archive that lacks an image the ground truth names
        with tarfile.open(fileobj=io.BytesIO(archive)) as source:
            members = {m.name: source.extractfile(m).read() for m in source if m.isfile()}
        del members["toy/radcliffe_camera/radcliffe_camera_000005.jpg"]
        archive = tar_gz(members)
    host.files["/official/toy_images.tgz"] = archive
    with pytest.raises(error, match=message):
        fetch(root, "oxtoy", catalogue, force=True)
    # The bad bytes and the staging folder are gone; the good copy is untouched and still loads.
    assert sorted(p.name for p in (root / ".downloads").iterdir()) == []
    assert [p.name for p in root.iterdir() if re.match(r"\.oxtoy\.(tmp|old)-", p.name)] == []
    assert tree(root / "oxtoy") == before
    assert load_dataset(root, "oxtoy").images == TOY_IMAGES


def test_distractors_are_published_archive_by_archive(host, tmp_path, capsys):
    files = distractor_files()
    serve(host, files)
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    listed = files["toy1m.txt"].decode().split()
    with pytest.raises(ValueError, match="limit"):
        fetch(root, "oxtoy", catalogue, limit=1)
    first = fetch(root, "toy1m", catalogue, limit=2)
    folder = root / "toy1m"
    assert not first.complete and "8 of 12 listed images (2 of 3 archives)" in first.message
    assert (folder / "downloaded.txt").read_text().split() == listed[:8]
    assert (folder / "jpg" / "2" / "3" / "d2_3.jpg").read_bytes() == jpeg(203, (32, 32))
    status = {row["name"]: row for row in download.dataset_status(root, catalogue)}
    assert status["toy1m"]["state"] == "incomplete" and "2 of 3 archives" in status["toy1m"]["detail"]
    assert status["oxtoy"]["state"] == "absent"
    # An archive with an image the list does not name is refused; the archives before stay.
    host.files["/official/toy1m.3.tar.gz"] = tar_gz({"3/x/unlisted.jpg": jpeg(1, (32, 32))})
    with pytest.raises(CorruptFileError, match=r"toy1m\.3\.tar\.gz: holds 1 image\(s\) not in toy1m\.txt"):
        fetch(root, "toy1m", catalogue)
    assert not (folder / "jpg" / "3").exists() and (folder / "downloaded.txt").read_text().split() == listed[:8]
    # The rest, resumed: only the missing archive is fetched.
    host.files["/official/toy1m.3.tar.gz"] = files["toy1m.3.tar.gz"]
    count = len(host.requests)
    done = fetch(root, "toy1m", catalogue)
    assert done.complete and [p for p, _ in host.requests[count:]] == ["/official/toy1m.3.tar.gz"]
    assert (folder / "downloaded.txt").read_text().split() == listed
    assert sum(1 for p in (folder / "jpg").rglob("*.jpg")) == 12


def test_unpacked_datasets_evaluate_end_to_end(host, tmp_path, capsys, pooling_model, reference_classic_map):
    serve(host, toy_files())
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    fetch(root, "oxtoy", catalogue)
    fetch(root, "rtoy", catalogue)
    white = tmp_path / "white"
    white.mkdir()
    for i in range(6):
        (white / f"w{i}.jpg").write_bytes(jpeg(50 + i))
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16", weights_id="tiny")
    for name in ("oxtoy", "rtoy"):
        out = tmp_path / f"eval-{name}"
        arguments = ["evaluate", "--dataset", name, "--data-root", str(root), "--whitening-root", str(white)]
        arguments += ["--backbone", str(model), "--methods", "mac", "rmac", "--out", str(out), "--quiet"]
        assert main(arguments) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["dataset"] == name and [r["label"] for r in results["rows"]] == ["mac, crop I", "rmac, crop I"]
        ranks = np.load(out / "ranks.npz")
        for row in results["rows"]:
            r = ranks[row["label"].replace(" ", "_").replace(",", "")]
            assert r.shape == (len(TOY_IMAGES), len(TOY_QUERIES))
            # The reported mAP is the mAP of the reported ranking against the downloaded ground truth.
            expected, _ = reference_classic_map(r, root / "rtoy" / "gnd_rtoy.pkl")
            assert row["mAP"] == pytest.approx(expected, abs=1e-9)
            assert ("Hard" in row) == (name == "rtoy")


def test_cli_downloads_the_real_catalogue_layout_from_a_mirror(host, tmp_path, capsys, monkeypatch):
    """The real catalogue entry (file names, kinds, published counts) through the command line,
    from a mirror on loopback holding synthetic files of the published sizes (4,993 images,
    70 queries): the official hosts are never contacted (--mirror-only)."""
    monkeypatch.setenv(download.BACKOFF_ENVIRONMENT_VARIABLE, "0")
    source = CATALOGUE["roxford5k"]
    assert [f.name for f in source.files] == ["oxbuild_images-v1.tgz", "gnd_roxford5k.pkl"]
    picture = jpeg(0, (16, 16))
    names = [f"oxford_{i:06d}" for i in range(source.database_images + 3)]
    queries = names[: source.queries]
    gnd = [{"bbx": [0.0, 0.0, 8.0, 8.0], "easy": [q], "hard": [], "junk": []} for q in range(source.queries)]
    host.files["/m/oxbuild_images-v1.tgz"] = tar_gz({f"oxbuild_images/{n}.jpg": picture for n in names})
    imlist = names[: source.database_images]
    host.files["/m/gnd_roxford5k.pkl"] = pickle.dumps({"imlist": imlist, "qimlist": queries, "gnd": gnd})
    root = tmp_path / "data"
    command = ["datasets", "download", "roxford5k", "--root", str(root), "--mirror", f"{host.url}/m", "--quiet"]
    record = tmp_path / "sums.json"
    assert main([*command, "--mirror-only", "--record-checksums", str(record)]) == 0
    assert f"{root / 'roxford5k'}: {len(names)} images" in capsys.readouterr().out
    assert all(path.startswith("/m/") for path, _ in host.requests)
    assert set(download.read_checksums(record)) == {"oxbuild_images-v1.tgz", "gnd_roxford5k.pkl"}
    assert len(load_dataset(root, "roxford5k").images) == source.database_images
    assert main(["datasets", "list", "--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"roxford5k\s+complete\s+[\d.]+ [KM]iB\s+4996 images", table)
    assert re.search(r"oxford5k\s+absent", table)
    # A folder the command did not make is not replaced without --force.
    (root / "rparis6k").mkdir()
    assert main(["datasets", "download", "rparis6k", "--root", str(root), "--mirror-only", "--mirror", "http://x"]) == 2
    assert "not made by `clustermac datasets download`" in capsys.readouterr().err


def test_evaluate_names_the_download_command(tmp_path, capsys):
    missing = tmp_path / "data" / "roxford5k"
    arguments = ["evaluate", "--dataset", "roxford5k", "--data-root", str(missing), "--whitening-root", str(tmp_path)]
    assert main(arguments) == 2
    assert f"clustermac datasets download roxford5k --root {tmp_path / 'data'}" in capsys.readouterr().err


def test_bad_checksum_files_are_named(tmp_path):
    path = tmp_path / "sums.json"
    path.write_text(json.dumps({"format": "clustermac-checksums", "files": {"a.tgz": {"size": 3, "sha256": "xyz"}}}))
    with pytest.raises(CorruptFileError, match=r"sums\.json: entry 'a\.tgz'"):
        download.read_checksums(path)
    path.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="not a checksum file"):
        download.read_checksums(path)


def test_range_edge_cases_sizes_and_kept_files(host, tmp_path):
    files = toy_files()
    serve(host, files)
    data = files["toy_gt.tgz"]
    remote = RemoteFile("toy_gt.tgz", (f"{host.url}/official/toy_gt.tgz",), "ground_truth", size=len(data))
    folder = tmp_path / "downloads"
    folder.mkdir()
    # A partial file as long as the whole: nothing more to ask; checked and kept.
    (folder / "toy_gt.tgz.part").write_bytes(data)
    path, values = download.fetch_file(remote, folder, retries=0, backoff=0.0, progress=False)
    assert host.requests == [] and path.read_bytes() == data and values["size"] == len(data)
    # A file already in place is checked and kept (url None): no request.
    assert download.fetch_file(remote, folder, progress=False)[1]["url"] is None and host.requests == []
    path.unlink()
    # A partial file longer than the server's copy (no size known): HTTP 416, then a clean restart.
    unsized = RemoteFile("toy_gt.tgz", remote.urls, "ground_truth")
    (folder / "toy_gt.tgz.part").write_bytes(data + b"extra")
    path, _ = download.fetch_file(unsized, folder, retries=1, backoff=0.0, progress=False)
    assert path.read_bytes() == data
    assert [h for _, h in host.requests] == [f"bytes={len(data) + 5}-", None]
    # A server copy of another size than published is refused, and its bytes are not kept.
    wrong = RemoteFile("toy_gt.tgz", remote.urls, "ground_truth", size=len(data) + 1)
    expected = rf"toy_gt\.tgz: .*has {len(data)} bytes; expected {len(data) + 1}"
    with pytest.raises(download.DownloadError, match=expected):
        download.fetch_file(wrong, tmp_path / "other", retries=0, progress=False)
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(ValueError, match="retries"):
        download.fetch_file(remote, folder, retries=-1)


@pytest.mark.parametrize(
    "members, flat, message",
    [
        ({"a/x.jpg": b"1", "b/x.jpg": b"2"}, True, "two files unpack to x.jpg"),
        ({"../evil.jpg": b"1"}, False, "points outside"),
        ({"/abs/evil.jpg": b"1"}, False, "points outside"),
    ],
)
def test_unpack_refuses_ambiguous_or_escaping_members(tmp_path, members, flat, message):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(members))
    with pytest.raises(CorruptFileError, match=rf"bad\.tar\.gz: .*{message}"):
        download.unpack_archive(archive, tmp_path / "out", flat=flat, suffixes=(".jpg",))
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs/evil.jpg").exists()


def test_an_interrupted_swap_is_undone_on_the_next_run(host, tmp_path):
    serve(host, toy_files())
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    fetch(root, "oxtoy", catalogue)
    before = tree(root / "oxtoy")
    # As if killed between the two renames: the good folder set aside, the new one not yet in place.
    (root / "oxtoy").rename(root / ".oxtoy.old-deadbeef")
    (root / ".oxtoy.tmp-cafecafe").mkdir()
    assert "complete already" in fetch(root, "oxtoy", catalogue).message
    assert tree(root / "oxtoy") == before and sorted(p.name for p in root.iterdir() if "tmp-" in p.name) == []


def test_files_placed_by_hand_are_used_without_a_host(tmp_path):
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    for name, data in toy_files().items():
        (root / ".downloads" / name).write_bytes(data)
    # No host at all: the catalogue's URLs point at a closed port, and the official hosts are off.
    catalogue = toy_catalogue("http://127.0.0.1:9")
    assert fetch(root, "oxtoy", catalogue, official=False).complete
    assert load_dataset(root, "oxtoy").images == TOY_IMAGES


class _Call:
    """Pickles as a call of os.getcwd: what a hostile ground-truth file could hold."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_ground_truth_pickles_with_numpy_arrays_are_laid_out_as_plain_data(host, tmp_path):
    files = toy_files()
    content = pickle.loads(files["gnd_rtoy.pkl"])
    for entry in content["gnd"]:  # as files written from NumPy hold them
        entry.update({key: np.asarray(entry[key], dtype=np.int64) for key in ("easy", "hard", "junk")})
        entry["bbx"] = np.asarray(entry["bbx"], dtype=np.float64)
    # Written by NumPy 1 (its module names), as an older file would be.
    files["gnd_rtoy.pkl"] = pickle.dumps(content, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in files["gnd_rtoy.pkl"]
    serve(host, files)
    catalogue = toy_catalogue(host.url)
    root = tmp_path / "data"
    assert fetch(root, "rtoy", catalogue).complete
    written = (root / "rtoy" / "gnd_rtoy.pkl").read_bytes()
    assert b"numpy" not in written
    revisited = load_dataset(root, "rtoy")
    assert revisited.revisited_gnd()[1] == {"easy": [6, 7, 8, 9], "hard": [], "junk": [10], "bbx": TOY_BOX}
    # Anything else a pickle names is refused, and the file is named.
    host.files["/official/gnd_rtoy.pkl"] = pickle.dumps({"imlist": _Call()})
    with pytest.raises(CorruptFileError, match=r"gnd_rtoy\.pkl: not a readable ground-truth pickle .*refused.*getcwd"):
        fetch(root, "rtoy", catalogue, force=True)
    host.files["/official/gnd_rtoy.pkl"] = pickle.dumps({"imlist": np.array(["a", "b"])})
    with pytest.raises(CorruptFileError, match=r"gnd_rtoy\.pkl: holds a NumPy array of dtype <U1"):
        fetch(root, "rtoy", catalogue, force=True)
    assert load_dataset(root, "rtoy").images == TOY_IMAGES  # the good copy stays
