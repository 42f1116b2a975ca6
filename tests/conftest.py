"""Suite-wide test settings.

Torch runs these tiny models single-threaded: on a shared 2-core machine its default thread pool
slows them down by an order of magnitude whenever another process is busy (measured: the contract
config took 61 s with 2 threads and 5 s with 1, same results). Subprocesses inherit
``OMP_NUM_THREADS=1`` for the same reason.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's ~/.mlaudit: HOME, the default run store and the data
    cache point into a fresh temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLAUDIT_STORE", str(home / "default.db"))
    monkeypatch.setenv("MLAUDIT_DATA", str(home / "data"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two workers with ``--dist loadgroup``), every test that
    starts a Ray cluster runs on one worker, one after the other, so two local clusters (which share the
    machine's Ray session folder) are never started at once. (Groups need pytest < 9.2; see pyproject.toml.
    Without ``tryfirst`` xdist read the node ids before this hook added the group, and the Ray tests were
    spread over both workers.)"""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
