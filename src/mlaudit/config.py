"""Shared pieces of configuration handling: turning pydantic errors into messages that name
the field, the value and what is allowed; loading YAML; applying ``--set key=value`` overrides."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

_HEADER = "invalid configuration:"
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def format_validation_error(err: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``field.path: message (got value)`` — names field, value and rule.

    With ``model`` (the class that was validated), out-of-range values also show the field's whole
    allowed range, e.g. ``trials: ... (got 0; allowed 1 <= trials <= 100000)``. Errors raised as
    :class:`ConfigError` inside nested validators keep their own (already formatted) lines.
    """
    lines: list[str] = []
    for e in err.errors():
        loc_parts = tuple(e["loc"])
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc_parts) or "<root>"
        cause = (e.get("ctx") or {}).get("error")
        if e["type"] == "value_error" and isinstance(cause, BaseException):
            text = str(cause)
            if text.startswith(_HEADER):  # an already formatted ConfigError from a nested validator
                lines += [ln.strip() for ln in text[len(_HEADER):].splitlines() if ln.strip()]
            else:  # our validators name the value themselves
                lines.append(f"{loc}: {text}")
            continue
        got = e.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else _short(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        extra = ""
        if model is not None and e["type"] in _RANGE_ERRORS:
            rng = field_range(model, loc_parts)
            extra = f"; allowed {rng.replace('X', loc)}" if rng else ""
        lines.append(f"{loc}: {e['msg']} (got {shown}{extra})")
    return _HEADER + "\n  " + "\n  ".join(lines)


def _short(value: dict | list) -> str:
    if isinstance(value, dict):
        return "a mapping with keys " + ", ".join(map(str, list(value)[:6])) if value else "{}"
    return f"a list of {len(value)} items"


def field_range(model: type[BaseModel], loc: Sequence[Any]) -> str | None:
    """The numeric bounds of the field at ``loc`` (walking nested models) as ``"lo <= X <= hi"``;
    None when ``loc`` does not lead to a bounded field."""
    cls: Any = model
    info = None
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        cls = _model_in(info.annotation)
    if info is None:
        return None
    lo = hi = None
    for m in info.metadata:  # annotated_types.Ge / Gt / Le / Lt, as pydantic's Field(ge=...) stores them
        for attr, side, text in (("ge", "lo", "{} <="), ("gt", "lo", "{} <"), ("le", "hi", "<= {}"), ("lt", "hi", "< {}")):
            bound = getattr(m, attr, None)
            if bound is not None and side == "lo":
                lo = text.format(bound)
            elif bound is not None:
                hi = text.format(bound)
    if lo is None and hi is None:
        return None
    return " ".join(p for p in (lo, "X", hi) if p)


def _model_in(annotation: Any) -> Any:
    """The pydantic model class inside an annotation (``Recipe``, ``Recipe | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config path {str(p)!r} is not a file; give the path of a YAML config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; a config is a YAML text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty; it must hold a mapping such as 'kind: train'")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (key: value lines), got {type(data).__name__}")
    return data


def apply_overrides(config: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` assignments (value parsed as YAML) to a copy of ``config``.

    A string-valued field that is descended into (``recipe.epochs=2`` where ``recipe: fast``)
    becomes the mapping ``{name: fast, epochs: 2}``, matching the config's short forms; a missing
    field becomes a new mapping. Descending into any other value (a number, a list) is a ConfigError.
    Numbers in exponent notation without a dot (``1e-3``) are read as floats, not strings.
    """
    out: dict[str, Any] = _deepcopy(config)
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set expects key=value (e.g. recipe.epochs=2), got {a!r}")
        key, raw = a.split("=", 1)
        parts = [k.strip() for k in key.strip().split(".")]
        if not key.strip() or any(not p for p in parts):
            raise ConfigError(f"--set expects key=value with a dotted key such as recipe.epochs, got {a!r}")
        value = _parse_value(key, raw)
        node = out
        for depth, p in enumerate(parts[:-1]):
            cur = node.get(p)
            if isinstance(cur, str):
                cur = {"name": cur}
            elif cur is None:
                cur = {}
            elif not isinstance(cur, dict):
                where = ".".join(parts[:depth + 1])
                raise ConfigError(f"--set {key.strip()}: {where} is {cur!r}, not a mapping, so it has no field "
                                  f"{parts[depth + 1]!r}; set {where}=VALUE instead")
            node[p] = cur
            node = cur
        node[parts[-1]] = value
    return out


def _parse_value(key: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; the user meant a number
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and any(c in value for c in "eE"):
            return number
    return value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
