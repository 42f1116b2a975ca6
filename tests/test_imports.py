"""Import strings (``package.module:attr``): parsing, resolution errors, the off switch, and the
names the library API derives from objects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlaudit.errors import ConfigError
from mlaudit.imports import (
    NO_IMPORTS_ENV,
    accepted_kwargs,
    import_string_of,
    is_import_string,
    resolve_import,
)

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@given(st.lists(IDENT, min_size=1, max_size=3), st.lists(IDENT, min_size=1, max_size=2))
def test_dotted_identifiers_are_import_strings(mod: list[str], attr: list[str]) -> None:
    assert is_import_string(f"{'.'.join(mod)}:{'.'.join(attr)}")


@pytest.mark.parametrize("s", ["mlp", "pkg.mod", "pkg.mod:", ":f", "pkg mod:f", "pkg.mod:f()", "a:b:c", "1pkg:f",
                               "pkg/mod:f", "pkg.mod:f;import os"])
def test_other_strings_are_not(s: str) -> None:
    assert not is_import_string(s)


def test_resolve_names_the_failure() -> None:
    assert resolve_import("collections:OrderedDict.fromkeys", what="model") is not None
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod_xyz'"):
        resolve_import("no_such_mod_xyz:f", what="model")
    with pytest.raises(ConfigError, match="has no attribute 'nothing'"):
        resolve_import("collections:nothing", what="trainer")
    with pytest.raises(ConfigError, match="not an import string"):
        resolve_import("collections.nothing", what="dataset")


def test_imports_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_IMPORTS_ENV, "1")
    with pytest.raises(ConfigError, match=NO_IMPORTS_ENV):
        resolve_import("collections:OrderedDict", what="model")


def top_level(a, *, seed):  # noqa: ANN001, ANN201
    return a


def test_import_string_of_round_trips_and_refuses_closures() -> None:
    spec = import_string_of(top_level, what="trainer")
    assert resolve_import(spec, what="trainer") is top_level
    with pytest.raises(ConfigError, match="top level"):
        import_string_of(lambda x: x, what="trainer")

    def inner() -> None:
        return None

    with pytest.raises(ConfigError, match="top level"):
        import_string_of(inner, what="model")


def test_accepted_kwargs_passes_only_declared_names() -> None:
    assert accepted_kwargs(top_level, {"seed": 1, "device": "cpu"}) == {"seed": 1}
    assert accepted_kwargs(lambda **kw: kw, {"seed": 1, "device": "cpu"}) == {"seed": 1, "device": "cpu"}
