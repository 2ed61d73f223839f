"""``clustermac serve``: a search page and an HTTP API over an index folder.

Needs the ``serve`` extra (``pip install clustermac[serve]``: Starlette, uvicorn,
python-multipart). :func:`create_app` builds the ASGI app; :class:`SearchEngine` is the search
behind it, usable without HTTP. See the README, "Search server".
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "SearchEngine"]


def __getattr__(name: str) -> Any:
    # Imported on use, so that `clustermac --help` works without the serve extra.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "SearchEngine":
        from .engine import SearchEngine

        return SearchEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
