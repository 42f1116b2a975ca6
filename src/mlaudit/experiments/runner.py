"""Run an experiment end to end: validate -> check the data and model -> prepare the output folder
-> run the kind's trials through the factory (committing each to the run store) -> write
results.json and report.html.

Output folder layout::

    DIR/config.yaml      the resolved config (defaults filled in)
    DIR/results.json     metrics, per-trial records, cost, executor, device, versions, git revision
    DIR/report.html      self-contained report
    DIR/artifacts/       checkpoints (models/<trial>.pt) and experiment-specific files

Nothing is written (no folder, no store row) until the config validates, the dataset loads and the
model builds for it. A folder that already holds a different run is refused; the same run is
continued only with ``resume=True``, skipping the trials the run store holds as finished. A run holds
an exclusive lock on ``DIR/.mlaudit.lock`` from before its first write until it ends, so a second run
on the same folder is refused (the folder is checked again under the lock: check and claim are atomic).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_text
from ..data.base import DataBundle
from ..errors import ConfigError, MlauditError
from ..factory import Executor, make_executor
from ..headline import verdict
from ..jsonutil import config_hash, flatten, to_jsonable
from ..provenance import device_name, versions
from ..store import RunStore, default_store_path
from .base import ExperimentConfig, config_to_dict, experiment_kind, parse_config
from .context import RunContext
from .diagnostics import flag_models
from .preflight import check_device, preflight  # noqa: F401  (check_device is imported from here too)
from .progress import Progress, run_log
from .resume import (
    check_out_dir,
    config_growth,
    find_run,
    lock_out_dir,
    record_invocation,
    record_run_id,
    remove_stale_tmp,
    usable,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where a run wrote its files, its id in the run store, and the results.json content."""

    out_dir: Path
    experiment_id: str
    results: dict[str, Any]


def run_experiment(
    config: ExperimentConfig | dict[str, Any],
    *,
    out: str | Path,
    device: str = "auto",
    executor: str | Executor = "local",
    executor_options: dict[str, Any] | None = None,
    store: RunStore | str | Path | None = None,
    resume: bool = False,
    grow: bool = False,
    quiet: bool = False,
    data: DataBundle | None = None,
) -> RunResult:
    """Run ``config`` into folder ``out`` (see the module docstring) and return its results.

    ``grow=True`` (with ``resume=True``) continues the run in ``out`` under a config whose only
    changes are larger counts in the kind's growable fields (:attr:`ExperimentKind.growable`, e.g.
    targeted-poison's ``scenarios`` and ``victims``): its finished trials are kept, only the new ones
    are trained, and the results cover the grown study (``results.json`` records ``grown_from``).

    ``data`` (library API) is the already loaded dataset the config's ``dataset`` names, used instead of
    loading it again (the user's in-memory data).

    Raises :class:`ConfigError` / :class:`DataError` for invalid input before anything is written,
    :class:`TrialError` naming the trial when training fails, and :class:`MlauditError` for other
    failures during the run (the store then marks the run ``failed``; resume it with ``resume=True``).
    """
    cfg = config if isinstance(config, ExperimentConfig) else parse_config(config)
    if grow and not resume:
        raise ConfigError("grow extends an earlier run in place and needs resume (mlaudit run --resume DIR --grow)")
    dev = check_device(device)
    ex = make_executor(executor, **(executor_options or {})) if isinstance(executor, str) else executor
    resolved = config_to_dict(cfg)
    chash = config_hash(resolved)
    out_dir = Path(out).expanduser()
    kind = experiment_kind(cfg.kind)
    grown = check_out_dir(out_dir, resolved, resume=resume, growable=kind.growable if grow else None)
    data = preflight(cfg, data)
    if kind.check is not None:
        kind.check(cfg, data)
    rs = store if isinstance(store, RunStore) else RunStore(store or default_store_path())

    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_out_dir(out_dir):  # held until the run ends; a second process on this folder is refused
        grown = check_out_dir(out_dir, resolved, resume=resume, growable=kind.growable if grow else None)  # again, locked
        return _run_locked(cfg, kind, resolved, chash, out_dir, data, rs, dev, ex, grown, resume, quiet)


def _run_locked(cfg: ExperimentConfig, kind: Any, resolved: dict[str, Any], chash: str, out_dir: Path,
                data: DataBundle, rs: RunStore, dev: str, ex: Executor, grown: dict[str, tuple[int, int]],
                resume: bool, quiet: bool) -> RunResult:
    """The run itself, in the locked and checked output folder, with its log file attached."""
    with run_log(out_dir):
        had_run = (out_dir / "config.yaml").is_file()
        remove_stale_tmp(out_dir)
        write_atomic(out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        vers = versions()
        existing = find_run(rs, out_dir) if resume else None  # a fresh run never reuses old store rows
        if existing is not None and existing.config_hash == chash:
            exp_id = existing.id
        elif existing is not None and grown and config_growth(existing.config, resolved, kind.growable) == grown:
            exp_id = existing.id  # the same run, grown: its finished trials stay valid (see ExperimentKind.growable)
            rs.update_config(exp_id, resolved)
        else:
            if resume and had_run:
                log.warning("run store %s has no record of the run in %s; training every trial again "
                            "(pass the --store that the run used to skip its finished trials)", rs.path, out_dir)
            exp_id = rs.create_experiment(kind=cfg.kind, name=cfg.display_name, config=resolved, out_dir=out_dir,
                                          git_rev=vers["git_rev"], versions=vers)
        record_run_id(out_dir, exp_id)  # a moved folder finds its run by this id
        rs.set_status(exp_id, "running")
        log.info("run %s (%s) %s in %s: device %s, executor %s", exp_id, cfg.kind,
                 "resumed" if resume else "started", out_dir, dev, ex.name)
        finished = usable(rs.finished_trials(exp_id), out_dir)
        t0 = time.perf_counter()
        cuda = dev.startswith("cuda")
        status = "interrupted"
        with Progress(quiet=quiet) as progress:
            ctx = RunContext(out_dir=out_dir, store=rs, experiment_id=exp_id, device=dev, executor=ex,
                             progress=progress, finished=dict(finished),
                             datasets={cfg.dataset.model_dump_json(): data})
            try:
                output = kind.run(cfg, ctx)
                status = "done"
            except KeyboardInterrupt:
                rs.set_status(exp_id, "interrupted")
                raise
            except MlauditError:
                status = "failed"
                rs.set_status(exp_id, "failed")
                raise
            except Exception as e:
                status = "failed"
                rs.set_status(exp_id, "failed")
                raise MlauditError(f"run {exp_id} ({cfg.kind}) failed outside model training, with "
                                   f"{len(ctx.finished)} trials finished: {type(e).__name__}: {e}") from e
            finally:  # every invocation's cost is kept, so a resumed run reports the whole cost
                c = ctx.cost
                wall = time.perf_counter() - t0
                cumulative = record_invocation(out_dir, {
                    "status": status, "wall_s": round(wall, 3), "train_wall_s": round(c.train_wall_s, 3),
                    "models_trained": c.models_trained, "gpu_seconds": round(c.gpu_seconds, 3) if cuda else None,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        flags = flag_models(ctx.finished.values(), num_classes=data.num_classes)
        results = {
            "kind": cfg.kind,
            "name": cfg.display_name,
            "experiment_id": exp_id,
            "config_sha256": chash,
            "config": resolved,
            "metrics": output.metrics,
            "trials": output.trials,
            "cost": {
                "wall_s": round(wall, 3),
                "train_wall_s": round(c.train_wall_s, 3),
                "device": device_name(dev),
                "models_trained": c.models_trained,
                "models_resumed": len(finished),
                "models_per_minute": round(60 * c.models_trained / c.train_wall_s, 3)
                if c.train_wall_s > 0 and c.models_trained else None,
                "gpu_seconds": round(c.gpu_seconds, 3) if cuda else None,
                "peak_gpu_mem_mb": round(c.peak_gpu_mem_mb, 1) if c.peak_gpu_mem_mb is not None else None,
                **({"phases": dict(c.phases)} if c.phases else {}),
                **({"training_paths": dict(c.training_paths)} if c.training_paths else {}),
                "cumulative": cumulative,
            },
            **({"warnings": flags} if flags else {}),
            "executor": ex.name,
            "device": dev,
            **({"grown_from": {k: old for k, (old, _) in grown.items()}} if grown else {}),
            "versions": vers,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        results = to_jsonable(results)
        write_atomic(out_dir / "results.json", json.dumps(results, indent=2, allow_nan=False))
        from ..report.html import write_report

        with Progress(quiet=quiet) as bars:  # figures of big pools take seconds to draw
            task = bars.task("writing the report", total=1)
            write_report(out_dir / "report.html", title=f"mlaudit {cfg.kind}: {cfg.display_name}", config=resolved,
                         metrics=output.metrics, trials=output.trials, cost=results["cost"], versions=vers,
                         figures=output.figures, tables=output.tables, notes=output.notes,
                         verdict=verdict(cfg.kind, flatten(to_jsonable(output.metrics))), warnings=[f"WARNING: {w}" for w in flags])
            bars.advance(task)
        rs.put_metrics(exp_id, to_jsonable(output.metrics))
        rs.set_status(exp_id, "done")
        log.info("run %s done in %.1f s: %d models trained, %d resumed", exp_id, wall, c.models_trained, len(finished))
        return RunResult(out_dir, exp_id, results)


def resume_experiment(out: str | Path, **kwargs: Any) -> RunResult:
    """Resume the run in folder ``out`` from its config.yaml, skipping finished trials."""
    out_dir = Path(out).expanduser()
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(out_dir)!r} holds no run to resume (no config.yaml); give the --out folder "
                          "of an earlier `mlaudit run`")
    from ..config import load_yaml

    return run_experiment(load_yaml(cfg_file), out=out_dir, resume=True, **kwargs)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`mlaudit.atomic.write_text`)."""
    write_text(path, text)
