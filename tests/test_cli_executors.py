"""`mlaudit run CONFIG --executor local|process|ray` from the command line: the same config and
seed give the same metrics under every executor (the factory issue's contract). Ray runs as a
local 2-CPU cluster started by the CLI process (bound to 127.0.0.1) and ends with it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CONFIG = {"kind": "train", "name": "executors", "seed": 3, "trials": 4, "model": {"name": "mlp", "width": 16},
          "dataset": {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [10]}},
          "recipe": {"name": "fast", "epochs": 2, "batch_size": 32}, "factory": {"max_chunk": 2}}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without the RAY_* variables an in-process Ray (other tests) may
    have set, e.g. a token-auth mode that would make `ray start` ask for a token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run_cli(tmp_path: Path, executor: str) -> dict:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    exe = Path(sys.executable).parent / "mlaudit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlaudit.cli"]
    out = tmp_path / f"out-{executor}"
    env = clean_env(tmp_path)
    proc = subprocess.run([*cmd, "run", str(cfg), "--out", str(out), "--device", "cpu", "--quiet",
                           "--store", str(tmp_path / "runs.db"), "--executor", executor],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_local_and_process_executors_give_the_same_metrics(tmp_path: Path) -> None:
    local, proc = run_cli(tmp_path, "local"), run_cli(tmp_path, "process")
    assert proc["executor"] == "process" and local["executor"] == "local"
    assert proc["metrics"] == local["metrics"]
    assert [t["test_accuracy"] for t in proc["trials"]] == [t["test_accuracy"] for t in local["trials"]]
    assert proc["cost"]["models_trained"] == 4


@pytest.mark.slow  # ~20-25 s each on 2 cores (a Ray start per test); make test-all runs them
@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the optional ray extra")
def test_ray_executor_from_the_cli_matches_local(tmp_path: Path) -> None:
    local, ray = run_cli(tmp_path, "local"), run_cli(tmp_path, "ray")
    assert ray["executor"] == "ray"
    assert ray["metrics"] == local["metrics"]
    assert [t["test_accuracy"] for t in ray["trials"]] == [t["test_accuracy"] for t in local["trials"]]


@pytest.mark.slow  # ~20-25 s each on 2 cores (a Ray start per test); make test-all runs them
@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the optional ray extra")
def test_ray_executor_connects_to_a_running_cluster(tmp_path: Path) -> None:
    """`--ray-address` joins an existing cluster (here a 2-CPU head started on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = Path(sys.executable).parent / "ray"
    env = clean_env(tmp_path)
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        local = run_cli(tmp_path, "local")
        cfg = tmp_path / "cfg.yaml"
        exe = Path(sys.executable).parent / "mlaudit"
        out = tmp_path / "out-cluster"
        proc = subprocess.run([str(exe), "run", str(cfg), "--out", str(out), "--device", "cpu", "--quiet",
                               "--store", str(tmp_path / "runs.db"), "--executor", "ray",
                               "--ray-address", f"127.0.0.1:{port}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        remote = json.loads((out / "results.json").read_text())
        assert remote["executor"] == "ray" and remote["metrics"] == local["metrics"]
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
