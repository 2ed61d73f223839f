"""The ``clustermac serve`` subcommand (registered by :func:`add_parser`)."""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``clustermac serve`` on the CLI's subparsers."""
    p = sub.add_parser(
        "serve",
        help="a search page and HTTP API over an index (needs `pip install clustermac[serve]`)",
        description="Serve the search page (GET /) and the JSON API (/api/...) of an index built by "
        "`clustermac index … --image-root DIR --whitening W.npz [--store DB.cmfm --write-store]`.",
    )
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="another Host header value to accept (e.g. the machine's name when serving on 0.0.0.0); repeatable",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="another page origin allowed to call the API (e.g. http://intranet.example); repeatable",
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="searches run at once (default 1)")
    p.add_argument("--queue", type=int, default=8, help="searches waiting beyond those before 503 (default 8)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads per search")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    p.add_argument("--max-pixels", type=_positive_int, default=40_000_000, help="largest upload in pixels")
    p.add_argument("--max-k", type=_positive_int, default=100, help="largest k a search may ask for (default 100)")
    p.add_argument(
        "--rerank-top", type=_positive_int, default=100, help="results localised by AML re-ranking (default 100)"
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks for a newly published index (0: only POST /api/reload)",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def build_server(args: argparse.Namespace):
    """The uvicorn server of ``clustermac serve`` for parsed arguments (the model and index
    loaded); ``.run()`` serves until interrupted."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise SystemExit(f"clustermac serve needs the serve extra: pip install 'clustermac[serve]' ({error})") from None
    app = create_app(
        args.index,
        host=args.host,
        port=args.port,
        allow_hosts=args.allow_host,
        allow_origins=args.allow_origin,
        workers=args.workers,
        queue_size=max(0, args.queue),
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        rerank_top=args.rerank_top,
        n_threads=args.threads,
        reload_interval=args.reload_interval,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False)
    return uvicorn.Server(config)


def cmd_serve(args: argparse.Namespace) -> int:
    server = build_server(args)
    images = server.config.app.state.engine.describe()["images"]
    print(f"clustermac serve: http://{args.host}:{args.port}/ ({images} images)", flush=True)
    server.run()
    return 0
