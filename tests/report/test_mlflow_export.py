"""``runs export --format mlflow``: the optional MLflow extra (skipped where MLflow is not installed;
run here on 2026-12-02 against mlflow-skinny 3.17.2 with its file store enabled for the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.store import RunStore


def _run(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "s.db"
    store = RunStore(db)
    exp = store.create_experiment(kind="train", name="tiny run", config={"recipe": {"lr": 0.1}, "seed": 3},
                                  out_dir=tmp_path / "o")
    for i, acc in enumerate((0.8, 0.9)):
        store.commit_trial(exp, f"m{i}", {"metrics": {"test_accuracy": acc}}, wall_s=1.0)
    store.put_metrics(exp, {"test_accuracy": {"mean": 0.85, "se": 0.05}})
    store.set_status(exp, "done")
    return exp, db


def test_export_logs_params_metrics_and_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store for the test (MLflow 3 warns)
    exp, db = _run(tmp_path)
    uri = (tmp_path / "mlruns").as_uri()
    res = CliRunner().invoke(app, ["runs", "export", exp, "--format", "mlflow", "--tracking-uri", uri, "--store", str(db)])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.stdout.strip())
    assert run.data.tags["mlaudit.id"] == exp and run.data.tags["mlaudit.kind"] == "train"
    assert run.data.params == {"recipe.lr": "0.1", "seed": "3"}
    assert run.data.metrics["test_accuracy.mean"] == pytest.approx(0.85)
    history = client.get_metric_history(run.info.run_id, "trial.test_accuracy")
    assert sorted((m.step, round(m.value, 3)) for m in history) == [(0, 0.8), (1, 0.9)]
    assert run.info.status == "FINISHED"


def test_without_mlflow_the_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_mlflow(name: str, *a: object, **k: object):  # noqa: ANN202
        if name.startswith("mlflow"):
            raise ImportError("no mlflow here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    exp, db = _run(tmp_path)
    res = CliRunner().invoke(app, ["runs", "export", exp, "--format", "mlflow", "--store", str(db)])
    assert res.exit_code == 2 and "mlaudit[mlflow]" in res.output
    res = CliRunner().invoke(app, ["runs", "export", exp, "--tracking-uri", "x", "--store", str(db)])
    assert res.exit_code == 2 and "only applies with --format mlflow" in res.output
