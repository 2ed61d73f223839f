"""Results for people: a plain-text table for the terminal and one self-contained HTML report.

:func:`format_table` lays a table out like the paper's Table 1 (method names left-aligned,
numbers right-aligned with one decimal). :func:`write_report` writes a single HTML file with
the tables, the figures (PIL images as base64 PNG, SVG charts inline) and notes; it needs no
other file to display and is written atomically, so a failure leaves no partial report.
:func:`write_search_page` does the same for the results of ``clustermac search --html``.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .._typing import ImageInput, PathLike
from ..files import atomic_write_bytes

Table = tuple[str, Sequence[str], Sequence[Sequence[Any]]]
Figure = tuple[str, Union[Image.Image, str]]

MISSING = "-"  # shown for a None cell


def _format_cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return "n/a" if math.isnan(value) else f"{value:.1f}"
    return str(value)


# A text cell that reads as a number (e.g. "66.9", "70.3*", "-1.5%") is aligned like one.
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?[*%]?$")


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_NUMBER_TEXT.match(value.strip())) or value.strip() in ("n/a", MISSING)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _numeric_column(rows: Sequence[Sequence[Any]], column: int) -> bool:
    """Right-align a column when every filled cell in it is a number (or reads as one)."""
    filled = [row[column] for row in rows if row[column] is not None]
    return bool(filled) and all(_is_number(v) for v in filled)


def _check_table(header: Sequence[str], rows: Sequence[Sequence[Any]], name: str) -> list[list[Any]]:
    if isinstance(header, str) or len(header) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of column names, got {header!r}")
    checked = []
    for i, row in enumerate(rows):
        if isinstance(row, str) or len(row) != len(header):
            length = "a string" if isinstance(row, str) else f"{len(row)} cells"
            raise ValueError(
                f"{name}: row {i} has {length}, expected {len(header)} cells (one per column of {list(header)})"
            )
        checked.append(list(row))
    return checked


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table laid out like the paper's Table 1: a header line, a rule, one line
    per row; text cells left-aligned, numbers right-aligned (floats with one decimal, e.g. mAP
    in percent), None shown as ``-``, NaN as ``n/a``."""
    rows = _check_table(header, rows, "rows")
    texts = [[_format_cell(v) for v in row] for row in rows]
    # A column is numeric (right-aligned) when every non-empty cell in it is a number.
    numeric = [_numeric_column(rows, c) for c in range(len(header))]
    widths = [max([len(str(header[c]))] + [len(t[c]) for t in texts]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cell.rjust(widths[c]) if numeric[c] else cell.ljust(widths[c]) for c, cell in enumerate(cells)]
        return "  ".join(out).rstrip()

    lines = [line([str(h) for h in header]), "  ".join("-" * w for w in widths)]
    lines += [line(t) for t in texts]
    return "\n".join(lines)


def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _table_html(caption: str, header: Sequence[str], rows: Sequence[Sequence[Any]], index: int) -> str:
    rows = _check_table(header, rows, f"tables[{index}]")
    numeric = [_numeric_column(rows, c) for c in range(len(header))]
    out = ["<table>", f"<caption>{_escape(caption)}</caption>", "<thead><tr>"]
    out += [f"<th>{_escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = [
            f'<td class="num">{_escape(_format_cell(v))}</td>' if numeric[c] else f"<td>{_escape(_format_cell(v))}</td>"
            for c, v in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure_html(caption: str, figure: Image.Image | str, index: int) -> str:
    if isinstance(figure, Image.Image):
        buffer = io.BytesIO()
        figure.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        body = f'<img alt="{_escape(caption)}" src="data:image/png;base64,{data}">'
    elif isinstance(figure, str):
        try:
            root = ElementTree.fromstring(figure)
        except ElementTree.ParseError as error:
            raise ValueError(f"figures[{index}]: the SVG string is not well-formed XML ({error})") from None
        if root.tag.rsplit("}", 1)[-1] != "svg":
            raise ValueError(f"figures[{index}]: expected an <svg> document, got root element <{root.tag}>")
        body = figure[figure.index("<svg") :] if figure.lstrip().startswith("<?xml") else figure
    else:
        raise ValueError(f"figures[{index}]: expected a PIL image or an SVG string, got {type(figure).__name__}")
    return f'<figure id="figure-{index + 1}">\n{body}\n<figcaption>{_escape(caption)}</figcaption>\n</figure>'


_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.4em; }
th, td { border-bottom: 1px solid #ccc; padding: 0.25em 0.8em; text-align: left; }
thead th { border-bottom: 2px solid #444; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img, figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
"""


def render_report(
    title: str,
    tables: Sequence[Table],
    figures: Sequence[Figure],
    notes: Sequence[str],
) -> str:
    """The HTML text of :func:`write_report` (no file written)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{_escape(title)}</h1>",
    ]
    if tables:
        parts.append("<h2>Tables</h2>")
        for i, table in enumerate(tables):
            try:
                caption, header, rows = table
            except (TypeError, ValueError):
                raise ValueError(f"tables[{i}]: expected (caption, header, rows), got {type(table).__name__}") from None
            parts.append(_table_html(caption, header, rows, i))
    if figures:
        parts.append("<h2>Figures</h2>")
        for i, item in enumerate(figures):
            try:
                caption, figure = item
            except (TypeError, ValueError):
                raise ValueError(f"figures[{i}]: expected (caption, figure), got {type(item).__name__}") from None
            parts.append(_figure_html(caption, figure, i))
    if notes:
        parts.append("<h2>Notes</h2>")
        parts += [f"<p>{_escape(note)}</p>" for note in notes]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    path: PathLike,
    title: str,
    tables: Sequence[Table],
    figures: Sequence[Figure],
    notes: Sequence[str],
) -> None:
    """Write one self-contained HTML report to ``path``.

    ``tables``: ``(caption, header, rows)`` each (cells as in :func:`format_table`);
    ``figures``: ``(caption, figure)`` with a PIL image (embedded as base64 PNG) or an SVG
    string (inlined); ``notes``: paragraphs of plain text. The whole document is built in memory
    first and then written to a temporary file beside ``path`` and renamed over it, so an error
    in any figure or table leaves no partial file and an existing report untouched.
    """
    atomic_write_bytes(Path(path), render_report(title, tables, figures, notes).encode("utf-8"))


THUMBNAIL_SIZE = 200  # longer side of the thumbnails of the search page, pixels


def _thumbnail_html(image: Image.Image, alt: str) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_escape(alt)}" src="data:image/jpeg;base64,{data}">'


def write_search_page(
    path: PathLike,
    query: ImageInput,
    box: Sequence[float] | None,
    results: Sequence[tuple[str, float]],
    image_root: PathLike | None = None,
) -> None:
    """One self-contained HTML page of a search (``clustermac search --html``): the query
    (its box drawn in red) and the ranked results as embedded thumbnails with their scores.

    ``results`` are ``(image name, score)`` best first; names are looked up under
    ``image_root`` (or as given); an image that cannot be read is listed by name without a
    thumbnail. Written atomically.
    """
    from PIL import ImageDraw

    from ..images import load_image

    query_image = load_image(query)
    if box is not None:
        if len(box) != 4:
            raise ValueError(f"box: expected (x1, y1, x2, y2), got {box!r}")
        query_image = query_image.copy()
        width = max(2, round(max(query_image.size) / 150))
        ImageDraw.Draw(query_image).rectangle([float(v) for v in box], outline=(255, 0, 0), width=width)
    query_name = str(query) if isinstance(query, (str, os.PathLike)) else "query"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>clustermac search: {_escape(query_name)}</title>",
        f"<style>{_STYLE}\n.results {{ display: flex; flex-wrap: wrap; gap: 1em; }}\n"
        f".results figure {{ margin: 0; width: {THUMBNAIL_SIZE}px; }}</style>",
        "</head><body>",
        f"<h1>Query: {_escape(query_name)}</h1>",
        f"<figure>{_thumbnail_html(query_image, query_name)}<figcaption>query"
        + (f", box {_escape(tuple(box))}" if box is not None else "")
        + "</figcaption></figure>",
        f"<h2>{len(results)} results</h2>",
        '<div class="results">',
    ]
    for rank, (name, score) in enumerate(results, 1):
        location = Path(image_root) / name if image_root is not None else Path(name)
        try:
            picture = _thumbnail_html(load_image(location), str(name))
        except (OSError, ValueError) as error:
            picture = f"<p>(no thumbnail: {_escape(error)})</p>"
        parts.append(
            f"<figure>{picture}<figcaption>{rank}. {_escape(name)}<br>score {float(score):.4f}</figcaption></figure>"
        )
    parts += ["</div>", "</body></html>"]
    atomic_write_bytes(Path(path), ("\n".join(parts) + "\n").encode("utf-8"))
