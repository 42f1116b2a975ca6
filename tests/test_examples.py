"""Every example config in examples/ validates (the CPU ones are run by the CLI tests' twins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlaudit.config import load_yaml
from mlaudit.experiments import experiment_kinds, parse_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path: Path) -> None:
    cfg = parse_config(load_yaml(path))
    assert cfg.kind in experiment_kinds()
