"""Run an experiment end to end: validate -> prepare the output folder -> run the kind's trials
through the factory (committing each to the run store) -> write results.json and report.html.

Output folder layout::

    DIR/config.yaml      the resolved config (defaults filled in)
    DIR/results.json     metrics, per-trial records, cost, executor, device, versions, git revision
    DIR/report.html      self-contained report
    DIR/artifacts/       checkpoints (models/<trial>.pt) and experiment-specific files

Nothing is written before the config validates. A folder that already holds a different run is
refused; the same run unfinished is resumed only with ``resume=True``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..errors import ConfigError, MlauditError, TrialError
from ..factory import make_executor
from ..factory.spec import resolve_device
from ..jsonutil import config_hash, to_jsonable
from ..store import RunStore, default_store_path
from .base import ExperimentConfig, config_to_dict, experiment_kinds, parse_config
from .context import RunContext
from .progress import Progress


@dataclass
class RunResult:
    out_dir: Path
    experiment_id: str
    results: dict[str, Any]


def run_experiment(
    config: ExperimentConfig | dict[str, Any],
    *,
    out: str | Path,
    device: str = "auto",
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    store: RunStore | str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run ``config`` into folder ``out``; see the module docstring. Returns the results dict."""
    cfg = config if isinstance(config, ExperimentConfig) else parse_config(config)
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    dev = str(resolve_device(device))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    ex = make_executor(executor, **(executor_options or {}))
    resolved = config_to_dict(cfg)
    chash = config_hash(resolved)
    out_dir = Path(out)
    _check_out_dir(out_dir, chash, resume)
    rs = store if isinstance(store, RunStore) else RunStore(store or default_store_path())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    existing = rs.find_by_out_dir(str(out_dir.resolve()))
    if existing is not None and existing.config_hash == chash:
        exp_id = existing.id
    else:
        exp_id = rs.create_experiment(kind=cfg.kind, name=cfg.display_name, config=resolved,
                                      out_dir=str(out_dir.resolve()), git_rev=git_revision(), versions=versions())
    rs.set_status(exp_id, "running")
    finished = rs.finished_trials(exp_id)
    t0 = time.perf_counter()
    kind = experiment_kinds()[cfg.kind]
    with Progress(quiet=quiet) as progress:
        ctx = RunContext(out_dir=out_dir, store=rs, experiment_id=exp_id, device=dev, executor=ex,
                         progress=progress, finished=dict(finished))
        ctx.cost.models_trained = 0
        try:
            output = kind.run(cfg, ctx)
        except KeyboardInterrupt:
            rs.set_status(exp_id, "interrupted")
            raise
        except MlauditError:
            rs.set_status(exp_id, "failed")
            raise
        except Exception as e:
            rs.set_status(exp_id, "failed")
            raise TrialError(_current_trial(ctx), e) from e
    wall = time.perf_counter() - t0
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
            "train_wall_s": round(ctx.cost.train_wall_s, 3),
            "models_trained": ctx.cost.models_trained,
            "models_resumed": len(finished),
            "models_per_minute": round(60 * ctx.cost.models_trained / ctx.cost.train_wall_s, 3)
            if ctx.cost.train_wall_s > 0 else None,
            "gpu_seconds": round(ctx.cost.gpu_seconds, 3),
            "peak_gpu_mem_mb": ctx.cost.peak_gpu_mem_mb,
            "device": device_name(dev),
        },
        "executor": ex.name,
        "device": dev,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(out_dir / "results.json", json.dumps(to_jsonable(results), indent=2, allow_nan=False))
    from ..report.html import write_report

    write_report(out_dir / "report.html", title=f"mlaudit {cfg.kind}: {cfg.display_name}", config=resolved,
                 metrics=output.metrics, trials=output.trials, cost=results["cost"], versions=results["versions"],
                 figures=output.figures, tables=output.tables, notes=output.notes)
    rs.put_metrics(exp_id, to_jsonable(output.metrics))
    rs.set_status(exp_id, "done")
    return RunResult(out_dir, exp_id, results)


def resume_experiment(out: str | Path, **kwargs: Any) -> RunResult:
    """Resume the run in folder ``out`` from its config.yaml, skipping finished trials."""
    out_dir = Path(out)
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(out_dir)!r} holds no run to resume (no config.yaml)")
    from ..config import load_yaml

    return run_experiment(load_yaml(cfg_file), out=out_dir, resume=True, **kwargs)


def _check_out_dir(out_dir: Path, chash: str, resume: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"output path {str(out_dir)!r} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"output folder {str(out_dir)!r} is not empty and holds no mlaudit run; choose another --out")
    try:
        old = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError:
        old = None
    if not isinstance(old, dict) or config_hash(old) != chash:
        raise ConfigError(f"output folder {str(out_dir)!r} already holds a different run; choose another --out")
    if not resume:
        raise ConfigError(f"output folder {str(out_dir)!r} already holds this run; pass --resume to continue it "
                          "or choose another --out")


def _current_trial(ctx: RunContext) -> str:
    return f"after {len(ctx.finished)} finished trials"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def device_name(dev: str) -> str:
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, Any]:
    return {
        "mlaudit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "git_rev": git_revision(),
    }


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
