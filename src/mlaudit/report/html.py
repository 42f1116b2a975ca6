"""Self-contained HTML reports: one file with inline CSS and PNG figures, no JavaScript.

Security: the template is rendered with jinja2 autoescaping on, and nothing in it is marked
``|safe``; every string that comes from a config, a filename or trial data is therefore escaped.
The only non-text payload, figure images, are ``data:image/png;base64,...`` URIs generated here,
whose alphabet needs no escaping. Figures are rendered through matplotlib's Agg canvas without
pyplot, so importing or calling this module never changes matplotlib's global backend.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .. import __version__
from ..atomic import write_text
from ..errors import ConfigError
from ..stats import MeanSE, format_number
from ..store import dumps, to_jsonable

__all__ = ["ReportTable", "render_report", "write_report", "fig_to_data_uri", "format_cell", "MAX_TRIAL_ROWS"]

MAX_TRIAL_ROWS = 500
_MEAN_SE = ("mean", "se")
_INTERVAL = ("value", "lo", "hi")


@dataclass(frozen=True)
class ReportTable:
    """An experiment-specific table: ``rows`` are sequences of cells aligned with ``columns``.

    Cells are formatted like metric values (numbers, {"mean","se"}, {"value","lo","hi"}, text).
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str | None = None

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ConfigError(f"table {self.title!r}: row {i} has {len(row)} cells but there are "
                                  f"{len(self.columns)} columns ({', '.join(map(str, self.columns))})")


def _is_uncertain(value: Any) -> bool:
    return isinstance(value, Mapping) and (all(k in value for k in _MEAN_SE) or all(k in value for k in _INTERVAL))


def format_cell(value: Any) -> str:
    """Text of one value: numbers shortened, {"mean","se"} -> "m ± se", {"value","lo","hi"} -> "v [lo, hi]"."""
    if isinstance(value, MeanSE):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, (bool, str, int)):
        return str(value)
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, Mapping) and all(k in value for k in _MEAN_SE):
        return f"{format_cell(value['mean'])} ± {format_cell(value['se'])}"
    if isinstance(value, Mapping) and all(k in value for k in _INTERVAL):
        return f"{format_cell(value['value'])} [{format_cell(value['lo'])}, {format_cell(value['hi'])}]"
    if hasattr(value, "__float__") and not hasattr(value, "__len__"):  # numpy / torch scalars
        return format_cell(value.item() if hasattr(value, "item") else float(value))
    try:
        return dumps(value)
    except ConfigError:
        return str(value)


def _metric_rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, value text, details) rows; an uncertain value's extra scalar keys become details."""
    rows: list[tuple[str, str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, MeanSE):
            value = value.to_dict()
        if _is_uncertain(value):
            core = _MEAN_SE if all(k in value for k in _MEAN_SE) else _INTERVAL
            extra = {k: v for k, v in value.items() if k not in core}
            details = ", ".join(f"{k}={format_cell(v)}" for k, v in extra.items() if not isinstance(v, Mapping))
            rows.append((name, format_cell(value), details))
            nested = {k: v for k, v in extra.items() if isinstance(v, Mapping)}
            rows += _metric_rows(nested, name + ".")
        elif isinstance(value, Mapping) and value:
            rows += _metric_rows(value, name + ".")
        else:
            rows.append((name, format_cell(value), ""))
    return rows


def _scalar_leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-name -> scalar (or uncertain value) leaves of a trial; lists and empty dicts are skipped."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, MeanSE) or _is_uncertain(value):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_scalar_leaves(value, name + "."))
        elif value is None or isinstance(value, (str, int, float)) or (
                hasattr(value, "__float__") and not hasattr(value, "__len__")):
            out[name] = value
    return out


def _trial_table(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    leaves = [_scalar_leaves(t) for t in trials]
    columns: dict[str, None] = {}
    for leaf in leaves:
        columns.update(dict.fromkeys(leaf))
    shown = leaves[:MAX_TRIAL_ROWS]
    rows = [[format_cell(leaf.get(c)) for c in columns] for leaf in shown]
    return {"columns": list(columns), "rows": rows, "total": len(trials), "truncated": len(trials) > len(shown)}


def fig_to_data_uri(fig: Any) -> str:
    """PNG ``data:`` URI of a matplotlib Figure (Agg canvas, dpi 200: sharp on high-density screens); the
    figure is closed afterwards.

    Build figures with ``matplotlib.figure.Figure()`` to stay clear of pyplot's global state; a
    figure made through pyplot is also removed from pyplot's figure manager.
    """
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise ConfigError(f"figures must be matplotlib.figure.Figure objects, got {type(fig).__name__}")
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=200, bbox_inches="tight")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mlaudit.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _kv_rows(d: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(name, value) for name, value, _ in _metric_rows(d)]


def render_report(*, title: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
                  trials: Sequence[Mapping[str, Any]], cost: Mapping[str, Any], versions: Mapping[str, Any],
                  figures: Mapping[str, Any] | None = None, tables: Sequence[ReportTable] | None = None,
                  notes: Sequence[str] | None = None, verdict: str | None = None,
                  warnings: Sequence[str] | None = None) -> str:
    """The HTML text of a report: the verdict (``verdict``, the kind's headline, and ``warnings``) first,
    then the kind's tables and figures and the notes; all metrics, trials, cost, versions and the
    configuration follow, collapsed.

    ``metrics``: nested dict; leaves are numbers, text, {"mean","se"[,"n"]} (shown "m ± se"),
    {"value","lo","hi", ...} (shown "v [lo, hi]", other keys as details) or :class:`MeanSE`.
    ``trials``: one dict per trial; the table has the union of their scalar leaves (dotted names)
    and shows the first :data:`MAX_TRIAL_ROWS`. ``figures``: caption -> matplotlib Figure (closed
    after rendering). ``config`` is shown as YAML. All text is HTML-escaped.
    """
    for name, value in (("config", config), ("metrics", metrics), ("cost", cost), ("versions", versions)):
        if not isinstance(value, Mapping):
            raise ConfigError(f"render_report: {name} must be a dict, got {type(value).__name__}")
    for t in tables or ():
        if not isinstance(t, ReportTable):
            raise ConfigError(f"render_report: tables must be ReportTable objects, got {type(t).__name__}")
    tables_ctx = [
        {"title": t.title, "note": t.note, "columns": [str(c) for c in t.columns],
         "rows": [[format_cell(c) for c in row] for row in t.rows]}
        for t in tables or ()
    ]
    figs = [{"name": str(name), "uri": fig_to_data_uri(fig)} for name, fig in (figures or {}).items()]
    config_yaml = yaml.safe_dump(to_jsonable(dict(config), "config"), sort_keys=False, allow_unicode=True,
                                 default_flow_style=False)
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=str(title), notes=[str(n) for n in notes or ()], metrics=_metric_rows(metrics), tables=tables_ctx,
        verdict=None if verdict is None else str(verdict), warnings=[str(w) for w in warnings or ()],
        figures=figs, trials=_trial_table(list(trials)), cost=_kv_rows(cost), versions=_kv_rows(versions),
        config_yaml=config_yaml, mlaudit_version=__version__,
    )


def write_report(path: str | os.PathLike[str], *, title: str, config: Mapping[str, Any],
                 metrics: Mapping[str, Any], trials: Sequence[Mapping[str, Any]], cost: Mapping[str, Any],
                 versions: Mapping[str, Any], figures: Mapping[str, Any] | None = None,
                 tables: Sequence[ReportTable] | None = None, notes: Sequence[str] | None = None,
                 verdict: str | None = None, warnings: Sequence[str] | None = None) -> Path:
    """Render (see :func:`render_report`) and write atomically: a temp file in the same folder, then
    ``os.replace``, so readers never see a half-written report. Returns the path written."""
    html = render_report(title=title, config=config, metrics=metrics, trials=trials, cost=cost,
                         versions=versions, figures=figures, tables=tables, notes=notes, verdict=verdict,
                         warnings=warnings)
    return write_text(path, html)

