from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mlaudit.errors import ConfigError, DataError
from mlaudit.store import RunStore, default_store_path, dumps, loads


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "runs.db")


def _new(store: RunStore, tmp_path: Path, name: str = "exp", **config: object) -> str:
    return store.create_experiment(kind="poison", name=name, config={"seed": 0, **config}, out_dir=tmp_path / name)


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLAUDIT_STORE", raising=False)
    assert default_store_path() == Path.home() / ".mlaudit" / "runs.db"
    monkeypatch.setenv("MLAUDIT_STORE", str(tmp_path / "x.db"))
    assert default_store_path() == tmp_path / "x.db"
    assert RunStore().path == tmp_path / "x.db"


def test_create_list_show(store: RunStore, tmp_path: Path) -> None:
    a = _new(store, tmp_path, "a", lr=0.1)
    b = store.create_experiment(kind="mia", name="b", config={"x": [1, 2]}, out_dir=tmp_path / "b",
                                git_rev="abc123", versions={"torch": "2.x"})
    listed = store.list_experiments()
    assert [r.id for r in listed] == [b, a]
    assert store.list_experiments(limit=1)[0].id == b
    rec = store.get_experiment(a)
    assert (rec.kind, rec.name, rec.config, rec.status) == ("poison", "a", {"seed": 0, "lr": 0.1}, "running")
    assert rec.out_dir == str((tmp_path / "a").resolve()) and len(rec.config_hash) == 64
    assert store.get_experiment(b).git_rev == "abc123" and store.get_experiment(b).versions == {"torch": "2.x"}
    store.set_status(a, "done")
    assert store.get_experiment(a).status == "done"
    with pytest.raises(ConfigError, match="interrupted"):
        store.set_status(a, "finished")
    assert store.find_by_out_dir(tmp_path / "b").id == b
    assert store.find_by_out_dir(tmp_path / "nowhere") is None
    # Same config -> same hash, regardless of key order.
    c = store.create_experiment(kind="poison", name="c", config={"lr": 0.1, "seed": 0}, out_dir=tmp_path / "c")
    assert store.get_experiment(c).config_hash == rec.config_hash


def test_schema_versioned_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    exp = _new(RunStore(path), tmp_path)
    assert RunStore(path).get_experiment(exp).id == exp  # reopening keeps data
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="newer"):
        RunStore(path)


def test_commit_and_resume_semantics(store: RunStore, tmp_path: Path) -> None:
    exp = _new(store, tmp_path)
    store.commit_trial(exp, "t0", {"acc": np.float32(0.5), "n": np.int64(3), "v": np.arange(3)}, wall_s=1.5)
    store.commit_trial(exp, "t1", {"acc": 0.6}, wall_s=2.0)
    store.fail_trial(exp, "t2", "RuntimeError: boom")
    assert store.finished_trials(exp) == {"t0": {"acc": 0.5, "n": 3, "v": [0, 1, 2]}, "t1": {"acc": 0.6}}
    # Re-committing overwrites instead of duplicating; a failed trial re-run successfully becomes done.
    store.commit_trial(exp, "t1", {"acc": 0.7}, wall_s=3.0)
    store.commit_trial(exp, "t2", {"acc": 0.8}, wall_s=1.0)
    trials = store.trials(exp)
    assert [t.trial_id for t in trials] == ["t0", "t1", "t2"]
    assert store.finished_trials(exp)["t1"] == {"acc": 0.7} and trials[2].error is None
    assert trials[1].wall_s == 3.0 and trials[1].started_at <= trials[1].finished_at
    store.fail_trial(exp, "t3", "oops")
    assert "t3" not in store.finished_trials(exp)
    assert [t.error for t in store.trials(exp) if t.status == "failed"] == ["oops"]
    with pytest.raises(ConfigError, match="no experiment"):
        store.commit_trial("deadbeef0000", "t0", {}, wall_s=0.0)


def test_nonfinite_and_numpy_json(store: RunStore, tmp_path: Path) -> None:
    exp = _new(store, tmp_path)
    store.commit_trial(exp, "t", {"a": float("nan"), "b": np.float64("inf"), "c": -math.inf}, wall_s=0.1)
    got = store.finished_trials(exp)["t"]
    assert math.isnan(got["a"]) and got["b"] == math.inf and got["c"] == -math.inf
    text = dumps({"x": np.array([1.0, np.nan])})
    assert json.loads(text) == {"x": [1.0, "NaN"]} and math.isnan(loads(text)["x"][1])
    with pytest.raises(ConfigError, match=r"config\.obj: .*type object"):
        store.create_experiment(kind="k", name="n", config={"obj": object()}, out_dir=tmp_path)


def test_unknown_and_prefix_ids(store: RunStore, tmp_path: Path) -> None:
    exps = [_new(store, tmp_path, f"e{i}", password="hunter2") for i in range(40)]
    target = exps[7]
    assert store.get_experiment(target[:8]).id == target
    with pytest.raises(ConfigError) as info:
        store.get_experiment("zz-not-an-id")
    msg = str(info.value)
    assert "zz-not-an-id" in msg and "hunter2" not in msg and not any(e in msg for e in exps)
    # A one-character prefix shared by several ids is ambiguous; the message names a few ids, no config.
    first = max({e[0] for e in exps}, key=lambda c: sum(e.startswith(c) for e in exps))
    with pytest.raises(ConfigError, match="ambiguous") as info:
        store.get_experiment(first)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="non-empty"):
        store.get_experiment("")


def test_metrics_artifacts_export_roundtrip(store: RunStore, tmp_path: Path) -> None:
    exp = _new(store, tmp_path, lr=0.1)
    store.commit_trial(exp, "t0", {"acc": 0.9, "loss": float("nan")}, wall_s=1.0)
    store.put_metrics(exp, {"auc": {"value": 0.7, "lo": 0.6, "hi": 0.8}, "acc": {"mean": 0.9, "se": 0.01},
                            "n": 5, "tags": ["a", "b"], "flag": True})
    store.put_metrics(exp, {"n": 6})  # replaces one metric, keeps the others
    m = store.metrics(exp)
    assert m == {"auc.value": 0.7, "auc.lo": 0.6, "auc.hi": 0.8, "acc.mean": 0.9, "acc.se": 0.01, "n": 6,
                 "tags": ["a", "b"], "flag": True}
    con = sqlite3.connect(store.path)
    assert dict(con.execute("SELECT name, value FROM metrics"))["auc.lo"] == 0.6
    con.close()
    f = tmp_path / "model.pt"
    f.write_bytes(b"weights")
    art = store.add_artifact(exp, "model", f, trial_id="t0")
    store.add_artifact(exp, "model", f, trial_id="t0")  # idempotent
    store.add_artifact(exp, "summary", f, sha256="0" * 64)
    assert art.sha256 == hashlib.sha256(b"weights").hexdigest() and art.trial_id == "t0"
    assert len(store.artifacts(exp)) == 2
    with pytest.raises(DataError, match="does not exist"):
        store.add_artifact(exp, "missing", tmp_path / "nope.bin")
    out = store.export(exp[:6])
    text = json.dumps(out, allow_nan=False)  # strict JSON
    back = json.loads(text)
    assert back["id"] == exp and back["config"] == {"seed": 0, "lr": 0.1}
    assert back["trials"][0]["result"] == {"acc": 0.9, "loss": "NaN"}
    assert back["metrics"]["auc.value"] == 0.7
    assert {a["name"] for a in back["artifacts"]} == {"model", "summary"}


def _worker(path: str, exp: str, worker: int) -> None:
    store = RunStore(path)
    for i in range(20):
        store.commit_trial(exp, f"w{worker}-{i:02d}", {"worker": worker, "i": i}, wall_s=0.01)


def test_concurrent_commits_from_two_processes(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    exp = _new(store, tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(store.path), exp, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    done = store.finished_trials(exp)
    assert len(done) == 40 and {r["worker"] for r in done.values()} == {0, 1}


# ------------------------------------------------------------------ damaged stores: clear errors, no traceback

def test_a_file_that_is_not_a_store_is_named_with_what_to_do(tmp_path: Path) -> None:
    bad = tmp_path / "runs.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match=r"runs\.db is damaged or not an mlaudit store.*MLAUDIT_STORE.*--resume"):
        RunStore(bad)


def test_a_malformed_json_row_is_reported_as_a_damaged_store(store: RunStore, tmp_path: Path) -> None:
    exp = store.create_experiment(kind="train", name="x", config={"a": 1}, out_dir=tmp_path / "o")
    store.commit_trial(exp, "t0", {"metrics": {"acc": 0.5}}, wall_s=1.0)
    con = sqlite3.connect(store.path)
    con.execute("UPDATE trials SET result_json = ? WHERE trial_id = 't0'", ("{not json",))
    con.commit()
    con.close()
    with pytest.raises(DataError, match="malformed row"):
        store.trials(exp)


def test_cli_on_a_damaged_store_exits_2_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlaudit.cli import app

    bad = tmp_path / "runs.db"
    bad.write_bytes(b"\x00garbage" * 512)
    res = CliRunner().invoke(app, ["runs", "list", "--store", str(bad)])
    assert res.exit_code == 2 and "damaged" in res.output and "Traceback" not in res.output
