"""One run per output folder (issue 21): a run holds an exclusive lock on ``DIR/.mlaudit.lock`` for its
whole duration; a second run on the folder (another process, or another thread) is refused with a
ConfigError naming the holder's pid, and the folder is checked again under the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment
from mlaudit.experiments.context import RunContext
from mlaudit.experiments.resume import LOCK_NAME, lock_out_dir
from mlaudit.store import RunStore

TINY: dict[str, Any] = {"kind": "train", "name": "tiny-lock", "seed": 0, "trials": 2, "model": "mlp",
                        "dataset": {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [12]}},
                        "recipe": {"name": "fast", "epochs": 1, "batch_size": 32}}


def run(out: Path, db: Path, **kw: Any) -> Any:
    return run_experiment(TINY, out=out, device="cpu", store=db, quiet=True, **kw)


def test_a_folder_locked_by_another_process_is_refused(tmp_path: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    out.mkdir()
    holder = subprocess.Popen(  # the lock protocol with nothing but fcntl: lock, write the pid, wait
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('locked', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"the run in '{out}' is in use by another process \(pid {holder.pid}\)"):
            run(out, db)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.communicate("", timeout=30)
    res = run(out, db)  # the holder has exited: its lock went with it, and its file does not count as content
    assert res.results["cost"]["models_trained"] == 2
    assert not (out / LOCK_NAME).exists()


def test_two_runs_on_one_folder_do_not_both_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    training = threading.Event()
    original = RunContext.train
    trained: list[str] = []

    def slow_train(self: RunContext, job: Any, **kw: Any) -> Any:
        trained.append(threading.current_thread().name)
        training.set()
        time.sleep(1.0)  # the second run arrives while the first one trains
        return original(self, job, **kw)

    monkeypatch.setattr(RunContext, "train", slow_train)
    outcome: dict[str, Any] = {}

    def go(name: str, resume: bool) -> None:
        try:
            outcome[name] = run(out, db, resume=resume)
        except ConfigError as e:
            outcome[name] = e

    first = threading.Thread(target=go, args=("first", False), name="first")
    first.start()
    assert training.wait(60)
    second = threading.Thread(target=go, args=("second", True), name="second")
    second.start()
    second.join(60)
    first.join(120)
    assert isinstance(outcome["second"], ConfigError), outcome
    assert f"is in use by another process (pid {os.getpid()})" in str(outcome["second"])
    assert outcome["first"].results["cost"]["models_trained"] == 2
    assert set(trained) == {"first"}
    rows = RunStore(db).list_experiments()
    assert [(r.status, len(RunStore(db).finished_trials(r.id))) for r in rows] == [("done", 2)]
    assert not (out / LOCK_NAME).exists()
    again = run(out, db, resume=True)  # released: a resume finds every trial finished
    assert again.results["cost"]["models_trained"] == 0 and again.results["cost"]["models_resumed"] == 2


def test_the_lock_is_held_for_the_whole_run_and_released_on_failure(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    seen: list[bool] = []

    def failing_train(self: RunContext, job: Any, **kw: Any) -> Any:
        seen.append((out / LOCK_NAME).read_text().strip() == str(os.getpid()))
        with pytest.raises(ConfigError, match="in use by another process"), lock_out_dir(out):
            pass
        raise KeyboardInterrupt

    monkeypatch.setattr(RunContext, "train", failing_train)
    with pytest.raises(KeyboardInterrupt):
        run(out, db)
    assert seen == [True] and not (out / LOCK_NAME).exists()
    with lock_out_dir(out):  # free again
        pass


def test_a_stale_lock_file_does_not_block_and_a_symlinked_one_is_refused(tmp_path: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    out.mkdir()
    (out / LOCK_NAME).write_text("12345\n")  # left by a killed run: no process holds it
    assert run(out, db).results["cost"]["models_trained"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="cannot create the lock file"), lock_out_dir(other):
        pass
    assert not (tmp_path / "elsewhere").exists()
