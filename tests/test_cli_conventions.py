"""CLI conventions and terminal output (issue 21): control characters escaped in everything printed,
--version / -h / python -m mlaudit, no <bool> metavars, help rewrapped, the resume hint with --store,
the `runs list` headline column in 80 columns; packaging metadata."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mlaudit import __version__
from mlaudit.cli import app
from mlaudit.headline import headline
from mlaudit.store import RunStore
from mlaudit.termsafe import safe, safe_json

ROOT = Path(__file__).resolve().parents[1]
EVIL = "ev\x1b[31mil\x07\x9b2J\x7f\u202e"
TINY: dict[str, Any] = {"kind": "train", "name": EVIL, "seed": 0, "trials": 1, "model": "mlp",
                        "dataset": {"name": "synthetic", "options": {"n_train": 64, "n_test": 32, "shape": [8]}},
                        "recipe": {"name": "fast", "epochs": 1, "batch_size": 32}}
RAW = ("\x1b", "\x07", "\x9b", "\x7f", "\u202e")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLAUDIT_STORE", str(tmp_path / "home" / "default.db"))
    monkeypatch.setenv("COLUMNS", "80")
    yield


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean(text: str) -> None:
    for c in RAW:
        assert c not in text, (c, text)


def test_safe_escapes_control_characters() -> None:
    assert safe("a\x1b[31mb\x07") == "a\\x1b[31mb\\x07"
    assert safe("x\x9by\x7fz\u202e\u2066") == "x\\x9by\\x7fz\\u202e\\u2066"
    assert safe("line\n\ttab\r") == "line\n\ttab\\x0d"
    assert safe("line\n\ttab", oneline=True) == "line\\x0a\\x09tab"
    assert safe("naïve ± ε 🙂 C:\\path") == "naïve ± ε 🙂 C:\\path"
    text = safe_json({"name": EVIL})
    assert_clean(text)
    assert json.loads(text) == {"name": EVIL}


def test_run_summary_list_show_export_and_errors_escape_the_name(tmp_path: Path) -> None:
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    db = tmp_path / "runs.db"
    res = cli("run", cfg, "--out", tmp_path / "out", "--device", "cpu", "--store", db)
    assert res.exit_code == 0, res.output
    assert_clean(res.output)
    assert "ev\\x1b[31mil\\x07" in res.stdout
    exp_id = json.loads((tmp_path / "out" / "results.json").read_text())["experiment_id"]
    for args in (("runs", "list"), ("runs", "list", "--wide")):
        res = cli(*args, "--store", db)
        assert res.exit_code == 0 and exp_id in res.stdout, res.output
        assert_clean(res.output)
        assert "ev\\x1b" in res.stdout
    for cmd in ("show", "export"):
        res = cli("runs", cmd, exp_id, "--store", db)
        assert res.exit_code == 0, res.output
        assert_clean(res.output)
        assert json.loads(res.stdout)["name"] == EVIL  # still strict JSON, same value
    res = cli("runs", "show", "\x1b]0;owned\x07", "--store", db)
    assert res.exit_code == 2 and "\\x1b]0;owned\\x07" in res.stderr
    assert_clean(res.output)
    res = cli("run", cfg, "--out", tmp_path / "o2", "--device", "cpu", "--store", db, "--set", "recipe=\x1b[2J")
    assert res.exit_code == 2 and "\\x1b[2J" in res.stderr
    assert_clean(res.output)


def test_version_and_python_m() -> None:
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout == f"mlaudit {__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "mlaudit", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"mlaudit {__version__}\n", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mlaudit", "-h"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "runs" in proc.stdout


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


@pytest.mark.parametrize("path", list(_commands(typer.main.get_command(app))), ids=" ".join)
def test_every_help_takes_h_has_no_bool_metavar_and_is_rewrapped(path: tuple[str, ...]) -> None:
    long, short = cli(*path, "--help"), cli(*path, "-h")
    assert long.exit_code == 0 and short.exit_code == 0 and short.stdout == long.stdout
    text = long.stdout
    assert "Usage:" in text and "<bool>" not in text and "-h, --help" in text
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    # description paragraphs: a line that a lowercase word continues was wrapped there, so it is long
    body = lines[: next((i for i, ln in enumerate(lines) if ln.endswith(":") and i > 0), len(lines))]
    for a, b in zip(body, body[1:]):
        if a.strip() and re.match(r"^\s+[a-z]", b):
            assert len(a) >= 50, f"wrapped mid-sentence after {a!r}:\n{text}"


def _failing_run(tmp_path: Path, *store: str | Path) -> Any:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "fails", "recipe": {"name": "fast", "epochs": 3, "lr": 1e30}}))
    return cli("run", cfg, "--out", tmp_path / "my out", "--device", "cpu", "-q", *store)


def test_resume_hint_after_a_failure_names_the_store(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    res = _failing_run(tmp_path, "--store", db)
    assert res.exit_code == 1, res.output
    assert f"`mlaudit run --resume '{tmp_path / 'my out'}' --store {db}`" in res.stderr
    (tmp_path / "again").mkdir()
    res = _failing_run(tmp_path / "again")  # the default store: no --store in the hint
    assert res.exit_code == 1 and "--resume" in res.stderr and "--store" not in res.stderr


def test_resume_hint_after_an_interrupt_names_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlaudit.experiments as experiments

    def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "run_experiment", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    res = cli("run", cfg, "--out", tmp_path / "o", "--store", tmp_path / "s.db")
    assert res.exit_code == 130
    assert f"continue with `mlaudit run --resume {tmp_path / 'o'} --store {tmp_path / 's.db'}`" in res.stderr


METRICS: dict[str, tuple[dict[str, Any], str]] = {
    "train": ({"test_accuracy.mean": 0.9124, "test_accuracy.se": 0.0031, "test_accuracy.n": 4}, "acc 91.2% ±0.3"),
    "membership-inference": ({"loss.tpr_at_fpr.0.001.value": 0.0016, "lira-online.tpr_at_fpr.0.001.value": 0.022,
                              "lira-online.tpr_at_fpr.0.01.value": 0.06, "target.loss.tpr_at_fpr.0.001.value": 0.9},
                             "tpr@0.1% 2.20% lira-online"),
    "dp-audit": ({"epsilon_lower_bound": 1.8389, "claimed_epsilon": 0.897, "claim_refuted": True},
                 "eps>=1.84 > claim 0.897"),
    "targeted-poison": ({"poison_success.mean": 0.5, "poison_success.se": 0.25}, "success 50.0% ±25.0"),
    "availability-poison": ({"poisoned_accuracy.mean": 0.2166, "drop.mean": 0.7091}, "acc 21.7% drop 70.9"),
    "indiscriminate-poison": ({"poisoned_accuracy.mean": 0.81, "drop.mean": 0.02, "drop.se": 0.01},
                              "acc 81.0% drop 2.0"),
    "robustness": ({"worst_case_at_max_eps.value": 0.5525, "worst_case_at_max_eps.eps": 8 / 255},
                   "robust 55.2% @eps 0.0314"),
    "certify": ({"certified_at_radius.value": 0.6012, "certified_at_radius.radius": 0.25}, "cert 60.1% @r 0.25"),
    "backdoor": ({"attack_success_rate.mean": 0.9845, "attack_success_rate.se": 0.0062, "clean_accuracy.mean": 0.979},
                 "asr 98.5% ±0.6 acc 97.9%"),
    "federated": ({"recovered.k": 37, "recovered.n": 64, "secure_aggregation": True}, "recovered 37/64 via secagg"),
    "defend": ({"attack_success.no_defence.mean": 0.978, "attack_success.defence.mean": 0.031,
                "removal.poisons_removed": 41, "removal.poisons": 43}, "asr 98%->3% rm 41/43"),
}


@pytest.mark.parametrize("kind", list(METRICS))
def test_headline_per_kind(kind: str) -> None:
    metrics, text = METRICS[kind]
    assert headline(kind, metrics) == text
    assert headline(kind, {}) is None


def test_headline_edge_cases() -> None:
    assert headline("dp-audit", {"epsilon_lower_bound": 0.0, "claimed_epsilon": 2.0, "claim_refuted": False}) == \
        "eps>=0 <= claim 2"
    assert headline("membership-inference", {"loss.tpr_at_fpr.0.01.value": 0.1, "loss.tpr_at_fpr.1e-05.value": 0.0}) \
        == "tpr@0.001% 0.00% loss"  # 0.1% not computed: the smallest FPR target
    long = headline("membership-inference", {"a-very-long-attack-name.tpr_at_fpr.0.001.value": 0.5})
    assert long is not None and len(long) <= 26 and long.endswith("…")
    assert headline("train", {"test_accuracy.mean": 0.5, "test_accuracy.se": float("nan")}) == "acc 50.0%"
    assert headline("user-kind", {"x": 1}) is None


def test_runs_list_fits_80_columns_with_a_headline_per_kind(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db)
    for kind, (metrics, _) in METRICS.items():
        exp = store.create_experiment(kind=kind, name=f"{kind}-a-rather-long-run-name-{'x' * 40}", config={},
                                      out_dir=tmp_path / kind)
        store.put_metrics(exp, metrics)
        store.set_status(exp, "done")
    store.create_experiment(kind="train", name="still going", config={}, out_dir=tmp_path / "r")
    res = cli("runs", "list", "--store", db)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 2 + len(METRICS) + 1 and all(len(line) <= 80 for line in lines), res.stdout
    for _, text in METRICS.values():
        assert text in res.stdout
    assert "running" in res.stdout and "…" in res.stdout


def test_packaging_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "urls" not in project  # no public address exists yet; add it when one does, never a guess
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])
    assert not any("License ::" in c for c in project["classifiers"])  # PEP 639: the SPDX string only
    assert "configs/*.yaml" not in meta["tool"]["setuptools"]["package-data"]["mlaudit"]
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text) > 10_000
    assert "download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()
