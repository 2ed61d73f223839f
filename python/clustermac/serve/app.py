"""The HTTP side of ``clustermac serve``: a Starlette app over a :class:`SearchEngine`.

Starlette rather than FastAPI: the API is eight routes with hand-checked form fields, so
FastAPI's generated schema and pydantic models would add a dependency and the ``/docs`` page
(which loads its assets from a CDN) for nothing. Starlette ships with FastAPI, so
``pip install fastapi`` also provides it.

Safety (see the README, "Search server"):

* Host and Origin headers are checked against the names the server was started for (DNS
  rebinding; cross-site requests from a page the user happens to open): 403 otherwise.
* Request bodies are capped (413), images in pixels before decoding (413), non-images 415.
* CPU work (decoding, the backbone, clustering, re-ranking, thumbnails) runs on bounded thread
  pools, never on the event loop; when a pool and its queue are full the answer is 503 with
  ``Retry-After``, so memory stays bounded under any load.
* Names are looked up in the index and resolved inside the image root only (403 otherwise).
* Every response carries a Content-Security-Policy allowing this origin only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import math
import socket
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._typing import PathLike
from ..images import load_image
from .engine import BadRequest, ForbiddenName, SearchEngine, UnknownName

__all__ = ["create_app", "Lane", "Busy", "allowed_hosts"]

STATIC = Path(__file__).parent / "static"
LOG = logging.getLogger("clustermac.serve")
#: Security headers of every response: only this origin's scripts, styles and images; no framing.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
        b"form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
#: Multipart overhead allowed above the upload cap (boundaries, the other fields).
FORM_OVERHEAD = 64 * 1024
MAX_THUMBNAIL = 1024
MAX_PAGE = 200


class Busy(RuntimeError):
    """A lane's workers and queue are all taken."""


class Lane:
    """A thread pool with a bounded queue: at most ``workers + queue_size`` tasks accepted at
    once; :meth:`run` raises :class:`Busy` beyond that instead of queueing without limit. A
    slot is freed when its task finishes on the worker (not when the awaiting request goes
    away), so abandoned requests still count until their work is done."""

    def __init__(self, workers: int, queue_size: int, name: str) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError(f"{name}: expected workers >= 1 and queue_size >= 0, got {workers}, {queue_size}")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self.capacity = workers + queue_size

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Start ``function`` on the pool, or raise :class:`Busy`."""
        if not self._slots.acquire(blocking=False):
            raise Busy("the server is busy: every worker and queue slot is taken")
        try:
            future = self._pool.submit(function, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.submit(function, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """Host header values accepted: the address served and, for loopback or wildcard
    addresses, the loopback names (and for a wildcard, this machine's name), each with the
    port (and without it on port 80), plus ``extra`` (``name`` or ``name:port``)."""
    names = {host if ":" not in host else f"[{host}]"}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    if host in ("0.0.0.0", "::"):
        names.add(socket.gethostname())
    accepted = {f"{name}:{port}" for name in names}
    if port == 80:
        accepted |= names
    return accepted | {value.lower() for value in extra}


class _Guard:
    """ASGI middleware: Host and Origin checks, the request body cap, security headers."""

    def __init__(self, app: Any, hosts: set[str], origins: set[str], max_body: int) -> None:
        self.app = app
        self.hosts = {h.lower() for h in hosts}
        self.origins = {o.lower().rstrip("/") for o in origins}
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host", "").lower()
        origin = headers.get("origin")
        problem = None
        if host not in self.hosts:
            problem = (403, f"Host {host!r} is not one this server answers to (start it with --allow-host)")
        elif origin is not None and origin.lower().rstrip("/") not in self.origins:
            problem = (403, f"requests from the page at Origin {origin!r} are refused (start with --allow-origin)")
        elif headers.get("sec-fetch-site") == "cross-site":
            problem = (403, "cross-site requests are refused")
        else:
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                problem = (413, f"the request body is larger than {self.max_body} bytes")
        if problem is not None:
            response = JSONResponse({"error": problem[1]}, status_code=problem[0])
            await response(scope, receive, self._with_headers(send))
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        await self.app(scope, limited_receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Callable) -> Callable:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        return send_with_headers


class _BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded bytes as an RGB image with EXIF rotation applied; the pixel count is
    checked from the header, before decoding."""
    if not data:
        raise _Refused(400, "image: the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _Refused(415, "image: the uploaded file is not an image PIL can read") from None
    if width * height > max_pixels:
        raise _Refused(413, f"image: {width}×{height} pixels is more than the {max_pixels} allowed")
    try:
        return load_image(Image.open(io.BytesIO(data)))
    except (ValueError, OSError) as error:
        raise _Refused(415, f"image: cannot decode the upload ({error})") from None


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None or text.strip() == "":
        return None
    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise BadRequest(f"box: expected four numbers x1,y1,x2,y2 (pixels of the original image), got {text[:80]!r}")
    if values[2] <= values[0] or values[3] <= values[1]:
        raise BadRequest(f"box {text[:80]!r} is empty: need x1 < x2 and y1 < y2")
    return values  # type: ignore[return-value]


def _parse_int(text: str | None, name: str, default: int, minimum: int) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {text[:40]!r}") from None
    if value < minimum:
        raise BadRequest(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def _parse_flag(text: str | None, name: str) -> bool:
    if text in (None, "", "0"):
        return False
    if text == "1":
        return True
    raise BadRequest(f"{name}: expected 0 or 1, got {text[:40]!r}")


def create_app(
    index_path: PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
    workers: int = 1,
    queue_size: int = 8,
    image_workers: int = 2,
    max_upload_bytes: int = 20 * 1024 * 1024,
    max_pixels: int = 40_000_000,
    max_k: int = 100,
    rerank_top: int = 100,
    n_threads: int | None = None,
    reload_interval: float = 2.0,
    engine: SearchEngine | None = None,
) -> Starlette:
    """The search page and API over the index folder ``index_path`` (see the README).

    The model and index are loaded here, once. ``workers`` searches run at once (each uses
    ``n_threads`` ONNX Runtime threads) with up to ``queue_size`` waiting; beyond that, 503.
    Thumbnails and cluster maps run on ``image_workers`` threads with their own queue.
    ``reload_interval`` > 0: the index folder's published version is checked that often and
    reloaded when it changed (``POST /api/reload`` reloads at once); 0 turns the check off.
    """
    engine = engine or SearchEngine(index_path, n_threads=n_threads, max_k=max_k, rerank_top=rerank_top)
    search_lane = Lane(workers, queue_size, "search")
    image_lane = Lane(image_workers, 32, "images")

    async def run(lane: Lane, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await lane.run(function, *args, **kwargs)

    def guarded(handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Busy as error:
                return _error(503, str(error), {"Retry-After": "1"})
            except _BodyTooLarge as error:
                return _error(413, str(error))
            except _Refused as error:
                return _error(error.status, str(error))
            except UnknownName as error:
                return _error(404, str(error.args[0]))
            except ForbiddenName as error:
                return _error(403, str(error))
            except ValueError as error:  # BadRequest, and the library's checks (box outside, ...)
                return _error(400, str(error))

        return endpoint

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", **engine.describe()})

    async def info(request: Request) -> Response:
        return JSONResponse(engine.describe())

    async def images(request: Request) -> Response:
        query = request.query_params
        offset = _parse_int(query.get("offset"), "offset", 0, 0)
        limit = min(_parse_int(query.get("limit"), "limit", 50, 1), MAX_PAGE)
        return JSONResponse(engine.list_names(offset, limit, query.get("prefix") or ""))

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        size_text = request.query_params.get("size")
        size = None if size_text is None else min(_parse_int(size_text, "size", 256, 16), MAX_THUMBNAIL)
        data, media_type = await run(image_lane, engine.thumbnail, name, size)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})

    async def clusters(request: Request) -> Response:
        data = await run(image_lane, engine.clusters_png, request.path_params["name"])
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def search(request: Request) -> Response:
        async with request.form(max_files=1, max_fields=16, max_part_size=64 * 1024) as form:
            upload = form.get("image")
            name = form.get("name") or None
            fields = {key: form.get(key) for key in ("box", "k", "crop", "qe", "rerank", "clusters")}
            if any(value is not None and not isinstance(value, str) for value in [name, *fields.values()]):
                raise BadRequest("only the field 'image' may be a file")
            data = None
            if isinstance(upload, UploadFile):
                data = await upload.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    raise _Refused(413, f"image: the upload is larger than {max_upload_bytes} bytes")
            elif upload not in (None, ""):
                raise BadRequest("image: expected a file upload (multipart/form-data)")
        if (data is None) == (name is None):
            raise BadRequest("give either 'image' (a file) or 'name' (an indexed image), not both or neither")
        options = {
            "box": _parse_box(fields["box"]),
            "k": min(_parse_int(fields["k"], "k", 20, 1), engine.max_k),
            "crop": fields["crop"] or None,
            "qe": fields["qe"] or "none",
            "rerank": _parse_flag(fields["rerank"], "rerank"),
            "clusters": _parse_flag(fields["clusters"], "clusters"),
        }

        def work() -> dict[str, Any]:
            query = _decode_upload(data, max_pixels) if data is not None else None
            return engine.search(image=query, name=name, **options)

        loop = asyncio.get_running_loop()
        queued = loop.time()
        result = await run(search_lane, work)
        result["timing_ms"]["server"] = round((loop.time() - queued) * 1000.0, 2)
        return JSONResponse(result)

    async def reload(request: Request) -> Response:
        # SearchEngine.reload holds its own lock: one reload at a time, searches go on meanwhile.
        changed = await asyncio.get_running_loop().run_in_executor(None, partial(engine.reload, force=True))
        return JSONResponse({"reloaded": changed, **engine.describe()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if engine.describe()["same_kernels"] is False:
            LOG.warning(
                "the index's descriptors were computed by other code than this server runs (clustermac.kernels): "
                "query descriptors made here may differ from the indexed ones in their last bits"
            )
        task = asyncio.create_task(_watch(engine, reload_interval)) if reload_interval > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            search_lane.shutdown()
            image_lane.shutdown()

    routes = [
        Route("/", page),
        Route("/healthz", guarded(healthz)),
        Route("/api/info", guarded(info)),
        Route("/api/search", guarded(search), methods=["POST"]),
        Route("/api/reload", guarded(reload), methods=["POST"]),
        Route("/api/images", guarded(images)),
        Route("/api/images/{name:path}", guarded(image)),
        Route("/api/clusters/{name:path}", guarded(clusters)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    hosts = allowed_hosts(host, port, allow_hosts)
    origins = {f"http://{h}" for h in hosts} | set(allow_origins)
    app.add_middleware(_Guard, hosts=hosts, origins=origins, max_body=max_upload_bytes + FORM_OVERHEAD)
    app.state.engine = engine
    app.state.search_lane = search_lane
    app.state.image_lane = image_lane
    return app


async def _watch(engine: SearchEngine, interval: float) -> None:
    """Reload the engine when the index folder's published version changes."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            if await loop.run_in_executor(None, engine.reload):
                LOG.info("reloaded the index: version %s", engine.describe()["version"])
        except Exception as error:  # keep serving the old index; say why the new one was refused
            LOG.warning("the index changed but could not be loaded, still serving the old one: %s", error)
