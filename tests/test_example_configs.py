"""The examples ship inside the package (mlaudit/examples) and `mlaudit examples` lists and copies them."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.example_configs import copy_examples, examples_root, list_examples
from mlaudit.experiments import experiment_kinds


def test_every_kind_has_a_packaged_example() -> None:
    kinds = {yaml.safe_load((examples_root() / n).read_text())["kind"] for n in list_examples() if n.endswith(".yaml")}
    assert kinds == set(experiment_kinds())
    assert any(n.startswith("byo/") for n in list_examples())
    # the source checkout's examples/ is the same folder
    assert (Path(__file__).resolve().parents[1] / "examples").resolve() == examples_root().resolve()


def test_cli_lists_and_copies(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["examples"])
    assert listed.exit_code == 0 and "membership.yaml" in listed.output
    out = tmp_path / "ex"
    copied = runner.invoke(app, ["examples", "--copy", str(out)])
    assert copied.exit_code == 0, copied.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(list_examples())
    again = runner.invoke(app, ["examples", "--copy", str(out)])
    assert again.exit_code == 2 and "already holds" in again.output
    assert len(copy_examples(out, overwrite=True)) == len(list_examples())
