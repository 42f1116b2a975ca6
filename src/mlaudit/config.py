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


# Bounds on what a YAML text may hold, checked while it is read (before aliases are expanded into
# Python objects or validated): a config is a few hundred nodes; these leave generous room.
MAX_CONFIG_BYTES = 2 * 2**20  # size of a config file
MAX_SET_BYTES = 64 * 2**10  # size of one --set value
MAX_ALIASES = 1000  # alias uses (*name) in one document
MAX_NODES = 200_000  # nodes once every alias is expanded (a "billion laughs" bomb is refused here)
MAX_DEPTH = 100  # nesting of mappings and sequences
MAX_KEY_PARTS = 20  # dotted parts of one --set key


class YamlBoundsError(Exception):
    """A YAML text over one of the bounds above (message says which, and where)."""


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's pure-Python reader, scanner and parser (events only)."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


try:  # libyaml's parser for speed (events only), with the Python composer (which counts) on top
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _Parser = _PyParser  # type: ignore[assignment,misc]


class BoundedSafeLoader(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """PyYAML's safe loader that counts while composing, before anything is expanded or built:
    alias uses (:data:`MAX_ALIASES`), nodes after alias expansion (:data:`MAX_NODES`, each node
    records the expanded size of its subtree, so an alias costs the size of what it names) and
    nesting depth (:data:`MAX_DEPTH`). Going over a bound raises ``YamlBoundsError`` at once."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        yaml.composer.Composer.__init__(self)
        self._aliases = 0
        self._depth = 0

    def _where(self) -> str:
        mark = getattr(self.peek_event(), "start_mark", None)
        return f" (at line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlBoundsError(f"uses more than {MAX_ALIASES} aliases (*name){self._where()}; "
                                      "a config needs few")
            return super().compose_node(parent, index)  # the anchored node itself, already counted
        if self.check_event(yaml.ScalarEvent):
            node = super().compose_node(parent, index)
            node.mlaudit_size = 1
            return node
        if self._depth >= MAX_DEPTH:
            raise YamlBoundsError(f"nests mappings/lists deeper than {MAX_DEPTH} levels{self._where()}")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(_size(k) + _size(v) for k, v in node.value)
        else:
            size = 1 + sum(_size(v) for v in node.value)
        if size > MAX_NODES:
            raise YamlBoundsError(f"expands to more than {MAX_NODES} values once its aliases (*name) are expanded"
                                  f"{self._where()}; a YAML alias bomb?")
        node.mlaudit_size = size
        return node


def _size(node: Any) -> int:
    return getattr(node, "mlaudit_size", 1)


def bounded_safe_load(text: str) -> Any:
    """``yaml.safe_load`` within the bounds above; raises ``YamlBoundsError``, ``yaml.YAMLError`` or, for
    values Python refuses (an int of more than 4300 digits, a date such as 2001-13-45), ValueError."""
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, oversized, non-UTF-8 or unparsable file, a YAML text over the
    bounds (aliases, expanded size, depth: see :class:`BoundedSafeLoader`) or a non-mapping is a
    ConfigError, raised before the document is expanded."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config path {str(p)!r} is not a file; give the path of a YAML config file")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; "
                              "a config is a short YAML text file")
        data = bounded_safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; a config is a YAML text file") from None
    except YamlBoundsError as e:
        raise ConfigError(f"config file {str(p)!r} {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"config file {str(p)!r} holds a value that cannot be read: {e}") from None
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
            raise ConfigError(f"--set expects key=value (e.g. recipe.epochs=2), got {_shown(a)}")
        key, raw = a.split("=", 1)
        parts = [k.strip() for k in key.strip().split(".")]
        if not key.strip() or any(not p for p in parts):
            raise ConfigError(f"--set expects key=value with a dotted key such as recipe.epochs, got {_shown(a)}")
        if len(parts) > MAX_KEY_PARTS:
            raise ConfigError(f"--set {_shown(key)}: the key has {len(parts)} dotted parts; at most {MAX_KEY_PARTS} "
                              "are allowed")
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
    if len(raw) > MAX_SET_BYTES:
        raise ConfigError(f"--set {key}: the value is {len(raw)} characters long; at most {MAX_SET_BYTES} are allowed")
    try:
        value = bounded_safe_load(raw)
    except YamlBoundsError as e:
        raise ConfigError(f"--set {key}: the value {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {_shown(raw)} is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"--set {key}: value {_shown(raw)} cannot be read: {e}") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; the user meant a number
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and any(c in value for c in "eE"):
            return number
    return value


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
