"""Shared pieces of configuration handling: turning pydantic errors into messages that name
the field, the value and what is allowed; loading YAML; applying ``--set key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError


def format_validation_error(err: ValidationError, *, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got value)`` — names field, value and rule."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        got = e.get("input")
        shown = repr(got) if not isinstance(got, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{loc or '<root>'}: {e['msg']} (got {shown})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (key: value lines), got {type(data).__name__}")
    return data


def apply_overrides(config: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` assignments (value parsed as YAML) to a copy of ``config``.

    A string-valued field that is descended into (``recipe.epochs=2`` where ``recipe: fast``)
    becomes the mapping ``{name: fast, epochs: 2}``, matching the config's short forms.
    """
    out: dict[str, Any] = _deepcopy(config)
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set expects key=value, got {a!r}")
        key, raw = a.split("=", 1)
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ConfigError(f"--set expects key=value, got {a!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
        node = out
        for p in parts[:-1]:
            cur = node.get(p)
            if isinstance(cur, str):
                cur = {"name": cur}
            elif not isinstance(cur, dict):
                cur = {}
            node[p] = cur
            node = cur
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
