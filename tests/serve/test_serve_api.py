"""The search server's HTTP API, through the real Starlette app (TestClient), on a real index."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("multipart")

with warnings.catch_warnings():  # Starlette asks for httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from clustermac.kernels import kernel_record
from clustermac.search import Index
from clustermac.serve.app import Lane, allowed_hosts, create_app

pytestmark = pytest.mark.network  # runs the embedded backbone

BASE = "http://127.0.0.1:8000"
HTML_NAME = "<img src=x onerror=alert(1)>.jpg"


def make_client(index_path, **options) -> TestClient:
    options.setdefault("reload_interval", 0)
    return TestClient(create_app(index_path, host="127.0.0.1", port=8000, **options), base_url=BASE)


@pytest.fixture(scope="module")
def client(serve_index):
    index, _ = serve_index
    with make_client(index, max_k=6) as test_client:
        yield test_client


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/jpeg")}


def search(client, files=None, **fields):
    return client.post("/api/search", files=files, data={k: str(v) for k, v in fields.items()})


# ---------------------------------------------------------------------- page, health, info
def test_healthz_and_info_describe_the_index(client):
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["images"] == 10 and body["rerank"] is True
    assert body["method"] == "clustermac-box" and body["max_k"] == 6
    info = client.get("/api/info").json()
    assert info["version"] == body["version"]
    # Built by `clustermac index` on this machine: one record, this process's code.
    assert info["kernels"] == [kernel_record()] and info["same_kernels"] is True


def test_an_index_made_by_other_code_is_said_at_start(serve_index, tmp_path, caplog):
    index_path, _ = serve_index
    index = Index.load(index_path)
    other = {**kernel_record(), "onnxruntime": "0.0.1"}  # as an index built elsewhere records it
    index.save(tmp_path / "elsewhere", info={**index.info, "kernels": [other]})
    with caplog.at_level("WARNING", logger="clustermac.serve"), make_client(tmp_path / "elsewhere") as elsewhere:
        info = elsewhere.get("/api/info").json()
    assert info["kernels"] == [other] and info["same_kernels"] is False
    assert "computed by other code than this server runs" in caplog.text


def test_the_page_and_its_assets_are_served_locally_without_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    texts = [page.text] + [client.get(f"/static/{name}").text for name in ("app.js", "style.css")]
    for text in texts:
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert "/static/app.js" in page.text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


# ---------------------------------------------------------------------- search
def test_an_uploaded_database_photo_finds_itself_first(client, serve_index):
    _, photos = serve_index
    answer = search(client, upload(photos / "photo3.jpg"), k=4)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    assert body["results"][0]["name"] == "photo3.jpg" and body["results"][0]["score"] > 0.99
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert {"extract", "search", "total", "server"} <= set(body["timing_ms"])
    assert all("box" not in r for r in body["results"])


def test_a_search_by_name_matches_the_same_upload(client, serve_index):
    _, photos = serve_index
    by_name = search(client, name="photo5.jpg", k=5, box="10,12,150,120").json()["results"]
    by_upload = search(client, upload(photos / "photo5.jpg"), k=5, box="10,12,150,120").json()["results"]
    assert by_name == by_upload
    # photo5 is a larger copy of photo0's picture, as is the image link-out.jpg points to: both
    # come right after itself.
    whole = [r["name"] for r in search(client, name="photo5.jpg", k=3).json()["results"]]
    assert whole[0] == "photo5.jpg" and set(whole[1:]) == {"photo0.jpg", "link-out.jpg"}


@pytest.mark.parametrize("options", [{"crop": "activations"}, {"qe": "aqe"}, {"qe": "alpha"}, {"crop": "image"}])
def test_search_options_give_ranked_results(client, options):
    body = search(client, name="photo2.jpg", k=3, box="5,5,120,100", **options).json()
    assert len(body["results"]) == 3 and body["results"][0]["rank"] == 1


def test_query_expansion_changes_the_query(client):
    plain = search(client, name="photo1.jpg", k=6).json()["results"]
    expanded = search(client, name="photo1.jpg", k=6, qe="aqe").json()["results"]
    assert [r["score"] for r in plain] != [r["score"] for r in expanded]


def test_reranking_returns_aml_boxes_inside_each_result(client, serve_index):
    _, photos = serve_index
    body = search(client, upload(photos / "photo2.jpg"), k=5, box="20,10,140,110", rerank=1, qe="aqe").json()
    assert len(body["results"]) == 5 and "rerank" in body["timing_ms"]
    boxed = [result for result in body["results"] if result["name"] != "link-out.jpg"]
    assert len(boxed) >= 4
    # link-out.jpg (a link out of the root) is ranked like any image, but never opened: no box.
    assert all("box" not in result for result in body["results"] if result not in boxed)
    for result in boxed:
        x1, y1, x2, y2 = result["box"]
        with Image.open(photos / result["name"]) as image:
            width, height = image.size
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (result, width, height)


def test_the_query_cluster_map_comes_as_a_png_data_url(client):
    body = search(client, name="photo4.jpg", k=1, clusters=1).json()
    prefix = "data:image/png;base64,"
    assert body["query_clusters"].startswith(prefix)
    import base64

    figure = Image.open(io.BytesIO(base64.b64decode(body["query_clusters"][len(prefix) :])))
    assert figure.width > 2 * figure.height  # three panels side by side


def test_k_is_capped(client):
    assert len(search(client, name="photo1.jpg", k=1000).json()["results"]) == 6


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"box": "1,2,3"}, 400, "box"),
        ({"box": "a,b,c,d"}, 400, "box"),
        ({"box": "10,10,5,50"}, 400, "empty"),
        ({"box": "nan,1,5,5"}, 400, "box"),
        ({"box": "1,2,5000,40"}, 400, "outside the image"),
        ({"k": "0"}, 400, "k"),
        ({"k": "many"}, 400, "k"),
        ({"crop": "both"}, 400, "crop"),
        ({"qe": "dba"}, 400, "qe"),
        ({"rerank": "2"}, 400, "rerank"),
        ({"rerank": "1", "qe": "alpha"}, 400, "alpha"),
    ],
)
def test_bad_search_options_are_refused_with_a_message(client, fields, status, words):
    answer = search(client, name="photo1.jpg", **fields)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_bad_queries_are_refused_with_a_message(client, serve_index, tmp_path):
    _, photos = serve_index
    cases = [
        (search(client, name="nothere.jpg"), 404, "not in the index"),
        (search(client, name="../outside/photo0.jpg"), 403, "'..'"),
        (search(client, upload(photos / "photo1.jpg"), name="photo1.jpg"), 400, "either"),
        (search(client), 400, "either"),
        (search(client, {"image": ("notes.jpg", b"these are not pixels", "image/jpeg")}), 415, "not an image"),
        (search(client, {"image": ("empty.jpg", b"", "image/jpeg")}), 400, "empty"),
        (client.post("/api/search", content=b"{}", headers={"content-type": "application/json"}), 400, "either"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, answer.text
        assert words in answer.json()["error"], answer.text


def test_oversized_uploads_are_refused(serve_index):
    index, photos = serve_index
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 100_000
    with make_client(index, max_upload_bytes=100_000, max_pixels=20_000) as small:
        answer = search(small, {"image": ("big.png", big.getvalue(), "image/png")})
        assert answer.status_code == 413 and "larger than" in answer.json()["error"]
        # Under the byte cap but over the pixel cap: refused from the header, before decoding.
        answer = search(small, upload(photos / "photo1.jpg"))
        assert answer.status_code == 413 and "pixels" in answer.json()["error"]
        # A streamed body with no Content-Length is cut off at the cap too.
        chunks = (big.getvalue()[i : i + 8192] for i in range(0, len(big.getvalue()), 8192))
        answer = small.post("/api/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
        assert answer.status_code == 413


# ---------------------------------------------------------------------- images and cluster maps
def test_image_listing_pages_and_prefix(client):
    everything = client.get("/api/images", params={"limit": 500}).json()
    assert everything["total"] == 10 and len(everything["names"]) == 10 and everything["limit"] == 200
    page = client.get("/api/images", params={"offset": 2, "limit": 3}).json()
    assert page["names"] == everything["names"][2:5]
    prefixed = client.get("/api/images", params={"prefix": "photo"}).json()
    assert prefixed["total"] == 8 and all(n.startswith("photo") for n in prefixed["names"])
    assert HTML_NAME in everything["names"]
    for bad in ({"offset": "-1"}, {"limit": "0"}, {"limit": "x"}):
        answer = client.get("/api/images", params=bad)
        assert answer.status_code == 400 and list(bad)[0] in answer.json()["error"]


def test_images_and_thumbnails(client, serve_index):
    _, photos = serve_index
    full = client.get("/api/images/photo6.jpg")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    with Image.open(photos / "photo6.jpg") as original:
        assert Image.open(io.BytesIO(full.content)).size == original.size
    thumbnail = client.get("/api/images/photo6.jpg", params={"size": 64})
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) == 64
    assert client.get("/api/images/photo6.jpg", params={"size": 64}).content == thumbnail.content
    encoded = "/api/images/" + "".join(f"%{b:02X}" for b in HTML_NAME.encode())
    assert client.get(encoded).status_code == 200
    assert client.get("/api/images/photo6.jpg", params={"size": "big"}).status_code == 400


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/images/%2E%2E/outside/photo0.jpg", 403),
        ("/api/images/..%2F..%2Fetc%2Fpasswd", 403),
        ("/api/images/%2Fetc%2Fpasswd", 403),
        ("/api/images/link-out.jpg", 403),  # in the index, but a symbolic link out of the root
        ("/api/images/missing.jpg", 404),
        ("/api/clusters/%2E%2E/outside/photo0.jpg", 403),
        ("/api/clusters/link-out.jpg", 403),
        ("/api/clusters/missing.jpg", 404),
    ],
)
def test_names_never_reach_outside_the_image_root(client, path, status):
    answer = client.get(path)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.json()["error"]


def test_cluster_map_of_an_indexed_image(client):
    answer = client.get("/api/clusters/photo0.jpg")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    figure = Image.open(io.BytesIO(answer.content))
    assert figure.width > 2 * figure.height


# ---------------------------------------------------------------------- Host and Origin
def test_host_and_origin_headers_are_checked(client, serve_index):
    assert client.get("/healthz", headers={"host": "evil.example:8000"}).status_code == 403  # DNS rebinding
    assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
    refused = search(client, name="photo1.jpg", k=1)
    assert refused.status_code == 200
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        answer = client.post("/api/search", data={"name": "photo1.jpg"}, headers={"origin": origin})
        assert answer.status_code == 403 and "Origin" in answer.json()["error"]
    assert client.post("/api/reload", headers={"origin": "http://evil.example"}).status_code == 403
    same = client.post("/api/search", data={"name": "photo1.jpg"}, headers={"origin": BASE})
    assert same.status_code == 200
    cross = client.get("/api/images", headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    index, _ = serve_index
    with make_client(index, allow_origins=["http://intranet.example"], allow_hosts=["search.example"]) as other:
        answer = other.post("/api/search", data={"name": "photo1.jpg"}, headers={"origin": "http://intranet.example"})
        assert answer.status_code == 200
        assert other.get("/healthz", headers={"host": "search.example"}).status_code == 200


def test_allowed_hosts_follow_the_address():
    assert allowed_hosts("127.0.0.1", 8000) == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    assert "192.168.1.5:80" in allowed_hosts("192.168.1.5", 80) and "192.168.1.5" in allowed_hosts("192.168.1.5", 80)
    assert "localhost:8000" not in allowed_hosts("192.168.1.5", 8000)


# ---------------------------------------------------------------------- load
def test_a_full_queue_answers_503_with_retry_after(serve_index):
    index, _ = serve_index
    with make_client(index, workers=1, queue_size=0) as busy:
        release = threading.Event()
        blocker = busy.app.state.search_lane.submit(release.wait, 30)
        try:
            answer = search(busy, name="photo1.jpg", k=1)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert "busy" in answer.json()["error"]
        finally:
            release.set()
            blocker.result(timeout=30)
        assert search(busy, name="photo1.jpg", k=1).status_code == 200


def test_a_lane_bounds_what_it_accepts():
    lane = Lane(1, 1, "test")
    release = threading.Event()
    first, second = lane.submit(release.wait, 30), lane.submit(release.wait, 30)
    with pytest.raises(RuntimeError, match="busy"):
        lane.submit(release.wait, 30)
    release.set()
    first.result(timeout=30), second.result(timeout=30)
    assert lane.submit(lambda: 7).result(timeout=30) == 7
    lane.shutdown()
    with pytest.raises(ValueError, match="workers"):
        Lane(0, 1, "bad")


# ---------------------------------------------------------------------- reload
def _republish(source: Path, index_folder: Path, rows: int, **info_changes) -> None:
    """Publish at ``index_folder`` a new version of the index ``source`` with its first ``rows``
    images (and no store)."""
    old = Index.load(source, mmap=False)
    new = Index(old.dim)
    new.add(old.vectors(np.arange(rows)), old.names[:rows])
    new.save(index_folder, info={**old.info, "feature_map_store": None, **info_changes})


def test_reload_endpoint_and_watch_pick_up_a_new_version(serve_index, tmp_path):
    index, _ = serve_index
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    with make_client(copy) as served:
        assert served.get("/healthz").json()["images"] == 10
        _republish(index, copy, 4)
        answer = served.post("/api/reload")
        assert answer.status_code == 200 and answer.json()["images"] == 4 and answer.json()["rerank"] is False
        assert search(served, name="photo1.jpg", rerank=1).status_code == 400
        # A new version that does not load (its whitening record no longer matches) is refused;
        # the old one keeps serving.
        whitening = dict(Index.load(copy).info["whitening"], sha256="0" * 64)
        _republish(index, copy, 3, whitening=whitening)
        answer = served.post("/api/reload")
        assert answer.status_code == 400 and "whitening" in answer.json()["error"]
        assert served.get("/healthz").json()["images"] == 4
    _republish(index, copy, 5)
    with make_client(copy, reload_interval=0.1) as watched:  # the lifespan starts the watcher
        assert watched.get("/healthz").json()["images"] == 5
        _republish(index, copy, 2)
        deadline = time.monotonic() + 30
        while watched.get("/healthz").json()["images"] != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watched.get("/healthz").json()["images"] == 2


def test_the_index_records_the_query_setup(serve_index):
    index, photos = serve_index
    info = json.loads((index / (index / "CURRENT").read_text().strip() / "clustermac.json").read_text())
    assert info["image_root"] == str(photos.resolve())
    for key in ("whitening", "feature_map_store"):
        assert set(info[key]) == {"path", "size", "sha256"} and Path(info[key]["path"]).is_file()
    assert info["backbone"]["onnx"] is None


# ---------------------------------------------------------------------- the command
def test_clustermac_serve_starts_a_real_server(serve_index):
    import socket
    import subprocess
    import sys
    import urllib.request

    from clustermac import serve

    assert serve.create_app is create_app and serve.SearchEngine.__name__ == "SearchEngine"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    index, _ = serve_index
    command = [sys.executable, "-m", "clustermac.cli", "serve", "--index", str(index), "--port", str(port)]
    process = subprocess.Popen([*command, "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    try:
        health = None
        for _ in range(600):  # bounded: at most about a minute
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                    health = json.loads(answer.read())
                break
            except OSError:
                time.sleep(0.1)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert health is not None and health["images"] == 10, output
    assert f"http://127.0.0.1:{port}/ (10 images)" in output


def test_clustermac_serve_refuses_a_folder_that_is_not_an_index(tmp_path, capsys):
    from clustermac.cli import main

    assert main(["serve", "--index", str(tmp_path)]) == 2
    assert "not a clustermac index" in capsys.readouterr().err


def test_a_faiss_index_is_served_without_query_expansion(serve_index, tmp_path):
    pytest.importorskip("faiss")
    from clustermac.cli import main

    index, photos = serve_index
    base = index.parent
    command = ["index", str(base / "d.npy"), "--out", str(tmp_path / "faiss"), "--backend", "faiss"]
    command += ["--factory", "Flat", "--image-root", str(photos), "--whitening", str(base / "w.npz")]
    assert main([*command, "--store", str(base / "db.cmfm")]) == 0
    with make_client(tmp_path / "faiss") as served:
        results = search(served, name="photo3.jpg", k=3).json()["results"]
        assert results[0]["name"] == "photo3.jpg" and len(results) == 3
        assert len(search(served, name="photo3.jpg", k=3, rerank=1).json()["results"]) == 3
        answer = search(served, name="photo3.jpg", qe="aqe")
        assert answer.status_code == 400 and "FAISS" in answer.json()["error"]


def test_the_image_caches_are_bounded_in_bytes():
    from clustermac.serve.engine import _LRU

    cache, made = _LRU(10), []

    def make(value: bytes):
        return lambda: made.append(value) or value

    cache.get_or_make("a", make(b"12345"))
    cache.get_or_make("b", make(b"67890"))
    assert cache.get_or_make("a", make(b"other")) == b"12345"  # a hit, and now the most recent
    cache.get_or_make("c", make(b"abc"))  # 13 bytes > 10: the least recent (b) goes
    assert cache.get_or_make("a", make(b"other")) == b"12345"
    assert cache.get_or_make("b", make(b"again")) == b"again"
    assert cache.get_or_make("big", make(b"x" * 11)) == b"x" * 11  # larger than the cache: not kept
    assert cache.get_or_make("big", make(b"y" * 11)) == b"y" * 11
    assert made == [b"12345", b"67890", b"abc", b"again", b"x" * 11, b"y" * 11]
