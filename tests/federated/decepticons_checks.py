"""Checks shared by the text attacks' tests: a run through Flower against the simulated one (Decepticons), and bad
input refused before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment

COUNTS = ("users", "occurrences", "in_sequence", "whole", "merged", "bag_of_tokens_recall")
BINS = ("nonempty_bins", "rejected")
"""Bin counts: a bin whose aggregated gradient sits at the emptiness threshold can fall either side when the two
transports sum the same updates in another order (float rounding). On a 2-core x86 CPU with torch 2.13.0+cpu
(2026-12-05) one row read 116 / 77 simulated and 115 / 76 through Flower, the recovered tokens the same."""


def same_counts(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    """Every per-users row of the two runs' metrics holds the same recovery counts and the same recovered pairs and
    tokens; the bin counts agree within one bin in fifty (at least 2: rounding at the threshold, see :data:`BINS`)."""
    for s, f in zip(sim["decepticons"]["per_users"], fl["decepticons"]["per_users"], strict=True):
        assert {k: f[k] for k in COUNTS} == {k: s[k] for k in COUNTS}
        for k in BINS:
            assert abs(f[k] - s[k]) <= max(2, 0.02 * s[k]), (k, s[k], f[k])
        assert (f["pairs"]["k"], f["tokens"]["k"]) == (s["pairs"]["k"], s["tokens"]["k"])


def same_defence(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    """The client defence's metrics agree between the runs, and the defence cost the attack something."""
    ds, df = sim["defence"], fl["defence"]
    assert (df["with"]["k"], df["without"]["k"]) == (ds["with"]["k"], ds["without"]["k"])
    assert df["without"]["k"] > df["with"]["k"]
    assert df["update_distortion"]["mean"] == pytest.approx(ds["update_distortion"]["mean"], rel=1e-3)


def refused_before_anything_is_written(config: dict[str, Any], root: Path, words: list[str], kept: str) -> None:
    """``config`` (written to ``root``/bad.yaml) exits 2 through the CLI with every one of ``words`` on stderr and no
    traceback, raises ConfigError through the library, and leaves ``root`` holding only bad.yaml and ``kept``."""
    path = root / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(root / "out"), "--device", "cpu",
                                   "--store", str(root / "runs.db")])
    missing = [w for w in words if w not in res.stderr]
    assert (res.exit_code, missing, "Traceback" in res.output) == (2, [], False), res.output
    with pytest.raises(ConfigError):
        run_experiment(load_yaml(path), out=root / "lib", device="cpu", store=root / "lib.db", quiet=True)
    assert sorted(p.name for p in root.iterdir() if p.name != "__pycache__") == ["bad.yaml", kept]
