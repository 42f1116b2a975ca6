"""``mlaudit demo``: trains the target models on digits (CPU), writes a report and a summary,
resumes when run again, and refuses a folder holding other files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.demo import DEMO_CONFIG, demo_config, run_demo
from mlaudit.errors import ConfigError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the assertion below checks this folder
    yield
    assert not (tmp_path / "home" / ".mlaudit").exists()


def test_demo_cli_full(tmp_path: Path) -> None:
    out, db = tmp_path / "demo", tmp_path / "db" / "runs.db"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--store", str(db), "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{out}\n"
    r = json.loads((out / "train" / "results.json").read_text())
    assert r["config"]["recipe"]["epochs"] == 12 and r["cost"]["models_trained"] == DEMO_CONFIG["trials"]
    assert r["metrics"]["test_accuracy"]["mean"] > 0.85
    assert "demo-digits-mlp" in (out / "train" / "report.html").read_text()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["experiment_id"] == r["experiment_id"]
    assert set(summary["label_flip"]) == {"clean", "10% labels flipped"}
    assert all(0.0 <= a <= 1.0 for a in summary["label_flip"].values())


def test_demo_quick_resumes_and_refuses_foreign_folders(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = run_demo(out=tmp_path / "d", store=db, quiet=True, epochs=1)
    again = run_demo(out=tmp_path / "d", store=db, quiet=True, epochs=1)
    assert again["experiment_id"] == first["experiment_id"] and again["train"] == first["train"]
    assert json.loads((tmp_path / "d" / "train" / "results.json").read_text())["cost"]["models_trained"] == 0
    assert demo_config(epochs=1)["recipe"] == {"name": "fast", "epochs": 1}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds other files"):
        run_demo(out=tmp_path / "busy", store=db, quiet=True, epochs=1)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
