"""The command line: end-to-end runs, the contract config, exit codes (2 invalid input, 1 failure
during a run), output-folder rules, --set, run-store commands, data/model listings, escaping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app

CONTRACT_YAML = """\
kind: train
name: digits-mlp
dataset: digits            # or a mapping, e.g. {name: cifar10, root: /data}
model: mlp                 # or a mapping, e.g. {name: resnet18, width: 64}
recipe: fast               # or a mapping, e.g. {name: witches-brew, epochs: 40}
trials: 4
seed: 0
"""

TINY: dict[str, Any] = {"kind": "train", "name": "tiny-cli", "seed": 0, "trials": 2, "model": "mlp",
                        "dataset": {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [12]}},
                        "recipe": {"name": "fast", "epochs": 1, "batch_size": 32}}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Work in tmp_path with HOME and the default store there; train single-threaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the assertion below checks this folder
    monkeypatch.setenv("MLAUDIT_STORE", str(tmp_path / "home" / "default.db"))
    yield
    assert not (tmp_path / "home" / ".mlaudit").exists()


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_tiny(cfg: Path, out: Path, *extra: str | Path, store: Path | None = None) -> Any:
    db = store or out.parent / "runs.db"
    return cli("run", cfg, "--out", out, "--device", "cpu", "--store", db, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_contract_config_runs_as_written_in_a_subprocess(tmp_path: Path) -> None:
    (tmp_path / "train.yaml").write_text(CONTRACT_YAML)
    exe = Path(sys.executable).parent / "mlaudit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlaudit.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "run", "train.yaml", "--out", "DIR", "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy" in proc.stdout and "4 models trained" in proc.stdout
    out = tmp_path / "DIR"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "results.json", "report.html", "artifacts"}
    r = json.loads((out / "results.json").read_text())
    acc = r["metrics"]["test_accuracy"]
    assert 0.8 < acc["mean"] <= 1.0 and acc["se"] >= 0 and acc["n"] == 4
    assert len(r["trials"]) == 4 and all(t["test_accuracy"] > 0.8 for t in r["trials"])
    c = r["cost"]
    assert c["models_trained"] == 4 and c["wall_s"] > 0 and c["device"].startswith("cpu")
    assert c["models_per_minute"] > 0 and c["gpu_seconds"] is None and c["peak_gpu_mem_mb"] is None
    # which path the factory took and why, per distinct choice (issue 23, goal 5)
    assert sum(c["training_paths"].values()) == 4
    assert all(k.startswith(("vmap, eager: ", "loop, eager: ")) for k in c["training_paths"])
    assert r["executor"] == "local" and {"mlaudit", "torch", "python"} <= set(r["versions"])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["recipe"]["epochs"] == 12 and resolved["dataset"]["name"] == "digits"
    assert "digits-mlp" in (out / "report.html").read_text()
    # the default store went to $MLAUDIT_STORE, i.e. under tmp_path
    assert (tmp_path / "home" / "default.db").exists()


def test_run_end_to_end_in_process(tmp_path: Path, cfg_file: Path) -> None:
    res = run_tiny(cfg_file, tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    r = json.loads((out / "results.json").read_text())
    assert {"metrics", "trials", "cost", "executor", "versions"} <= set(r)
    assert {"mean", "se"} <= set(r["metrics"]["test_accuracy"]) and len(r["trials"]) == 2
    assert "tiny-cli" in (out / "report.html").read_text()
    assert "test_accuracy" in res.stdout and "2 models trained" in res.stdout
    assert sorted(p.name for p in (out / "artifacts" / "models").iterdir()) == ["model-0000.pt", "model-0001.pt"]


def test_quiet_prints_only_the_out_dir(tmp_path: Path, cfg_file: Path) -> None:
    res = run_tiny(cfg_file, tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'out'}\n" and res.stderr == ""


def test_set_overrides_reach_the_resolved_config(tmp_path: Path, cfg_file: Path) -> None:
    res = run_tiny(cfg_file, tmp_path / "out", "-q", "--set", "trials=3", "--set", "model.width=8",
                   "--set", "recipe.lr=1e-2", "--set", "dataset.options.n_test=32")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert cfg["trials"] == 3 and cfg["model"] == {**cfg["model"], "name": "mlp", "width": 8}
    assert cfg["recipe"]["lr"] == 0.01 and cfg["recipe"]["name"] == "fast" and cfg["recipe"]["epochs"] == 1
    assert cfg["dataset"]["options"] == {"n_train": 96, "n_test": 32, "shape": [12]}
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["trials"]) == 3


def test_output_folder_rules_exit_2_and_change_nothing(tmp_path: Path, cfg_file: Path) -> None:
    out = tmp_path / "out"
    assert run_tiny(cfg_file, out, "-q").exit_code == 0
    before = snapshot(out)
    res = run_tiny(cfg_file, out, "--set", "seed=5")
    assert res.exit_code == 2 and "already holds a different run" in res.stderr
    res = run_tiny(cfg_file, out)
    assert res.exit_code == 2 and "already holds this finished run" in res.stderr and "--resume" in res.stderr
    res = cli("run", "--resume", out, "--store", tmp_path / "runs.db", "--set", "trials=5")
    assert res.exit_code == 2 and "different run" in res.stderr and "--set" in res.stderr
    assert snapshot(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    res = run_tiny(cfg_file, mine)
    assert res.exit_code == 2 and "holds no mlaudit run" in res.stderr
    assert snapshot(mine) == {"thesis.tex": b"keep me"}
    res = cli("run", "--resume", mine, "--store", tmp_path / "runs.db")
    assert res.exit_code == 2 and "no run to resume" in res.stderr


def test_resume_via_cli_reuses_finished_trials(tmp_path: Path, cfg_file: Path) -> None:
    out = tmp_path / "out"
    assert run_tiny(cfg_file, out, "-q").exit_code == 0
    first = json.loads((out / "results.json").read_text())
    res = cli("run", "--resume", out, "--store", tmp_path / "runs.db", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["cost"]["models_resumed"] == 2 and again["cost"]["models_trained"] == 0
    assert again["metrics"] == first["metrics"] and again["experiment_id"] == first["experiment_id"]


@pytest.mark.parametrize(("extra", "words"), [
    (["--set", "model=nope"], ["unknown model 'nope'", "mlp", "resnet18"]),
    (["--set", "kind=nope"], ["unknown experiment kind 'nope'", "train"]),
    (["--set", "dataset=nope"], ["unknown dataset 'nope'", "digits", "synthetic"]),
    (["--set", "recipe.name=nope"], ["unknown recipe 'nope'", "fast", "witches-brew"]),
    (["--set", "trials=0"], ["trials:", "1 <= trials <= 100000"]),
    (["--set", "recipe.epochs=-1"], ["recipe.epochs:", "1 <= recipe.epochs <= 10000"]),
    (["--set", "seed=-1"], ["seed:", "0 <= seed"]),
    (["--set", "trials=many"], ["trials:", "valid integer"]),
    (["--set", "colour=red"], ["colour: Extra inputs are not permitted"]),
    (["--set", "recipe.milestones=[50]"], ["milestones must lie in [1, epochs=1]"]),  # brackets printed verbatim
    (["--set", "trials"], ["key=value"]),
    (["--set", "dataset={name: mnist, root: EMPTY}"], ["MNIST files are missing", "train-images-idx3-ubyte"]),
    (["--device", "gpu"], ["device must be"]),
    (["--executor", "nope"], ["unknown executor 'nope'", "local", "process", "ray"]),
    (["--ray-address", "1.2.3.4:6379"], ["only applies with --executor ray"]),
    (["--workers", "2"], ["only applies with --executor process"]),
])
def test_invalid_input_exits_2_and_writes_nothing(tmp_path: Path, cfg_file: Path, extra: list[str],
                                                  words: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    extra = [e.replace("EMPTY", str(tmp_path / "empty")) for e in extra]
    res = cli("run", cfg_file, "--out", tmp_path / "out", "--device", "cpu", "--store", tmp_path / "runs.db", *extra)
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()


def test_missing_or_bad_config_file_exits_2(tmp_path: Path) -> None:
    assert cli("run", tmp_path / "nope.yaml").exit_code == 2
    (tmp_path / "list.yaml").write_text("- 1\n")
    res = cli("run", tmp_path / "list.yaml")
    assert res.exit_code == 2 and "mapping" in res.stderr
    res = cli("run")
    assert res.exit_code == 2 and "missing CONFIG" in res.stderr


def test_failure_during_run_exits_1_naming_the_trial(tmp_path: Path, cfg_file: Path) -> None:
    res = run_tiny(cfg_file, tmp_path / "out", "-q", "--set", "recipe.lr=1e30", "--set", "recipe.epochs=3")
    assert res.exit_code == 1, res.output
    assert "error during the run: trial 'model-0000' failed: TrainingError" in res.stderr
    assert "epoch" in res.stderr and "step" in res.stderr and "--resume" in res.stderr
    assert res.stdout == ""
    from mlaudit.store import RunStore

    (exp,) = RunStore(tmp_path / "runs.db").list_experiments()
    data = json.loads(cli("runs", "show", exp.id, "--store", tmp_path / "runs.db").stdout)
    assert data["status"] == "failed" and data["trials"]["done"] == 0
    assert data["trials"]["failed"][0]["trial_id"] == "model-0000"


def test_runs_list_show_export(tmp_path: Path, cfg_file: Path) -> None:
    db = tmp_path / "runs.db"
    assert run_tiny(cfg_file, tmp_path / "out", "-q").exit_code == 0
    exp_id = json.loads((tmp_path / "out" / "results.json").read_text())["experiment_id"]
    res = cli("runs", "list", "--store", db)
    assert res.exit_code == 0 and exp_id in res.stdout and "tiny-cli" in res.stdout and "acc " in res.stdout
    res = cli("runs", "list", "--store", db, "--wide")
    assert res.exit_code == 0 and "done" in res.stdout and str(tmp_path / "out") in res.stdout
    res = cli("runs", "show", exp_id[:6], "--store", db)
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["id"] == exp_id and shown["trials"] == {"done": 2, "failed": []}
    assert "test_accuracy.mean" in shown["metrics"]
    res = cli("runs", "export", exp_id, "--store", db)
    exported = json.loads(res.stdout)
    assert res.exit_code == 0 and len(exported["trials"]) == 2 and exported["config"]["name"] == "tiny-cli"
    res = cli("runs", "export", exp_id, "--store", db, "--out", tmp_path / "exp" / "run.json")
    assert res.exit_code == 0 and json.loads((tmp_path / "exp" / "run.json").read_text()) == exported
    res = cli("runs", "show", "zzzz", "--store", db)
    assert res.exit_code == 2 and "no experiment" in res.stderr


def test_runs_compare_shows_differing_config_and_metrics(tmp_path: Path, cfg_file: Path) -> None:
    db = tmp_path / "runs.db"
    assert run_tiny(cfg_file, tmp_path / "a", "-q").exit_code == 0
    assert run_tiny(cfg_file, tmp_path / "b", "-q", "--set", "seed=7").exit_code == 0
    ids = [json.loads((tmp_path / d / "results.json").read_text())["experiment_id"] for d in ("a", "b")]
    res = cli("runs", "compare", ids[0][:8], ids[1][:8], "--store", db)
    assert res.exit_code == 0, res.output
    assert "config.seed" in res.stdout and "config.name" not in res.stdout  # only the fields that differ
    assert "test_accuracy.mean" in res.stdout and "headline" in res.stdout
    res = cli("runs", "compare", ids[0], ids[1], "--store", db, "--match", "accuracy")
    assert res.exit_code == 0 and "test_accuracy" in res.stdout and "train_loss" not in res.stdout
    res = cli("runs", "compare", ids[0], "--store", db)
    assert res.exit_code == 2 and "two or more" in res.stderr
    res = cli("runs", "compare", ids[0], "zzzz", "--store", db)
    assert res.exit_code == 2 and "no experiment" in res.stderr


def test_runs_index_lists_runs_links_reports_and_escapes(tmp_path: Path, cfg_file: Path) -> None:
    db = tmp_path / "runs.db"
    assert run_tiny(cfg_file, tmp_path / "a", "-q").exit_code == 0
    from mlaudit.store import RunStore

    RunStore(db).create_experiment(kind="train", name="<script>alert(1)</script>", config={},
                                   out_dir="javascript:alert(2)")
    res = cli("runs", "index", "--store", db, "--out", tmp_path / "site" / "index.html")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "site" / "index.html").read_text()
    exp_id = json.loads((tmp_path / "a" / "results.json").read_text())["experiment_id"]
    assert exp_id in html and 'href="../a/report.html"' in html and "acc " in html
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert 'href="javascript' not in html  # a run without a report has no link at all
    res = cli("runs", "index", "--store", db, "--out", tmp_path)
    assert res.exit_code == 2 and "folder" in res.stderr


def test_verbose_prints_the_log_on_stderr(tmp_path: Path, cfg_file: Path) -> None:
    import logging

    res = run_tiny(cfg_file, tmp_path / "out", "-q", "-v")
    assert res.exit_code == 0, res.output
    assert "INFO mlaudit" in res.stderr  # the same lines artifacts/run.log keeps
    log = (tmp_path / "out" / "artifacts" / "run.log").read_text()
    assert log.strip()
    left = [h for h in logging.getLogger("mlaudit").handlers if type(h) is logging.StreamHandler]
    assert not left  # the console handler is removed when the command ends
    quiet = run_tiny(cfg_file, tmp_path / "out2", "-q")
    assert quiet.exit_code == 0 and "INFO mlaudit" not in quiet.stderr


def test_data_info_and_models() -> None:
    res = cli("data", "info", "digits")
    assert res.exit_code == 0 and "1438" in res.stdout and "359" in res.stdout and "10" in res.stdout
    res = cli("data", "info", "nope")
    assert res.exit_code == 2 and "valid datasets" in res.stderr and "digits" in res.stderr
    res = cli("data", "info", "mnist", "--root", "no-such-dir")
    assert res.exit_code == 2 and "train-images-idx3-ubyte" in res.stderr
    from mlaudit.models import MODELS

    res = cli("models")
    assert res.exit_code == 0
    assert len(MODELS.names()) >= 5
    for name in MODELS.names():
        assert name in res.stdout


def test_report_escapes_config_strings_and_default_out_dir_is_safe(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>/../x"
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump({**TINY, "name": evil}))
    res = cli("run", tmp_path / "evil.yaml", "--device", "cpu", "--store", tmp_path / "runs.db", "-q")
    assert res.exit_code == 0, res.output
    out = Path(res.stdout.strip())
    assert out.parent == Path("runs") and "/" not in out.name and "<" not in out.name and ".." not in out.name
    html = (tmp_path / out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert json.loads((tmp_path / out / "results.json").read_text())["name"] == evil


def test_grow_via_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "brew.yaml"
    cfg.write_text("kind: targeted-poison\ndataset: digits\nmodel: mlp\nrecipe: {name: fast, epochs: 2}\n"
                   "attack: {eps: 16, budget: 0.01, restarts: 1, steps: 3}\nscenarios: 1\nvictims: 1\n"
                   "export: false\nseed: 0\n")
    out = tmp_path / "out"
    assert run_tiny(cfg, out, "-q").exit_code == 0
    refused = cli("run", "--resume", out, "--store", tmp_path / "runs.db", "--device", "cpu", "-q",
                  "--set", "scenarios=2")
    assert refused.exit_code == 2 and "--grow" in refused.output
    res = cli("run", "--resume", out, "--store", tmp_path / "runs.db", "--device", "cpu", "-q", "--grow",
              "--set", "scenarios=2")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["grown_from"] == {"scenarios": 1} and r["cost"]["models_trained"] == 1
    assert len(r["metrics"]["scenarios"]) == 2


@pytest.mark.parametrize(("changes", "match"), [
    ({"model": "no_such_pkg_zz.nets:Net"}, "cannot import module 'no_such_pkg_zz.nets'"),
    ({"dataset": "cli_user_code:ragged"}, "variable-size samples"),
    ({"trainer": "cli_user_code:wrong_signature"}, "has the signature"),
])
def test_user_code_errors_exit_2_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                changes: dict[str, str], match: str) -> None:
    (tmp_path / "cli_user_code.py").write_text(
        "import torch\n"
        "def ragged():\n"
        "    return [(torch.zeros(2), 0), (torch.zeros(3), 1)], [(torch.zeros(2), 0)]\n"
        "def wrong_signature(a, b, c):\n"
        "    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "user.yaml"
    cfg.write_text(yaml.safe_dump(TINY | changes))
    res = run_tiny(cfg, tmp_path / "out")
    assert res.exit_code == 2 and match in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()


def test_no_imports_switch_refuses_import_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLAUDIT_NO_IMPORTS", "1")
    cfg = tmp_path / "user.yaml"
    cfg.write_text(yaml.safe_dump(TINY | {"model": "torch.nn:Identity"}))
    res = run_tiny(cfg, tmp_path / "out")
    assert res.exit_code == 2 and "MLAUDIT_NO_IMPORTS" in res.output and not (tmp_path / "out").exists()


def test_dp_check_lists_every_layer_and_exits_1_on_one_fast_clipping_cannot_cover(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ok = cli("dp", "check", "{name: fastcnn, norm: group, width: 8}", "--input-shape", "3,16,16", "--verify")
    assert ok.exit_code == 0, ok.output
    assert "GroupNorm" in ok.output and "no:" not in ok.output and "verified" in ok.output
    bad = cli("dp", "check", "fastcnn", "--input-shape", "3,16,16")
    assert bad.exit_code == 1 and "BatchNorm2d" in bad.output and "use GroupNorm" in bad.output.replace("\n", " ")
    (tmp_path / "attn_user.py").write_text(
        "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)\n"
        "        self.head = nn.Linear(8, 3)\n\n    def forward(self, x):\n        return self.head(self.enc(x).mean(1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user = cli("dp", "check", "attn_user:Net", "--input-shape", "5,8", "--classes", "3", "--verify")
    assert user.exit_code == 0 and "MultiheadAttention" in user.output and "verified" in user.output, user.output
    assert cli("dp", "check", "mlp", "--input-shape", "3,x").exit_code == 2
    assert cli("dp", "check", "{name: mlp, nrm: group}", "--input-shape", "4").exit_code == 2
