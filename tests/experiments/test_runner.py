"""The experiment runner: output folder rules, results.json, failures with trial ids, and resuming
a run killed mid-way (SIGKILL) to the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mlaudit.errors import ConfigError, DataError, MlauditError, TrainingError, TrialError
from mlaudit.experiments import run_experiment
from mlaudit.experiments.context import failed_trial
from mlaudit.experiments.runner import check_device
from mlaudit.factory import TrialSpec
from mlaudit.store import RunStore


def tiny(**changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": "train", "name": "tiny", "seed": 0, "trials": 2, "model": "mlp",
                           "dataset": {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [12]}},
                           "recipe": {"name": "fast", "epochs": 1, "batch_size": 32}}
    cfg.update(changes)
    return cfg


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep every store under tmp_path and train single-threaded (fast on a shared 2-core box)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the assertion below checks this folder
    yield


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_writes_results_and_store_rows(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    res = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"config.yaml", "results.json", "report.html", "artifacts"}
    assert sorted(p.name for p in (out / "artifacts" / "models").iterdir()) == ["model-0000.pt", "model-0001.pt"]
    r = json.loads((out / "results.json").read_text())
    assert r == res.results
    assert set(r["metrics"]["test_accuracy"]) >= {"mean", "se"} and len(r["trials"]) == 2
    assert {"wall_s", "device", "models_trained", "models_per_minute", "gpu_seconds", "peak_gpu_mem_mb"} <= set(r["cost"])
    assert r["cost"]["models_trained"] == 2 and r["cost"]["models_resumed"] == 0
    assert r["cost"]["gpu_seconds"] is None and r["cost"]["peak_gpu_mem_mb"] is None  # CPU
    assert r["executor"] == "local" and r["versions"]["torch"] == torch.__version__
    assert yaml.safe_load((out / "config.yaml").read_text()) == r["config"]
    assert r["config"]["recipe"]["epochs"] == 1 and r["config"]["factory"]["max_chunk"] is None  # defaults filled
    store = RunStore(db)
    exp = store.get_experiment(res.experiment_id)
    assert exp.status == "done" and exp.out_dir == str(out.resolve())
    assert sorted(store.finished_trials(exp.id)) == ["model-0000", "model-0001"]
    assert store.metrics(exp.id)["test_accuracy.mean"] == pytest.approx(r["metrics"]["test_accuracy"]["mean"])
    assert not (tmp_path / "home" / ".mlaudit").exists()  # nothing went to the default store


def test_output_folder_rules_leave_it_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    out = tmp_path / "out"
    run_experiment(tiny(), out=out, device="cpu", store=db, quiet=True)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="already holds a different run"):
        run_experiment(tiny(seed=1), out=out, device="cpu", store=db, quiet=True)
    with pytest.raises(ConfigError, match="already holds a different run"):
        run_experiment(tiny(seed=1), out=out, device="cpu", store=db, quiet=True, resume=True)
    with pytest.raises(ConfigError, match="already holds this finished run; pass --resume"):
        run_experiment(tiny(), out=out, device="cpu", store=db, quiet=True)
    assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no mlaudit run"):
        run_experiment(tiny(), out=other, device="cpu", store=db, quiet=True)
    assert snapshot(other) == {"notes.txt": b"mine"}
    with pytest.raises(ConfigError, match="not a folder"):
        run_experiment(tiny(), out=other / "notes.txt", device="cpu", store=db, quiet=True)
    assert len(RunStore(db).list_experiments()) == 1


def test_resume_of_finished_run_trains_nothing(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True)
    again = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True, resume=True)
    assert again.experiment_id == first.experiment_id
    assert again.results["cost"]["models_trained"] == 0 and again.results["cost"]["models_resumed"] == 2
    assert again.results["cost"]["models_per_minute"] is None
    assert again.results["metrics"] == first.results["metrics"]
    (tmp_path / "out" / "artifacts" / "models" / "model-0001.pt").unlink()  # a lost checkpoint is retrained
    third = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True, resume=True)
    assert third.results["cost"]["models_trained"] == 1 and third.results["cost"]["models_resumed"] == 1
    assert third.results["metrics"] == first.results["metrics"]
    assert (tmp_path / "out" / "artifacts" / "models" / "model-0001.pt").is_file()


def test_fresh_run_into_a_deleted_folder_does_not_reuse_store_rows(tmp_path: Path) -> None:
    import shutil

    db = tmp_path / "runs.db"
    first = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True)
    shutil.rmtree(tmp_path / "out")
    second = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True)
    assert second.experiment_id != first.experiment_id
    assert second.results["cost"]["models_trained"] == 2 and second.results["cost"]["models_resumed"] == 0
    assert (tmp_path / "out" / "artifacts" / "models" / "model-0001.pt").is_file()


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"dataset": {"name": "mnist", "root": "EMPTY"}}, DataError, "train-images-idx3-ubyte"),
    ({"dataset": {"name": "mnist", "root": "CORRUPT"}}, DataError, "IDX"),
    ({"dataset": {"name": "synthetic", "options": {"bogus": 1}}}, ConfigError, "bogus"),
    ({"model": "resnet18"}, ConfigError, "needs image inputs"),
])
def test_bad_data_or_model_fails_before_writing(tmp_path: Path, changes: dict, error: type, match: str) -> None:
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"\x00\x00\x08")  # truncated header
    ds = changes.get("dataset")
    if isinstance(ds, dict) and ds.get("root") in ("EMPTY", "CORRUPT"):
        changes = {"dataset": {**ds, "root": str(tmp_path / ds["root"].lower())}}
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_experiment(tiny(**changes), out=out, device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert not out.exists() and not (tmp_path / "runs.db").exists()


def test_device_validation() -> None:
    assert check_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "", "cpu:0"):
        with pytest.raises(ConfigError, match="device must be"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            check_device("cuda")


def test_diverging_training_names_the_trial(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    cfg = tiny(trials=3, recipe={"name": "fast", "epochs": 3, "batch_size": 32, "lr": 1e30},
               factory={"max_chunk": 1})
    with pytest.raises(TrialError) as ei:
        run_experiment(cfg, out=tmp_path / "out", device="cpu", store=db, quiet=True)
    e = ei.value
    assert e.trial_id == "model-0000" and isinstance(e.cause, TrainingError)
    assert "trial 'model-0000' failed" in str(e) and "epoch" in str(e) and "step" in str(e)
    store = RunStore(db)
    exp = store.list_experiments()[0]
    assert exp.status == "failed"
    rows = store.trials(exp.id)
    # the train kind goes on after a failed trial: every trial was tried, each failure recorded
    assert [(t.trial_id, t.status) for t in rows] == [(f"model-000{i}", "failed") for i in range(3)]
    assert all("NaN" in (r.error or "") for r in rows)
    assert not (tmp_path / "out" / "results.json").exists()


def test_failed_trial_prefers_the_seed_named_by_the_error() -> None:
    pending = [TrialSpec("a", seed=11), TrialSpec("b", seed=22), TrialSpec("c", seed=33)]
    err = TrainingError("loss became NaN for model 1 (seed 22) at epoch 1", seed=22, epoch=1, step=3)
    assert failed_trial(pending, err).trial_id == "b"
    again = pickle.loads(pickle.dumps(err))  # errors travel back from process and Ray workers
    assert (again.seed, again.epoch, again.step) == (22, 1, 3) and failed_trial(pending, again).trial_id == "b"
    assert failed_trial(pending, RuntimeError("out of memory (seed 22)")).trial_id == "a"  # no field, no guess
    assert failed_trial(pending, TrainingError("model 0 (seed 99)", seed=99)).trial_id == "a"


def test_failure_outside_training_is_an_mlaudit_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlaudit.experiments.train as train_kind

    def broken(values: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(train_kind.MeanSE, "of", staticmethod(broken))
    with pytest.raises(MlauditError, match=r"failed outside model training, with 2 trials finished: RuntimeError: boom"):
        run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert RunStore(tmp_path / "runs.db").list_experiments()[0].status == "failed"


def _count_done(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        store = RunStore(db)
        return sum(len(store.finished_trials(e.id)) for e in store.list_experiments())
    except MlauditError:
        return 0


def test_resume_after_sigkill_gives_the_same_results(tmp_path: Path) -> None:
    n = 4
    cfg = tiny(name="resume-me", trials=n, factory={"max_chunk": 1},
               dataset={"name": "synthetic", "options": {"n_train": 256, "n_test": 64, "shape": [16]}},
               recipe={"name": "fast", "epochs": 8, "batch_size": 32})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    db, out = tmp_path / "runs.db", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlaudit.cli", "run", str(tmp_path / "cfg.yaml"), "--out", str(out),
                             "--device", "cpu", "--store", str(db), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _count_done(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = _count_done(db)
    assert 1 <= done < n, f"expected the kill to land mid-run, {done} of {n} trials were committed"
    assert proc.returncode == -signal.SIGKILL
    assert RunStore(db).list_experiments()[0].status == "running"

    resumed = run_experiment(yaml.safe_load((out / "config.yaml").read_text()), out=out, device="cpu", store=db,
                             quiet=True, resume=True)
    fresh = run_experiment(cfg, out=tmp_path / "fresh", device="cpu", store=db, quiet=True)
    rc, fc = resumed.results["cost"], fresh.results["cost"]
    assert rc["models_resumed"] == done and rc["models_trained"] == n - done
    assert fc["models_trained"] == n and fc["models_resumed"] == 0
    assert [t["trial_id"] for t in resumed.results["trials"]] == [f"model-{i:04d}" for i in range(n)]
    assert ([t["test_accuracy"] for t in resumed.results["trials"]]
            == [t["test_accuracy"] for t in fresh.results["trials"]])
    assert resumed.results["metrics"] == fresh.results["metrics"]
    assert sorted(p.name for p in (out / "artifacts" / "models").iterdir()) == [f"model-{i:04d}.pt" for i in range(n)]
    assert RunStore(db).get_experiment(resumed.experiment_id).status == "done"


def test_a_train_run_grows_by_trials(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = run_experiment(tiny(), out=tmp_path / "out", device="cpu", store=db, quiet=True)
    grown = run_experiment(tiny(trials=4), out=tmp_path / "out", device="cpu", store=db, quiet=True, resume=True,
                           grow=True)
    c = grown.results["cost"]
    assert (c["models_trained"], c["models_resumed"]) == (2, 2) and grown.experiment_id == first.experiment_id
    fresh = run_experiment(tiny(trials=4), out=tmp_path / "fresh", device="cpu", store=db, quiet=True)
    assert grown.results["metrics"] == fresh.results["metrics"]
    assert RunStore(db).get_experiment(grown.experiment_id).config["trials"] == 4


def test_kinds_without_growable_counts_refuse_a_grow() -> None:
    from mlaudit.experiments.resume import config_growth

    with pytest.raises(ConfigError, match="trials differ.*only raise these counts: none for this kind"):
        config_growth({"trials": 2}, {"trials": 4}, ())
    assert config_growth({"trials": 2, "seed": 0}, {"trials": 4, "seed": 0}, ("trials",)) == {"trials": (2, 4)}
    with pytest.raises(ConfigError, match="must be a count"):
        config_growth({"trials": True}, {"trials": 4}, ("trials",))


def test_resuming_keeps_the_cumulative_cost_of_every_invocation(tmp_path: Path) -> None:
    """A resumed finished run reports its own cost (nothing trained) and, under cost.cumulative, the
    sum over every invocation of the folder (issue 21: resuming used to report only its own)."""
    cfg = tiny(trials=3)
    first = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True).results
    again = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True,
                           resume=True).results
    assert first["cost"]["cumulative"]["invocations"] == 1 and first["cost"]["cumulative"]["models_trained"] == 3
    assert again["cost"]["models_trained"] == 0 and again["cost"]["models_resumed"] == 3
    cum = again["cost"]["cumulative"]
    assert cum["invocations"] == 2 and cum["models_trained"] == 3
    assert cum["wall_s"] >= first["cost"]["wall_s"] and cum["train_wall_s"] == pytest.approx(
        first["cost"]["train_wall_s"] + again["cost"]["train_wall_s"], abs=2e-3)


def test_a_moved_run_folder_resumes_by_the_id_it_records(tmp_path: Path) -> None:
    """The store is keyed by the output path; a moved folder is found again by artifacts/run_id, so
    its finished trials are not retrained (issue 21)."""
    cfg = tiny(trials=2)
    first = run_experiment(cfg, out=tmp_path / "a", device="cpu", store=tmp_path / "s.db", quiet=True).results
    (tmp_path / "a").rename(tmp_path / "b")
    again = run_experiment(cfg, out=tmp_path / "b", device="cpu", store=tmp_path / "s.db", quiet=True,
                           resume=True).results
    assert again["experiment_id"] == first["experiment_id"] and again["cost"]["models_trained"] == 0
    assert again["metrics"] == first["metrics"]


def test_models_that_diverged_or_sit_at_chance_are_flagged(tmp_path: Path) -> None:
    """Adam at lr 1e6 "finishes" without NaN but learns nothing: results.json and the report say so
    (issue 21); a healthy run has no warnings."""
    bad = run_experiment(tiny(trials=2, recipe={"name": "custom", "optimizer": "adam", "lr": 1e6, "epochs": 2,
                                                 "batch_size": 32, "weight_decay": 0.0}),
                         out=tmp_path / "bad", device="cpu", store=tmp_path / "s.db", quiet=True).results
    assert any("training loss above" in w or "chance accuracy" in w for w in bad["warnings"])
    assert "WARNING:" in (tmp_path / "bad" / "report.html").read_text()
    from mlaudit.experiments.diagnostics import flag_models

    ok = [{"trial_id": "a", "metrics": {"train_loss": 0.3, "test_accuracy": 0.9}}]
    assert flag_models(ok, num_classes=10) == []
    assert len(flag_models([{"trial_id": "b", "metrics": {"train_loss": float("inf"), "test_accuracy": 0.1}}],
                           num_classes=10)) == 2


def test_each_run_appends_to_its_log_file(tmp_path: Path) -> None:
    cfg = tiny(trials=2)
    run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True, resume=True)
    text = (tmp_path / "o" / "artifacts" / "run.log").read_text()
    assert "(train) started in" in text and "(train) resumed in" in text
    assert "done in" in text and "2 models trained, 0 resumed" in text and "0 models trained, 2 resumed" in text
