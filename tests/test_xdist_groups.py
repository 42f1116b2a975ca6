"""``make test`` runs two pytest-xdist workers with ``--dist loadgroup`` and relies on its groups: the tests that
start a Ray cluster (grouped by ``tests/conftest.py``) and those that run a gRPC server (``xdist_group("flower")``)
must never run at once. Groups failed silently twice: pytest 9.2.0 stopped xdist's node-id suffix from taking
effect (pytest-dev/pytest-xdist#1386), and the conftest hook added the Ray group after xdist had read the node
ids. This runs the suite's own hook on a throwaway suite under two workers and checks each group stays on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

CONFTEST = Path(__file__).with_name("conftest.py")

SUITE = '''
import json, os, time
import pytest

def _log(name):
    with open(os.path.join(os.environ["GROUPS_OUT"], name), "w") as f:
        json.dump(os.environ.get("PYTEST_XDIST_WORKER"), f)
    time.sleep(0.3)

@pytest.mark.ray
@pytest.mark.parametrize("i", range(4))
def test_ray(i): _log(f"ray{i}")

@pytest.mark.xdist_group("flower")
@pytest.mark.parametrize("i", range(4))
def test_flower(i): _log(f"flower{i}")

@pytest.mark.parametrize("i", range(4))
def test_free(i): _log(f"free{i}")
'''


def test_groups_stay_on_one_worker(tmp_path: Path) -> None:
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir()
    out.mkdir()
    (suite / "conftest.py").write_text(CONFTEST.read_text())  # the suite's own hooks
    (suite / "test_groups.py").write_text(SUITE)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    ray: test\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                          "no:cacheprovider", str(suite)], cwd=suite, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GROUPS_OUT": str(out)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    where = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert len(where) == 12 and set(where.values()) <= {"gw0", "gw1"}
    assert len({where[f"ray{i}"] for i in range(4)}) == 1, where
    assert len({where[f"flower{i}"] for i in range(4)}) == 1, where
