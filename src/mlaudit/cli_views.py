"""What the CLI prints: errors, the run summary, the `runs list` table, resume hints. Every user string
(run names, paths, metric names and values, error messages) goes through :func:`mlaudit.termsafe.safe`."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import ConfigError, DataError
from .headline import headline, short_kind
from .termsafe import safe


def out_console(width: int | None = None) -> Console:
    return Console(highlight=False, width=width)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(e: BaseException, *, prefix: str = "error", hint: str | None = None) -> NoReturn:
    """Print the error (as plain text, never as markup) and exit: 2 for invalid input, else 1."""
    code = 2 if isinstance(e, (ConfigError, DataError)) else 1
    msg = Text(f"{prefix}: ", style="bold red") + Text(safe(e))
    if hint:
        msg += Text(f"\n{safe(hint)}")
    err_console().print(msg)
    raise typer.Exit(code)


def cell(value: object) -> Text:
    """A table cell: one line, control characters escaped, never read as markup."""
    return Text(safe(value, oneline=True))


def resume_command(out_dir: Path | str | None, store: Path | None) -> str:
    """The command that resumes the run in ``out_dir`` (with the same --store, when one was given)."""
    cmd = f"mlaudit run --resume {shlex.quote(str(out_dir)) if out_dir is not None else 'DIR'}"
    return cmd + (f" --store {shlex.quote(str(store))}" if store is not None else "")


def metric_lines(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, formatted value) rows; {"mean","se"} and {"value","lo","hi"} leaves stay whole."""
    from .report.html import format_cell

    rows: list[tuple[str, str]] = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and not ({"mean", "se"} <= v.keys() or {"value", "lo", "hi"} <= v.keys()):
            rows += metric_lines(v, name + ".")
        else:
            rows.append((name, format_cell(v)))
    return rows


def print_summary(results: dict[str, Any], out_dir: Path) -> None:
    """The metrics table, the cost line and where the results and the report are."""
    t = Table(title=cell(f"{results['kind']}: {results['name']}"))
    t.add_column("metric")
    t.add_column("value")
    for k, v in metric_lines(results["metrics"]):
        t.add_row(cell(k), Text(safe(v)))
    con = out_console()
    con.print(t)
    c = results["cost"]
    resumed = f" ({c['models_resumed']} resumed from the store)" if c.get("models_resumed") else ""
    con.print(Text(safe(f"{c['models_trained']} models trained{resumed} in {c['wall_s']:.1f} s on {c['device']} "
                        f"({results['executor']} executor)")))
    con.print(Text(safe(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.html'}")))


def _created(iso: str, wide: bool) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M" if wide else "%m-%d %H:%M")
    except ValueError:
        return iso


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def runs_table(rows: Sequence[Any], metrics_of: Callable[[str], dict[str, Any]], *, width: int,
               wide: bool = False) -> Table:
    """`runs list`: id, kind, name, created, and the result: the kind's headline metric for a finished
    run (:mod:`mlaudit.headline`), else its status. Names are cut to fit ``width`` unless ``wide``
    (which adds the status and the output folder)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    data: list[dict[str, str]] = []
    for r in rows:
        head = headline(r.kind, metrics_of(r.id)) if r.status == "done" else None
        data.append({"id": r.id, "kind": r.kind if wide else short_kind(r.kind), "name": r.name,
                     "status": r.status, "created": _created(r.created_at, wide),
                     "result": head or (r.status if r.status != "done" else "-"), "out_dir": r.out_dir})
    data = [{k: safe(v, oneline=True) for k, v in d.items()} for d in data]
    cols = ["id", "kind", "name", "status", "created", "result", "out_dir"] if wide else \
        ["id", "kind", "name", "created", "result"]
    if not wide:
        fixed = sum(max([len(c), *(len(d[c]) for d in data)]) for c in cols if c != "name")
        name_w = max(8, width - fixed - 2 * (len(cols) - 1))
        for d in data:
            d["name"] = _truncate(d["name"], name_w)
    for c in cols:
        table.add_column(c, no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for d in data:
        table.add_row(*(Text(d[c]) for c in cols))
    return table


COMPARE_SUFFIXES = (".value", ".mean", "accuracy", "epsilon_lower_bound", "auc")
"""Metric names shown by `runs compare` without ``--match``: point estimates and headline-like leaves
(intervals, standard errors and counts are left to ``--all``)."""


def compare_table(runs: Sequence[Any], metrics: Sequence[dict[str, Any]], *, match: str | None = None,
                  show_all: bool = False) -> Table:
    """`runs compare`: one column per run; rows are the run's kind, status and headline, then every
    config field whose value differs between the runs, then the metrics (dotted names; with ``match``
    only names containing it; without ``show_all`` only point estimates, see :data:`COMPARE_SUFFIXES`)."""
    from .jsonutil import flatten
    from .report.html import format_cell

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("")
    for r in runs:
        table.add_column(safe(f"{r.id[:8]} {r.name}", oneline=True), overflow="fold")

    def row(label: str, values: Sequence[Any]) -> None:
        table.add_row(Text(safe(label, oneline=True)), *(Text(safe(format_cell(v), oneline=True)) for v in values))

    row("kind", [r.kind for r in runs])
    row("status", [r.status for r in runs])
    row("headline", [headline(r.kind, m) or "-" for r, m in zip(runs, metrics)])
    configs = [flatten(r.config) for r in runs]
    for key in sorted({k for c in configs for k in c}):
        values = [c.get(key, "-") for c in configs]
        if len({repr(v) for v in values}) > 1:
            row(f"config.{key}", values)
    names: list[str] = []
    for m in metrics:
        names += [k for k in m if k not in names]
    for key in names:
        if match is not None and match not in key:
            continue
        if match is None and not show_all and not key.endswith(COMPARE_SUFFIXES):
            continue
        row(key, [m.get(key, "-") for m in metrics])
    return table


class _SafeFormatter(logging.Formatter):
    """Log lines for the terminal with control characters stripped (names in messages are user input)."""

    def format(self, record: logging.LogRecord) -> str:
        return safe(super().format(record))


def console_logging(verbosity: int) -> logging.Handler | None:
    """``--verbose``: mlaudit's log on stderr, INFO for ``-v`` and DEBUG for ``-vv`` (None for 0)."""
    if verbosity <= 0:
        return None
    level = logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logger = logging.getLogger("mlaudit")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler
