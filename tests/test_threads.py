"""``--threads`` / ``MLAUDIT_THREADS``: torch's CPU thread count for a run (mlaudit.threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.errors import ConfigError
from mlaudit.threads import ENV, configure_threads, default_threads


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "want"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (128, 8)])
def test_default_is_one_thread_on_small_machines_and_half_the_cores_above(cores: int, want: int) -> None:
    assert default_threads(cores) == want


def test_explicit_value_beats_the_environment_which_beats_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "2")
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert configure_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv(ENV)
    assert configure_threads() == default_threads()


@pytest.mark.parametrize("raw", ["two", "1.5"])
def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ENV, raw)
    with pytest.raises(ConfigError, match=ENV):
        configure_threads()
    with pytest.raises(ConfigError, match=">= 1"):
        configure_threads(0)


def test_cli_rejects_zero_threads_before_any_work(tmp_path) -> None:  # noqa: ANN001
    res = CliRunner().invoke(app, ["run", "--threads", "0", "--out", str(tmp_path / "r"), "nothing.yaml"])
    assert res.exit_code == 2 and "threads" in res.output
    assert not (tmp_path / "r").exists()
