"""SQLite store of experiments, trials, metrics and artifacts (stdlib ``sqlite3``).

One database file (default ``~/.mlaudit/runs.db``; ``MLAUDIT_STORE`` overrides) is shared by every
process: WAL journal, a busy timeout, a fresh connection per call and one short ``BEGIN IMMEDIATE``
transaction per write, so several workers can commit trials concurrently. Committing a trial is
an upsert: re-running a trial overwrites its row, which is what makes resuming idempotent.

JSON: values are stored as strict JSON. numpy/torch scalars and arrays become Python numbers and
lists; non-finite floats are stored as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
Readers that return results (:meth:`RunStore.finished_trials`, records) turn those strings back into
floats; :meth:`RunStore.export` keeps them as strings so its output is strict JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .jsonutil import dumps, flatten, loads, to_jsonable  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL, out_dir TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, git_rev TEXT, versions_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS experiments_out_dir ON experiments(out_dir);
CREATE TABLE IF NOT EXISTS trials (
    experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE, trial_id TEXT NOT NULL,
    status TEXT NOT NULL, result_json TEXT, started_at TEXT, finished_at TEXT, wall_s REAL, error TEXT,
    PRIMARY KEY (experiment_id, trial_id));
CREATE TABLE IF NOT EXISTS metrics (
    experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE, name TEXT NOT NULL,
    value REAL, json TEXT NOT NULL, PRIMARY KEY (experiment_id, name));
CREATE TABLE IF NOT EXISTS artifacts (
    experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE, trial_id TEXT,
    name TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL);
"""


def default_store_path() -> Path:
    """``$MLAUDIT_STORE`` if set, else ``~/.mlaudit/runs.db``."""
    env = os.environ.get("MLAUDIT_STORE")
    return Path(env).expanduser() if env else Path.home() / ".mlaudit" / "runs.db"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ExperimentRecord:
    id: str
    kind: str
    name: str
    config: dict[str, Any]
    config_hash: str
    out_dir: str
    status: str
    created_at: str
    updated_at: str
    git_rev: str | None
    versions: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialRecord:
    experiment_id: str
    trial_id: str
    status: str
    result: dict[str, Any] | None
    started_at: str | None
    finished_at: str | None
    wall_s: float | None
    error: str | None


@dataclass(frozen=True)
class ArtifactRecord:
    experiment_id: str
    trial_id: str | None
    name: str
    path: str
    sha256: str


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _explain(path: Path, e: sqlite3.DatabaseError) -> str:
    """A message for a SQLite failure that says what happened to which file and what to do."""
    text = str(e)
    low = text.lower()
    if "full" in low:
        return (f"the disk holding the run store {path} is full ({text}); free space there or set MLAUDIT_STORE "
                "to a file on another disk, then resume with --resume (finished trials are kept)")
    if "not a database" in low or "malformed" in low or "no such table" in low or "no such column" in low:
        return (f"the run store {path} is damaged or not an mlaudit store ({text}); move it aside (or set "
                "MLAUDIT_STORE to a new file) and resume each run folder with --resume: the folders hold their checkpoints")
    if "locked" in low or "busy" in low:
        return (f"the run store {path} stayed locked by another process ({text}); wait for it or use another "
                "--store")
    return (f"the run store {path} could not be read or written ({type(e).__name__}: {text}); check the disk "
            "and its permissions, or set MLAUDIT_STORE to another file")


class RunStore:
    """Experiments and their trials in one SQLite file, safe for concurrent writers."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.timeout_s = float(timeout_s)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the run store folder {self.path.parent}: {e}; "
                            "set MLAUDIT_STORE to a writable path") from e
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
        with self._tx() as con:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                con.execute(stmt)
            row = con.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is None:
                con.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise DataError(f"run store {self.path} has schema version {row[0]}, newer than this mlaudit "
                                f"supports ({SCHEMA_VERSION}); upgrade mlaudit or point MLAUDIT_STORE elsewhere")

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def _loads(self, text: str | None) -> Any:
        """A stored JSON value; a row that no longer parses is a :class:`DataError` naming the store."""
        try:
            return loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"run store {self.path} holds a malformed row ({e}); the store was edited or damaged: "
                            "move it aside (set MLAUDIT_STORE to a new file) and resume the run folders with "
                            "--resume") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as e:
            raise DataError(f"cannot open run store {self.path}: {e}; set MLAUDIT_STORE to a writable path") from e
        try:
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        except sqlite3.IntegrityError:
            raise  # constraint violations are handled (and explained) by the callers
        except sqlite3.DatabaseError as e:
            raise DataError(_explain(self.path, e)) from e
        finally:
            con.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE takes the write lock up front)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- experiments -----------------------------------------------------------------------------
    def create_experiment(self, *, kind: str, name: str, config: dict[str, Any], out_dir: str | os.PathLike[str],
                          git_rev: str | None = None, versions: dict[str, Any] | None = None) -> str:
        """Insert a new experiment with status "running"; returns its id (12 hex digits)."""
        config_json = dumps(config, where="config")
        exp_id = uuid.uuid4().hex[:12]
        now = _now()
        with self._tx() as con:
            con.execute(
                "INSERT INTO experiments VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (exp_id, kind, name, config_json, hashlib.sha256(config_json.encode()).hexdigest(),
                 str(Path(out_dir).expanduser().resolve()), "running", now, now, git_rev, dumps(versions or {})),
            )
        return exp_id

    def _experiment(self, row: sqlite3.Row | tuple[Any, ...]) -> ExperimentRecord:
        (id_, kind, name, cfg, h, out_dir, status, created, updated, git_rev, versions) = row
        return ExperimentRecord(id_, kind, name, self._loads(cfg), h, out_dir, status, created, updated, git_rev,
                                self._loads(versions))

    def find_by_out_dir(self, out_dir: str | os.PathLike[str]) -> ExperimentRecord | None:
        """The most recent experiment writing to ``out_dir`` (compared as resolved paths), if any."""
        with self._connect() as con:
            row = con.execute("SELECT * FROM experiments WHERE out_dir = ? ORDER BY created_at DESC, rowid DESC "
                              "LIMIT 1", (str(Path(out_dir).expanduser().resolve()),)).fetchone()
        return self._experiment(row) if row else None

    def get_experiment(self, exp_id: str) -> ExperimentRecord:
        """The experiment with id ``exp_id`` or the only one whose id starts with it."""
        if not isinstance(exp_id, str) or not exp_id.strip():
            raise ConfigError(f"experiment id must be a non-empty string, got {exp_id!r}")
        with self._connect() as con:
            rows = con.execute("SELECT * FROM experiments WHERE id = ?", (exp_id,)).fetchall() or con.execute(
                "SELECT * FROM experiments WHERE substr(id, 1, ?) = ? ORDER BY created_at DESC LIMIT 6",
                (len(exp_id), exp_id)).fetchall()
        if not rows:
            raise ConfigError(f"no experiment with id or id prefix {exp_id!r} in run store {self.path}; "
                              "run `mlaudit runs list` to see the ids")
        if len(rows) > 1:
            ids = ", ".join(r[0] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise ConfigError(f"experiment id prefix {exp_id!r} is ambiguous (matches {ids}); give more characters")
        return self._experiment(rows[0])

    def list_experiments(self, limit: int = 50) -> list[ExperimentRecord]:
        """The ``limit`` most recently created experiments, newest first."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM experiments ORDER BY created_at DESC, rowid DESC LIMIT ?",
                               (int(limit),)).fetchall()
        return [self._experiment(r) for r in rows]

    def update_config(self, exp_id: str, config: dict[str, Any]) -> None:
        """Replace an experiment's config (and its hash), keeping its trials: for a run grown in place
        (``run_experiment(..., resume=True, grow=True)``)."""
        config_json = dumps(config, where="config")
        full = self.get_experiment(exp_id).id
        with self._tx() as con:
            con.execute("UPDATE experiments SET config_json = ?, config_hash = ?, updated_at = ? WHERE id = ?",
                        (config_json, hashlib.sha256(config_json.encode()).hexdigest(), _now(), full))

    def set_status(self, exp_id: str, status: str) -> None:
        """Set the status of an experiment (one of running, done, failed, interrupted)."""
        if status not in STATUSES:
            raise ConfigError(f"unknown experiment status {status!r}; valid: {', '.join(STATUSES)}")
        full = self.get_experiment(exp_id).id
        with self._tx() as con:
            con.execute("UPDATE experiments SET status = ?, updated_at = ? WHERE id = ?", (status, _now(), full))

    # -- trials ----------------------------------------------------------------------------------
    def _upsert_trial(self, exp_id: str, trial_id: str, status: str, result_json: str | None,
                      wall_s: float | None, error: str | None) -> None:
        now = datetime.now(timezone.utc)
        started = (now.timestamp() - wall_s) if wall_s is not None else None
        started_at = (datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds")
                      if started is not None else None)
        try:
            with self._tx() as con:
                con.execute(
                    "INSERT INTO trials VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(experiment_id, trial_id) DO UPDATE SET "
                    "status=excluded.status, result_json=excluded.result_json, started_at=excluded.started_at, "
                    "finished_at=excluded.finished_at, wall_s=excluded.wall_s, error=excluded.error",
                    (exp_id, str(trial_id), status, result_json, started_at,
                     now.isoformat(timespec="milliseconds"), wall_s, error))
                con.execute("UPDATE experiments SET updated_at = ? WHERE id = ?", (_now(), exp_id))
        except sqlite3.IntegrityError as e:
            raise ConfigError(f"cannot record trial {trial_id!r}: no experiment with id {exp_id!r} "
                              f"in run store {self.path}") from e

    def commit_trial(self, exp_id: str, trial_id: str, result: dict[str, Any], *, wall_s: float) -> None:
        """Record a finished trial in one transaction; committing the same trial again overwrites it."""
        self._upsert_trial(exp_id, trial_id, "done", dumps(result, where=f"trial {trial_id!r} result"), float(wall_s), None)

    def fail_trial(self, exp_id: str, trial_id: str, error: str, *, wall_s: float | None = None) -> None:
        """Record a failed trial with its error text (overwrites an earlier row of the same trial)."""
        self._upsert_trial(exp_id, trial_id, "failed", None, None if wall_s is None else float(wall_s), str(error))

    def trials(self, exp_id: str) -> list[TrialRecord]:
        """Every trial row of an experiment (done and failed), ordered by trial id."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM trials WHERE experiment_id = ? ORDER BY trial_id", (exp_id,)).fetchall()
        return [TrialRecord(r[0], r[1], r[2], self._loads(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def finished_trials(self, exp_id: str) -> dict[str, dict[str, Any]]:
        """{trial_id: result} of the trials that finished successfully, ordered by trial id."""
        return {t.trial_id: t.result for t in self.trials(exp_id) if t.status == "done" and t.result is not None}

    # -- metrics and artifacts --------------------------------------------------------------------
    def put_metrics(self, exp_id: str, metrics: dict[str, Any]) -> None:
        """Store metrics under dotted names (nested dicts flattened); numbers also go to ``value``.

        Each leaf keeps its JSON; metrics of the same name are replaced, others are kept.
        """
        rows = []
        for name, leaf in flatten(to_jsonable(metrics, "metrics")).items():
            number = float(leaf) if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) else None
            rows.append((exp_id, name, number, json.dumps(leaf, allow_nan=False)))
        try:
            with self._tx() as con:
                con.executemany("INSERT INTO metrics VALUES (?,?,?,?) ON CONFLICT(experiment_id, name) "
                                "DO UPDATE SET value=excluded.value, json=excluded.json", rows)
        except sqlite3.IntegrityError as e:
            raise ConfigError(f"cannot store metrics: no experiment with id {exp_id!r} in {self.path}") from e

    def metrics(self, exp_id: str) -> dict[str, Any]:
        """{dotted name: value} of an experiment's metrics (non-finite floats restored)."""
        with self._connect() as con:
            rows = con.execute("SELECT name, json FROM metrics WHERE experiment_id = ? ORDER BY rowid",
                               (exp_id,)).fetchall()
        return {name: self._loads(text) for name, text in rows}

    def add_artifact(self, exp_id: str, name: str, path: str | os.PathLike[str], *, trial_id: str | None = None,
                     sha256: str | None = None) -> ArtifactRecord:
        """Record a file (hashing it when ``sha256`` is not given); replaces an artifact of the same name."""
        p = Path(path).expanduser().resolve()
        if sha256 is None:
            if not p.is_file():
                raise DataError(f"artifact {name!r}: file {p} does not exist; write it before adding it")
            sha256 = _sha256_file(p)
        rec = ArtifactRecord(exp_id, trial_id, name, str(p), sha256)
        try:
            with self._tx() as con:
                con.execute("DELETE FROM artifacts WHERE experiment_id = ? AND trial_id IS ? AND name = ?",
                            (exp_id, trial_id, name))
                con.execute("INSERT INTO artifacts VALUES (?,?,?,?,?)", astuple(rec))
        except sqlite3.IntegrityError as e:
            raise ConfigError(f"cannot add artifact {name!r}: no experiment with id {exp_id!r} in {self.path}") from e
        return rec

    def artifacts(self, exp_id: str) -> list[ArtifactRecord]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM artifacts WHERE experiment_id = ? ORDER BY rowid", (exp_id,)).fetchall()
        return [ArtifactRecord(*r) for r in rows]

    def export(self, exp_id: str) -> dict[str, Any]:
        """Everything about one experiment as a strict-JSON dict (non-finite floats stay strings)."""
        exp = self.get_experiment(exp_id)
        out = to_jsonable(exp.to_dict())
        out["trials"] = [to_jsonable(asdict(t)) for t in self.trials(exp.id)]
        out["metrics"] = to_jsonable(self.metrics(exp.id))
        out["artifacts"] = [asdict(a) for a in self.artifacts(exp.id)]
        return out

