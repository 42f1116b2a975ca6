"""Bounded YAML loading (issue 21): alias bombs, deep nesting, oversized files, non-UTF-8 and binary
garbage are refused with a ConfigError in well under a second, before anything is expanded or
written, in a config file, a ``--set`` value and a run folder's config.yaml."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import (
    MAX_ALIASES,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    apply_overrides,
    bounded_safe_load,
    load_yaml,
)
from mlaudit.errors import ConfigError


def laughs(levels: int = 9, width: int = 9, *, flow: bool = False) -> str:
    """The "billion laughs" bomb: ``width ** levels`` strings once expanded (9 ** 9 = 387M), ~430 bytes."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    text = "\n".join(lines) + "\n"
    return "{" + text.replace("\n", ", ").rstrip(", ") + "}" if flow else text


BOMB = laughs()
GOOD = "kind: train\nmodel: mlp\ndataset: digits\nrecipe: {name: fast, epochs: 1}\ntrials: 1\n"


def refused(text: str | bytes, tmp_path: Path, match: str) -> float:
    """Write ``text`` as a config file, assert load_yaml refuses it with ``match``; returns seconds."""
    p = tmp_path / "c.yaml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        load_yaml(p)
    return time.perf_counter() - t


def test_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    assert len(BOMB) < 500
    for text in (BOMB, laughs(flow=True), laughs(levels=30, width=2)):
        secs = refused(text, tmp_path, r"expands to more than 200000 values once its aliases.*alias bomb")
        assert secs < 0.5, secs


def test_many_aliases_are_refused(tmp_path: Path) -> None:
    ok = "a: &x 1\nb: [" + ",".join(["*x"] * MAX_ALIASES) + "]\n"
    p = tmp_path / "ok.yaml"
    p.write_text(ok)
    assert load_yaml(p)["b"] == [1] * MAX_ALIASES
    refused("a: &x 1\nb: [" + ",".join(["*x"] * (MAX_ALIASES + 1)) + "]\n", tmp_path,
            rf"uses more than {MAX_ALIASES} aliases \(\*name\) \(at line 2")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 600, 5000])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path: Path, depth: int) -> None:
    deep = rf"deeper than {MAX_DEPTH} levels|exceeded maximum nesting depth"  # (libyaml's own bound: 1000)
    assert refused("a: " + "[" * depth + "]" * depth, tmp_path, deep) < 0.5
    block = "a:\n" + "".join(" " * (i + 1) + "- \n" for i in range(min(depth, 900)))
    refused(block, tmp_path, deep)
    refused("a: " + "{b: " * depth + "1" + "}" * depth, tmp_path, deep)


def test_nesting_up_to_the_bound_loads(tmp_path: Path) -> None:
    p = tmp_path / "deep.yaml"
    p.write_text("[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH)
    with pytest.raises(ConfigError, match="must hold a mapping"):  # loads, and is then refused as a list
        load_yaml(p)


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = "a: [" + "1," * (MAX_CONFIG_BYTES // 2) + "1]\n"
    assert refused(big, tmp_path, r"larger than 2 MiB") < 0.5


@pytest.mark.parametrize("raw, match", [
    (b"kind: train\nname: \xff\xfe caf\xe9\n", "not UTF-8 text"),
    (random.Random(0).randbytes(4096), "not UTF-8 text|not valid YAML"),
    (b"kind: train\x00\x01\x02\n", "not valid YAML"),
    (b"\x1b[2Jkind: train\n", "not valid YAML"),
    ("n: " + "9" * 5000 + "\n", "cannot be read: Exceeds the limit"),
    ("d: 2001-13-45\n", "cannot be read: month must be in 1..12"),
    ("a: !!python/object/apply:os.system [echo pwned]\n", "not valid YAML"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
])
def test_garbage_is_a_config_error(tmp_path: Path, raw: str | bytes, match: str) -> None:
    refused(raw, tmp_path, match)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.lists(st.sampled_from(["a:", " ", "\n", "- ", "[", "]", "{", "}", "&x ", "*x", ",", "<<: ",
                                           "!!set ", "? ", "'", '"', "1", "|", "\t"]), max_size=80).map("".join)))
def test_fuzzed_bytes_load_or_give_a_config_error(tmp_path: Path, raw: bytes | str) -> None:
    p = tmp_path / "f.yaml"
    p.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    try:
        assert isinstance(load_yaml(p), dict)
    except ConfigError:
        pass


def test_the_bounded_loader_reads_what_yaml_safe_load_reads() -> None:
    for text in [GOOD, "x: &x {a: 1, b: [1, 2]}\ny: *x\nz: {<<: *x, c: 3}\n", "!!set {a, b}", "d: 2001-12-14",
                 "- !!binary aGVsbG8=", "[1, 2.5, .inf, null, yes, 0x1f, 1e3, ~]", "'a': |\n  multi\n  line\n"]:
        assert bounded_safe_load(text) == yaml.safe_load(text), text


def test_set_values_are_bounded() -> None:
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"--set recipe: the value expands to more than 200000 values"):
        apply_overrides({}, ["recipe=" + laughs(flow=True)])
    assert time.perf_counter() - t < 0.5
    with pytest.raises(ConfigError, match=rf"--set a: the value nests mappings/lists deeper than {MAX_DEPTH}"):
        apply_overrides({}, ["a=" + "[" * 300 + "]" * 300])
    with pytest.raises(ConfigError, match=r"--set a: the value is 70000 characters long; at most 65536"):
        apply_overrides({}, ["a=" + "x" * 70000])
    with pytest.raises(ConfigError, match=r"the key has 500 dotted parts; at most 20"):
        apply_overrides({}, [".".join(["k"] * 500) + "=1"])
    with pytest.raises(ConfigError, match=r"--set n: value '9+'\.\.\. cannot be read: Exceeds the limit"):
        apply_overrides({}, ["n=" + "9" * 5000])
    assert apply_overrides({"recipe": "fast"}, ["recipe.epochs=2"]) == {"recipe": {"name": "fast", "epochs": 2}}


def cli(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("how", ["file", "set", "resume"])
def test_the_cli_refuses_a_bomb_with_exit_2_and_writes_nothing(tmp_path: Path, how: str) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BOMB if how == "file" else GOOD)
    args: list[str | Path] = ["run", cfg, "--out", out, "--store", db, "--device", "cpu"]
    if how == "set":
        args += ["--set", "recipe=" + laughs(flow=True)]
    if how == "resume":
        out.mkdir()
        (out / "config.yaml").write_text(BOMB)
        args = ["run", "--resume", out, "--store", db, "--device", "cpu"]
    t = time.perf_counter()
    r = cli(*args)
    assert time.perf_counter() - t < 5
    assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
    assert "alias" in r.output and "Traceback" not in r.output  # type: ignore[attr-defined]
    assert not db.exists() and not Path(os.environ["MLAUDIT_STORE"]).exists()  # nor the default store
    assert not out.exists() if how != "resume" else sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_bomb_in_the_run_folder_is_not_expanded(tmp_path: Path) -> None:
    """check_out_dir reads an existing folder's config.yaml with the same bounds (a different run)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(BOMB)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD)
    t = time.perf_counter()
    r = cli("run", cfg, "--out", out, "--store", tmp_path / "runs.db", "--device", "cpu")
    assert time.perf_counter() - t < 5
    assert r.exit_code == 2 and "already holds a different run" in r.output  # type: ignore[attr-defined]


def test_the_bounds_hold_without_libyaml() -> None:
    """With PyYAML's pure-Python parser (no libyaml) the same composer counts the same way."""
    code = ("import sys; sys.modules['yaml._yaml'] = None\n"
            "from mlaudit.config import _Parser, _PyParser, bounded_safe_load, YamlBoundsError\n"
            "assert _Parser is _PyParser\n"
            f"assert bounded_safe_load({GOOD!r}) == {yaml.safe_load(GOOD)!r}\n"
            "for t in (" + repr(BOMB) + ", 'a: ' + '[' * 200 + ']' * 200):\n"
            "    try:\n        bounded_safe_load(t)\n        raise SystemExit('not refused')\n"
            "    except YamlBoundsError as e:\n        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "alias bomb" in r.stdout and "deeper than 100 levels" in r.stdout
