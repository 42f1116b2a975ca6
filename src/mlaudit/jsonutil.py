"""Strict JSON for results, the run store and reports.

Non-finite floats become the strings "NaN", "Infinity" and "-Infinity" (strict JSON has no such
numbers); :func:`loads` turns them back into floats. numpy / torch values, pydantic models,
dataclasses and paths are converted to plain data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_jsonable(obj: Any, _where: str = "value") -> Any:
    """Convert ``obj`` to strict-JSON types (see module docstring); raises ConfigError otherwise."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{_where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, _where) for v in sorted(obj, key=repr)]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):  # pydantic models
        return to_jsonable(obj.model_dump(mode="json"), _where)
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj), _where)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist(), _where)
    if hasattr(obj, "__float__"):
        return to_jsonable(float(obj), _where)
    raise ConfigError(f"{_where}: cannot store an object of type {type(obj).__name__} as JSON; "
                      "use numbers, strings, lists and dicts")


def dumps(obj: Any, *, where: str = "value") -> str:
    """Strict JSON text of ``obj`` (keys sorted, non-finite floats as strings); ``where`` names it in errors."""
    return json.dumps(to_jsonable(obj, where), sort_keys=True, allow_nan=False, separators=(",", ":"))


def _restore(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def loads(text: str | None, *, restore: bool = True) -> Any:
    """Parse stored JSON; ``restore`` turns "NaN"/"Infinity"/"-Infinity" strings back into floats."""
    if text is None:
        return None
    value = json.loads(text)
    return _restore(value) if restore else value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted names: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def numeric_leaves(d: dict[str, Any]) -> list[tuple[str, float]]:
    """(dotted name, value) of every finite int/float leaf of ``d`` (booleans and text left out), in order;
    what the run exporters (TensorBoard, MLflow) log as scalars."""
    return [(k, float(v)) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys); equal configs have equal hashes."""
    return hashlib.sha256(dumps(config, where="config").encode()).hexdigest()
