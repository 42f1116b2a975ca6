"""``mlaudit runs index``: one static HTML page listing every run of a store with its headline metric
(:mod:`mlaudit.headline`) and a link to its report, filterable in the browser.

Everything shown is escaped (the template autoescapes). Links are file paths, relative to the index
when possible, always starting with ``./``, ``../`` or ``/`` so that no stored path can turn into a
``javascript:`` or other URL scheme.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_text
from ..headline import headline
from ..store import RunStore
from .html import _environment


def _href(report: Path, index: Path) -> str | None:
    if not report.is_file():
        return None
    try:
        rel = os.path.relpath(report.resolve(), index.parent.resolve())
    except ValueError:  # another drive (Windows)
        return report.resolve().as_uri()
    rel = rel.replace(os.sep, "/")
    return rel if rel.startswith(("../", "/")) else "./" + rel


def index_rows(store: RunStore, index: Path, *, limit: int) -> list[dict[str, Any]]:
    """One dict per run (newest first): id, kind, name, created, status, result, href (or None)."""
    rows = []
    for r in store.list_experiments(limit=limit):
        head = headline(r.kind, store.metrics(r.id)) if r.status == "done" else None
        rows.append({"id": r.id, "kind": r.kind, "name": r.name, "created": r.created_at[:16].replace("T", " "),
                     "status": r.status, "result": head or (r.status if r.status != "done" else "-"),
                     "href": _href(Path(r.out_dir) / "report.html", index)})
    return rows


def write_index(store: RunStore, out: Path, *, limit: int = 1000) -> Path:
    """Write the index page to ``out`` (atomically) and return its path."""
    html = _environment().get_template("index.html.j2").render(
        rows=index_rows(store, out, limit=limit), store=str(store.path), mlaudit_version=__version__,
        written=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return write_text(out, html)
