"""The bring-your-own example scripts (examples/byo/) run as a user runs them and print their result.

Each defines its own nn.Module, dataset and plain training function and calls one public entry point;
the DP-audit script is run twice: its correct DP-SGD is not refuted, its deliberately broken one is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BYO = Path(__file__).resolve().parents[1] / "examples" / "byo"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BYO / script), *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize(("script", "expect"), [
    # the two longest scripts (~12 s each on 2 cores) run in make test-all only
    pytest.param("membership_lira.py", r"lira-online: AUC 0\.\d+, TPR at 1% FPR 0\.\d+", marks=pytest.mark.slow),
    pytest.param("witches_brew.py", r"poison success: \{'mean': [\d.]+, 'se': [\d.]+, 'n': 2\}",
                 marks=pytest.mark.slow),
    pytest.param("text_inversion.py", r"4 user\(s\): [\d.]+% of \(token, position\) pairs, [\d.]+% of tokens",
                 marks=pytest.mark.slow),  # ~11 s on 2 cores
    ("availability.py", r"'poisoned_accuracy': \{'mean'"),
    ("epsilon.py", r"rdp: sigma 1\.1, q 0\.00512, 5859 steps -> epsilon 1\.99"),
])
def test_byo_example(script: str, expect: str, tmp_path: Path) -> None:
    out = run(script, str(tmp_path / "run"))
    assert re.search(expect, out), out
    if script != "epsilon.py":
        assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.slow  # ~23 s on 2 cores (two DP audits); make test-all runs it
def test_byo_dp_audit_refutes_only_the_broken_trainer(tmp_path: Path) -> None:
    assert "refuted: False" in run("dp_audit.py", str(tmp_path / "ok"))
    assert "refuted: True" in run("dp_audit.py", str(tmp_path / "broken"), "broken")
