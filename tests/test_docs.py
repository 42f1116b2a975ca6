"""The documentation against the code: every Python block in docs/*.md and README.md parses, its mlaudit imports
resolve and its keyword arguments exist; every relative link reaches its file and heading; every YAML block parses, and one with a ``kind`` is a valid config; every
command shown (``mlaudit ...``, ``python benchmarks/....py``) names a
real command or script and only options it takes. A renamed function, option or flag then fails here instead of
in a reader's terminal. Blocks are read, not run: most are fragments on the reader's own model and data."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from mlaudit.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"] + sorted((ROOT / "examples").rglob("*.md"))
IDS = [str(p.relative_to(ROOT)) for p in DOCS]


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def python_blocks(text: str) -> Iterator[tuple[int, str]]:
    """(first line, source) of each ```python block."""
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        yield _line(text, m.start()) + 1, m.group(1)


def mlaudit_names(tree: ast.AST, where: str, problems: list[str]) -> dict[str, Any]:
    """The objects a block imports from mlaudit, by the name it binds; a failed import is a problem."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlaudit":
            try:
                mod = importlib.import_module(node.module or "")
            except ImportError as e:
                problems.append(f"{where}: from {node.module} import ...: {e}")
                continue
            for a in node.names:
                obj = getattr(mod, a.name, None)
                if obj is None:
                    try:
                        obj = importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        problems.append(f"{where}: {node.module} has no {a.name}")
                        continue
                names[a.asname or a.name] = obj
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mlaudit":
                    try:
                        importlib.import_module(a.name)
                    except ImportError as e:
                        problems.append(f"{where}: import {a.name}: {e}")
                    if a.asname:
                        names[a.asname] = importlib.import_module(a.name)
                    else:
                        names["mlaudit"] = importlib.import_module("mlaudit")
    return names


def _callee(func: ast.expr, names: dict[str, Any]) -> Any:
    """The object a call's ``f`` or ``a.b.f`` names, when it starts at an imported mlaudit name."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id not in names:
        return None
    obj = names[func.id]
    for p in reversed(parts):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def python_problems(path: Path) -> list[str]:
    text = path.read_text()
    problems: list[str] = []
    for first, src in python_blocks(text):
        where = f"{path.name}:{first}"
        try:
            tree = ast.parse(src)
        except SyntaxError as e:
            problems.append(f"{where}: does not parse: {e.msg} (block line {e.lineno})")
            continue
        names = mlaudit_names(tree, where, problems)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            obj = _callee(node.func, names)
            if obj is None or not callable(obj):
                continue
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            for kw in node.keywords:
                if kw.arg is not None and kw.arg not in params:
                    problems.append(f"{path.name}:{first + node.lineno - 1}: {ast.unparse(node.func)}() takes no "
                                    f"keyword {kw.arg!r}")
    return problems


def command_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every line of a fenced block (continuations joined) and every inline code span."""
    for m in re.finditer(r"^```[\w-]*\n(.*?)^```", text, re.S | re.M):
        start = _line(text, m.start()) + 1
        lines = m.group(1).split("\n")
        i = 0
        while i < len(lines):
            j, joined = i, lines[i]
            while joined.endswith("\\") and j + 1 < len(lines):
                j += 1
                joined = joined[:-1] + " " + lines[j].strip()
            yield start + i, joined
            i = j + 1
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        yield _line(prose, m.start()), m.group(1)


def _script_options(src: str) -> set[str]:
    """The options an argparse script defines (``--x`` and, for BooleanOptionalAction, ``--no-x``)."""
    opts = set()
    for m in re.finditer(r"add_argument\(([^)]*)", src):
        found = re.findall(r"[\"'](--?[\w-]+)[\"']", m.group(1))
        opts.update(found)
        if "BooleanOptionalAction" in m.group(1):
            opts.update(f"--no-{o[2:]}" for o in found if o.startswith("--"))
    return opts


SCRIPT = re.compile(r"(?:^|[\s;&(])(?:\S*python3?\s+)?((?:\./)?benchmarks/[\w/]+\.py|examples/[\w/]+\.py)([^;&|#]*)")
COMMAND = re.compile(r"^(?:\$ |\S*/)?mlaudit ((?:[a-z][\w-]*(?:\|[a-z][\w-]*)* ?)+)(.*)$")


def command_problems(path: Path) -> list[str]:
    text = path.read_text()
    root = typer.main.get_command(app)
    problems: list[str] = []
    for line, cmd in command_lines(text):
        where = f"{path.name}:{line}"
        for m in SCRIPT.finditer(cmd):
            script = ROOT / m.group(1).removeprefix("./")
            if not script.exists():
                problems.append(f"{where}: {m.group(1)} does not exist")
                continue
            if script.parts[-2] == "examples" or "examples" in script.parts:
                continue
            opts = _script_options(script.read_text())
            for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)):
                if opt not in opts and opt not in ("--help",):
                    problems.append(f"{where}: {m.group(1)} has no option {opt}")
        # one or more mlaudit commands on the line (two columns of a table of commands: split at wide gaps)
        for seg in re.split(r"\s{3,}", re.sub(r"\s+#.*$", "", cmd.strip())):
            m = COMMAND.match(seg.strip())
            if not m:
                continue
            groups: list[click.Command] = [root]
            for word in m.group(1).split():
                nxt = [c.commands[w] for c in groups if isinstance(c, click.Group)
                       for w in word.split("|") if w in c.commands]
                if not nxt:
                    break
                groups = nxt
            if groups == [root]:
                problems.append(f"{where}: no command 'mlaudit {m.group(1).split()[0]}'")
                continue
            leaves = [c for c in groups if not isinstance(c, click.Group)]
            if not leaves or "|" in m.group(1):  # no leaf, or a notation of alternatives ("list|show ID|export ID")
                continue
            opts = {o for c in leaves for p in c.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
            for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", seg[m.start(1):]):
                if opt not in opts:
                    problems.append(f"{where}: 'mlaudit {' '.join(c.name or '' for c in leaves)}' has no option {opt}")
    return problems


def yaml_problems(path: Path) -> list[str]:
    """YAML blocks that do not parse, and configs (a top-level ``kind``) that do not validate."""
    from mlaudit.experiments import parse_config

    text = path.read_text()
    problems: list[str] = []
    for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
        where = f"{path.name}:{_line(text, m.start()) + 1}"
        try:
            doc = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            problems.append(f"{where}: not YAML: {e}")
            continue
        if isinstance(doc, dict) and "kind" in doc:
            try:
                parse_config(doc)
            except Exception as e:  # ConfigError, or anything else a reader would meet
                problems.append(f"{where}: not a valid config: {type(e).__name__}: {e}")
    return problems


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation other than - and _ dropped,
    spaces as -, and -1, -2, ... on repeats."""
    seen: dict[str, int] = {}
    out = set()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for h in re.findall(r"^#{1,6} (.+?)\s*$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def link_problems(path: Path) -> list[str]:
    """Relative links whose file does not exist or whose #anchor is no heading of the markdown it points to."""
    text = path.read_text()
    problems: list[str] = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        where = f"{path.name}:{_line(text, m.start())}"
        dest = (path.parent / file) if file else path
        if not dest.exists():
            problems.append(f"{where}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where}: {target}: no such heading")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_links_reach_files_and_headings(path: Path) -> None:
    assert link_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_yaml_blocks_parse_and_configs_validate(path: Path) -> None:
    assert yaml_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_python_blocks_parse_import_and_call_what_exists(path: Path) -> None:
    assert python_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_commands_name_real_commands_scripts_and_options(path: Path) -> None:
    assert command_problems(path) == []


def test_the_checks_catch_drift(tmp_path: Path) -> None:
    """A renamed keyword, a missing import, a missing option or script and an invalid config are each reported."""
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nfrom mlaudit.attacks.evasion import pgd, no_such_attack\n"
                   "x_adv = pgd(model, x, y, epsilon=0.1)\n```\n\n"
                   "Run `mlaudit run config.yaml --no-such-flag` or `python benchmarks/no_such.py`, or\n"
                   "`python benchmarks/dp_audit.py CONFIG --no-such-option`; `mlaudit no-such-command`.\n\n"
                   "```yaml\nkind: membership-inference\nmodels: -3\n```\n\n"
                   "# Top\n## Top\n[a](#top-1) [b](#top-2) [c](no_such.md) [d](doc.md#top)\n")
    got = python_problems(doc) + command_problems(doc) + yaml_problems(doc) + link_problems(doc)
    assert any("has no no_such_attack" in p for p in got)
    assert any("pgd() takes no keyword 'epsilon'" in p for p in got)
    assert any("has no option --no-such-flag" in p for p in got)
    assert any("benchmarks/no_such.py does not exist" in p for p in got)
    assert any("dp_audit.py has no option --no-such-option" in p for p in got)
    assert any("no command 'mlaudit no-such-command'" in p for p in got)
    assert any("not a valid config" in p for p in got)
    assert any("#top-2: no such heading" in p for p in got) and any("no_such.md: no such file" in p for p in got)
    assert len(got) == 9
