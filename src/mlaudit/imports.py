"""Import strings: how a config names the user's own code (``package.module:attribute``).

A config's ``model``, ``dataset`` and ``trainer`` accept, besides mlaudit's registered names, a string
``"package.module:attr"`` (``attr`` may be dotted, ``"pkg.mod:Outer.factory"``). The string, not
the object, is what travels to process and Ray workers; each worker imports it again.

**A config with import strings runs code**: importing a module executes it, as Hydra's
``_target_`` does. mlaudit therefore imports only after the rest of the config has validated (in the
runner's preflight, never inside a pydantic validator), and ``MLAUDIT_NO_IMPORTS=1`` (or
``allow=False``) refuses every import string, for configs from sources you do not trust.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

IMPORT_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``package.module:attr`` with Python identifiers on both sides (``attr`` may be dotted)."""
NO_IMPORTS_ENV = "MLAUDIT_NO_IMPORTS"


def is_import_string(value: object) -> bool:
    """True for a string of the form ``package.module:attr``."""
    return isinstance(value, str) and bool(IMPORT_PATTERN.match(value))


def imports_allowed() -> bool:
    """False when ``MLAUDIT_NO_IMPORTS`` is set to a true value (configs from untrusted sources)."""
    return os.environ.get(NO_IMPORTS_ENV, "").strip().lower() not in {"1", "true", "yes", "on"}


def resolve_import(spec: str, *, what: str) -> Any:
    """Import ``"package.module:attr"`` and return the attribute.

    ``what`` names the config field (``model``, ``dataset``, ``trainer``) for the error. Raises
    :class:`ConfigError` saying whether the string is malformed, imports are switched off, the module
    does not import (with the underlying error) or the attribute is missing.
    """
    if not is_import_string(spec):
        raise ConfigError(f"{what} = {spec!r} is not an import string; write 'package.module:attribute' "
                          "(Python identifiers, the attribute after the colon)")
    if not imports_allowed():
        raise ConfigError(f"{what} = {spec!r} would import and run user code, but {NO_IMPORTS_ENV} is set "
                          "(imports from configs are switched off); unset it to allow import strings")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing is the user's module's
        raise ConfigError(f"{what} {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); "
                          "make it importable (install it, or put its folder on PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_string_of(obj: Any, *, what: str) -> str:
    """The import string that resolves to ``obj`` (a function or class defined at a module's top
    level), for the library API: objects given in Python become strings that travel to workers.

    Raises :class:`ConfigError` for lambdas, closures and other objects no import string reaches.
    """
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    spec = f"{mod}:{qual}" if mod and qual else ""
    if "<" in spec or not is_import_string(spec):
        raise ConfigError(f"{what}: {obj!r} cannot be named by an import string (lambdas, closures and objects "
                          "defined inside functions cannot); define it at the top level of a module")
    module = sys.modules.get(mod)  # type: ignore[arg-type]
    found: Any = module
    for part in qual.split("."):  # type: ignore[union-attr]
        found = getattr(found, part, None)
    if found is not obj:
        raise ConfigError(f"{what}: {spec!r} does not resolve to {obj!r}; define it at the top level of a module")
    return spec


def accepted_kwargs(fn: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``fn`` declares as parameters (all of them when it takes
    ``**kwargs``): lets mlaudit pass optional context (``seed``, ``device``, ``num_classes``, ...) only
    to user functions that ask for it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items()
            if k in params and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
