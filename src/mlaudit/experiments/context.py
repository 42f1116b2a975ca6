"""RunContext: what an experiment kind gets to do its work, and the one owner of resume semantics.

* :meth:`RunContext.train` trains through the factory or the user's trainer, committing every model
  to the run store as it finishes (a resumed run skips finished trials) and returns typed
  :class:`TrialRecord` s;
* :meth:`RunContext.derived` computes a per-model output from the checkpoints once (a canary score,
  target predictions), keeps it in the store and releases the weights, so a resumed or grown run
  reuses it;
* :meth:`RunContext.save_cached` / :meth:`RunContext.load_cached` keep expensive artifacts (crafted
  poisons and canaries) so a resumed run reloads instead of crafting again;
* :meth:`RunContext.write_artifact` writes any other file atomically;
* :class:`Cost` accounts for what the run used."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..atomic import atomic_path
from ..data.base import DataBundle
from ..data.registry import DatasetSpec, load_dataset
from ..errors import ConfigError, DataError, TrainingError, TrialError
from ..factory import Executor, FactoryJob, LocalExecutor, TrainedModel, TrialSpec, train_many
from ..jsonutil import dumps, loads
from ..store import RunStore
from ..train.checkpoint import load_checkpoint, load_weights_only, save_checkpoint
from .progress import Progress

log = logging.getLogger(__name__)


class TrialRecord(dict):
    """One finished trial as the run store keeps it: a JSON mapping with typed accessors.

    Keys: ``trial_id``, ``seed``, ``tags``, ``metrics`` (test accuracy/loss, train loss, DP epsilon,
    ...), ``steps``, ``wall_s``, and ``checkpoint`` (path relative to the run folder) with ``sha256``
    while the weights are kept, ``outputs`` (what :meth:`RunContext.derived` kept) once released. It
    stays a ``dict`` so it round-trips through the store's JSON unchanged."""

    @property
    def trial_id(self) -> str:
        return str(self["trial_id"])

    @property
    def seed(self) -> int:
        return int(self["seed"])

    @property
    def tags(self) -> dict[str, Any]:
        return self.get("tags") or {}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.get("metrics") or {}

    @property
    def checkpoint(self) -> str | None:
        return self.get("checkpoint")

    @property
    def outputs(self) -> dict[str, Any]:
        return self.get("outputs") or {}


MAX_TRAINING_PATHS = 16
"""Distinct training paths kept in results.json's cost (the rest counted under ``other paths``)."""


@dataclass
class Cost:
    """Resources this process used for an experiment.

    ``models_trained`` counts models trained now (not those resumed from the store);
    ``train_wall_s`` the wall time of factory calls; ``gpu_seconds`` that wall time times the GPUs
    the executor held (CUDA only); ``peak_gpu_mem_mb`` the largest peak CUDA memory any chunk
    reported, wherever it ran (None on CPU); ``phases`` wall seconds of the named steps a kind timed
    with :meth:`timed` (where the time after training goes); ``training_paths`` how the factory trained the
    models (stack layout, step path, and the reason the factory gives for its choices: the layout probe's and
    ``recipe.compile: auto``'s timings) -> number of models, at most :data:`MAX_TRAINING_PATHS` entries.
    """

    models_trained: int = 0
    train_wall_s: float = 0.0
    gpu_seconds: float = 0.0
    peak_gpu_mem_mb: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    training_paths: dict[str, int] = field(default_factory=dict)

    def add_path(self, metrics: dict[str, Any]) -> None:
        """Count one trained model under its ``stack_layout`` / ``step_path`` / ``stack_layout_reason`` (a model
        trained by a user's function has none of these and is not counted)."""
        if "stack_layout" not in metrics:
            return
        key = (f"{metrics['stack_layout']}, {metrics.get('step_path', 'eager')}: "
               f"{metrics.get('stack_layout_reason', '')}")
        if key not in self.training_paths and len(self.training_paths) >= MAX_TRAINING_PATHS:
            key = "other paths"
        self.training_paths[key] = self.training_paths.get(key, 0) + 1

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``phases[name]`` (CUDA work is synchronised
        at the end, so a phase that only launched kernels is not credited to the next one)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - t0, 3)

    def add_peak(self, mb: float | None) -> None:
        if mb is not None:
            self.peak_gpu_mem_mb = max(self.peak_gpu_mem_mb or 0.0, mb)


@dataclass
class RunContext:
    """Handed to an experiment kind's ``run(config, ctx)``.

    ``finished`` maps trial ids already committed to the store (on resume) to their records;
    ``datasets`` holds bundles the runner loaded while validating (keyed by the spec's JSON).
    """

    out_dir: Path
    store: RunStore
    experiment_id: str
    device: str
    executor: Executor
    progress: Progress
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    datasets: dict[str, DataBundle] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Trials skipped after a training failure (``train(..., on_failure="skip")``): id -> error text."""
    _query_stash: dict[tuple[str, tuple[str, ...]], torch.Tensor] = field(default_factory=dict, repr=False)
    """Query logits read ahead by :meth:`query_logits` (``prefetch``), by (name, the records' query files)."""

    def __post_init__(self) -> None:
        self.finished = {k: TrialRecord(v) for k, v in self.finished.items()}

    @property
    def artifacts(self) -> Path:
        return self.out_dir / "artifacts"

    def checkpoint_path(self, trial_id: str) -> Path:
        return self.artifacts / "models" / f"{trial_id}.pt"

    def load_dataset(self, spec: DatasetSpec) -> DataBundle:
        """The bundle for ``spec``, loaded once per run (the runner preloads the config's dataset)."""
        key = spec.model_dump_json()
        if key not in self.datasets:
            self.datasets[key] = load_dataset(spec)
        return self.datasets[key]

    def train(self, job: FactoryJob, *, save_weights: bool = True, label: str = "training models",
              on_failure: str = "raise") -> list[TrialRecord]:
        """Train the job's trials that are not finished yet; returns one record per trial, in order.

        ``on_failure="skip"`` (for kinds whose trials are independent, e.g. ``train``): a trial whose
        training fails with a :class:`~mlaudit.errors.TrainingError` (a diverged loss, a user trainer's
        bad result) is recorded as failed in the store and in :attr:`failed`, the others go on, and the
        records of the finished trials are returned (failed ones left out); a resume retries it. Other
        errors still stop the run.

        Each model is committed to the run store (and its weights saved under
        ``artifacts/models/<trial_id>.pt``) the moment its chunk ends, so an interrupted run resumes
        from there. A record holds ``trial_id``, ``seed``, ``tags``, ``metrics``, ``steps``,
        ``wall_s`` and, when saved, ``checkpoint`` (relative path) and ``sha256``.

        Raises :class:`TrialError` naming the failed trial when training fails (a NaN loss, an
        out-of-memory error, ...); the failure is also recorded in the store. Invalid input
        (:class:`ConfigError`, :class:`DataError`) propagates unchanged.
        """
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
        if on_failure == "skip":
            return self._train_skipping(job, save_weights=save_weights, label=label)
        return self._train_once(job, save_weights=save_weights, label=label)

    def _train_once(self, job: FactoryJob, *, save_weights: bool, label: str) -> list[TrialRecord]:
        """:meth:`train` with ``on_failure="raise"``."""
        todo = self.pending(job.trials)
        if not todo:
            return [self.finished[t.trial_id] for t in job.trials]
        cuda = str(job.device).startswith("cuda")
        local = getattr(self.executor, "name", "") == "local"
        task = self.progress.task(label, total=len(job.trials), completed=len(job.trials) - len(todo))
        epochs = self.progress.task("  epochs of the current chunk", total=job.recipe.epochs) if local else None

        def epoch_done(epoch: int, k: int) -> None:
            self.progress.set(epochs, completed=epoch + 1,
                              description=f"  epochs of the current chunk ({k} model{'s' if k > 1 else ''})")

        def commit(m: TrainedModel) -> None:
            rec = self._record(m, save_weights)
            self.store.commit_trial(self.experiment_id, m.trial_id, rec, wall_s=m.wall_s)
            if "checkpoint" in rec:
                self.store.add_artifact(self.experiment_id, "checkpoint", self.out_dir / rec["checkpoint"],
                                        trial_id=m.trial_id, sha256=rec["sha256"])
            self.finished[m.trial_id] = rec
            self.cost.models_trained += 1
            self.cost.add_peak(m.metrics.get("peak_gpu_mem_mb"))  # each chunk's peak, measured where it ran
            self.cost.add_path(m.metrics)
            self.progress.advance(task)

        t0 = time.perf_counter()
        try:
            if isinstance(self.executor, LocalExecutor):
                self.executor.execute(job.with_trials(todo), on_result=commit, on_epoch=epoch_done)
            else:
                train_many(job.with_trials(todo), executor=self.executor, on_result=commit)
        except (ConfigError, DataError):
            raise
        except Exception as e:
            failed = failed_trial(self.pending(todo), e)
            self.store.fail_trial(self.experiment_id, failed.trial_id, f"{type(e).__name__}: {e}")
            raise TrialError(failed.trial_id, e) from e
        finally:
            wall = time.perf_counter() - t0
            self.cost.train_wall_s += wall
            if cuda:
                self.cost.gpu_seconds += wall * (1 if local else max(1, torch.cuda.device_count()))
            self.progress.done(task)
            self.progress.done(epochs)
        return [self.finished[t.trial_id] for t in job.trials]

    def _train_skipping(self, job: FactoryJob, *, save_weights: bool, label: str) -> list[TrialRecord]:
        """:meth:`train` with ``on_failure="skip"``: retrain the rest after each failed trial."""
        skipped: set[str] = set()
        while True:
            rest = [t for t in job.trials if t.trial_id not in skipped]
            try:
                self._train_once(job.with_trials(rest), save_weights=save_weights, label=label)
                break
            except TrialError as e:
                if not isinstance(e.__cause__, TrainingError):
                    raise
                skipped.add(e.trial_id)
                self.failed[e.trial_id] = f"{type(e.__cause__).__name__}: {e.__cause__}"
                log.warning("trial %s failed and is skipped: %s", e.trial_id, e.__cause__)
        return [self.finished[t.trial_id] for t in job.trials if t.trial_id in self.finished]

    def failed_note(self, metrics: dict[str, Any], *, what: str, effect: str = "are left out of every number here",
                    only: Callable[[str], bool] | None = None) -> list[str]:
        """Name the trials skipped after a failed training (``train(..., on_failure="skip")``) in
        ``metrics["failed_trials"]`` (``{"trial_id", "error"}`` each) and return the report note (none when
        nothing failed): "<count> <what> failed to train and <effect>: <id>: <error>; ...". ``only`` keeps the
        trial ids it accepts (one pool of several)."""
        failed = {t: e for t, e in self.failed.items() if only is None or only(t)}
        if not failed:
            return []
        metrics["failed_trials"] = [{"trial_id": t, "error": e} for t, e in failed.items()]
        return [f"{len(failed)} {what} failed to train and {effect}: "
                + "; ".join(f"{t}: {e}" for t, e in failed.items()) + " (a --resume retries them)"]

    def _record(self, m: TrainedModel, save_weights: bool) -> TrialRecord:
        rec = TrialRecord({"trial_id": m.trial_id, "seed": m.seed, "tags": m.tags, "metrics": m.metrics,
                               "steps": m.steps, "wall_s": m.wall_s})
        if save_weights:
            path = self.checkpoint_path(m.trial_id)
            rec["sha256"] = save_checkpoint(m.state_dict, path)
            rec["checkpoint"] = path.relative_to(self.out_dir).as_posix()
        if m.outputs:  # the job's query logits (FactoryJob.queries), one file per model: a resume reuses them
            path = self.artifacts / "queries" / f"{m.trial_id}.pt"
            rec["queries_sha256"] = save_checkpoint(m.outputs, path)
            rec["queries_file"] = path.relative_to(self.out_dir).as_posix()
        return rec

    def query_logits(self, records: Sequence[dict[str, Any]], name: str, *,
                     prefetch: Sequence[str] = ()) -> torch.Tensor | None:
        """The logits float32 [M, N, A, C] every record's model reported under the job's query ``name``
        while training (:class:`~mlaudit.factory.QueryPlan`), verified against their sha256; None when a
        record has none (trained without the query, e.g. by an older run), so the caller queries checkpoints.

        ``prefetch``: other query names the caller will ask for next, read from the same files now and kept until
        asked for (each file holds every query of its model, and each read checks the whole file's sha256). For 256
        files of a LiRA pool's size (pool [50000, 2, 10] and test [10000, 1, 10] float32, 1.1 GB), pool then test
        took 11.0 s read twice and 9.2 s with the test prefetched on the 2-core CPU of 2026-12-07 (torch.stack of
        the pool's 1 GB 4.2 s of it); the query phase of such a pool took 2.6 s on an H100 host."""
        if not records or any(not r.get("queries_file") for r in records):
            return None
        files = tuple(str(r["queries_file"]) for r in records)
        stashed = self._query_stash.pop((name, files), None)
        if stashed is not None:
            return stashed
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in (name, *prefetch)}
        for r in records:
            got = load_checkpoint(self.out_dir / r["queries_file"], sha256=r.get("queries_sha256"))
            if name not in got:
                return None
            for n, acc in parts.items():
                if n in got:
                    acc.append(got[n])
        for n in prefetch:
            if n != name and len(parts[n]) == len(records):
                self._query_stash[(n, files)] = torch.stack(parts[n])
        return torch.stack(parts[name])

    def release_weights(self, records: Sequence[dict[str, Any]], *, outputs: dict[str, Any] | None = None,
                        keep_weights: bool = False) -> None:
        """Delete the saved weights of finished trials once what the experiment needs from them is
        kept: each record is committed again without ``checkpoint``/``sha256`` and with
        ``outputs[trial_id]`` under ``"outputs"``, so a resumed run reuses it instead of retraining.
        ``keep_weights`` commits the outputs and leaves the weights (and their record entries) alone."""
        for rec in records:
            tid = rec["trial_id"]
            path = None if keep_weights else rec.pop("checkpoint", None)
            if not keep_weights:
                rec.pop("sha256", None)
            if outputs is not None and tid in outputs:
                rec["outputs"] = outputs[tid]
            self.store.commit_trial(self.experiment_id, tid, rec, wall_s=rec.get("wall_s") or 0.0)
            self.finished[tid] = TrialRecord(rec)
            if path:
                (self.out_dir / path).unlink(missing_ok=True)

    def derived(self, records: Sequence[TrialRecord], *, key: str, compute: Callable[..., Sequence[Any]],
                keep_weights: bool = False, items: Sequence[int | str] | None = None) -> list[Any]:
        """One output per record, derived from its checkpoint once: values kept in a record's
        ``outputs[key]`` (a resumed or grown run) are reused; the rest come from
        ``compute(records_without_it)`` (in order, one JSON-able value each) and are kept in the store;
        then the weights of those records are released unless ``keep_weights``.

        With ``items`` (e.g. target ids) the output is a mapping item -> value, grown as needed: a record
        is computed again only for the items it lacks, by ``compute(records, missing_items)`` returning
        one ``{item: value}`` per record, and each record gets back ``{item: value}`` for ``items``.
        A record with neither the output nor its weights is a :class:`DataError` (start a new ``--out``).
        """
        if items is None:
            values: list[Any] = [r.get("outputs", {}).get(key) for r in records]
            todo = [i for i, v in enumerate(values) if v is None]
        else:
            values = [{str(k): v for k, v in (r.get("outputs", {}).get(key) or {}).items()} for r in records]
            todo = [i for i, v in enumerate(values) if any(str(t) not in v for t in items)]
        if todo:
            recs = [records[i] for i in todo]
            gone = [r["trial_id"] for r in recs if not r.get("checkpoint")]
            if gone:
                raise DataError(f"models {', '.join(gone[:5])} have neither weights nor a kept {key!r} (their weights "
                                "were released by an earlier run); start a new --out")
            if items is None:
                new = list(compute(recs))
            else:
                need = sorted({t for i in todo for t in items if str(t) not in values[i]}, key=str)
                new = [{**values[i], **{str(k): v for k, v in got.items()}}
                       for i, got in zip(todo, compute(recs, need), strict=True)]
            if len(new) != len(recs):
                raise ValueError(f"derived {key!r}: compute returned {len(new)} values for {len(recs)} records")
            for i, v in zip(todo, new, strict=True):
                values[i] = v
            outs = {r["trial_id"]: {**r.get("outputs", {}), key: v} for r, v in zip(recs, new, strict=True)}
            self.release_weights(recs, outputs=outs, keep_weights=keep_weights)
        if items is None:
            return values
        return [{t: v[str(t)] for t in items} for v in values]

    def write_artifact(self, name: str, write: Callable[[BinaryIO], Any]) -> Path:
        """Write ``artifacts/<name>`` atomically: ``write(f)`` fills an open binary temp file that
        replaces the target only when it returns (``lambda f: np.save(f, a)``, ``lambda f:
        torch.save(obj, f)``, ``lambda f: f.write(text.encode())``)."""
        path = self.artifacts / name
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
        return path

    def save_cached(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                    folder: str = "cache") -> None:
        """Keep an expensive artifact (a crafted poison, a crafted canary) as ``artifacts/<folder>/<name>.pt``
        (tensors on the CPU) and ``.json`` (``meta``), both atomic; the JSON, written last, marks the
        pair complete, so a resumed run reloads it with :meth:`load_cached` instead of crafting again."""
        blob = {k: v.detach().cpu() for k, v in tensors.items()}
        self.write_artifact(f"{folder}/{name}.pt", lambda f: torch.save(blob, f))
        text = dumps(meta, where=f"{folder}/{name} metadata")
        self.write_artifact(f"{folder}/{name}.json", lambda f: f.write(text.encode("utf-8")))

    def load_cached(self, name: str, *, folder: str = "cache") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """What :meth:`save_cached` kept under ``name`` (weights-only load), or None when it is absent."""
        pt, js = self.artifacts / folder / f"{name}.pt", self.artifacts / folder / f"{name}.json"
        if not (pt.is_file() and js.is_file()):
            return None
        return load_weights_only(pt, what=f"{folder}/{name}"), loads(js.read_text(encoding="utf-8"))

    def pending(self, trials: Sequence[TrialSpec]) -> list[TrialSpec]:
        """The trials (in order) that have no committed record yet."""
        return [t for t in trials if t.trial_id not in self.finished]


def failed_trial(pending: Sequence[TrialSpec], error: BaseException) -> TrialSpec:
    """Which pending trial a training error belongs to.

    A :class:`~mlaudit.errors.TrainingError` carries the seed of the model that diverged; when exactly
    one pending trial has that seed it is the one. Otherwise it is the first pending trial: the
    factory trains chunks in trial order, so the chunk that failed holds the first unfinished trial
    (exact for the local executor; with parallel executors it is one of the trials in flight).
    """
    if not pending:
        raise ValueError("no pending trial to blame")
    seed = getattr(error, "seed", None)
    if seed is not None:
        hits = [t for t in pending if t.seed == seed]
        if len(hits) == 1:
            return hits[0]
    return pending[0]
