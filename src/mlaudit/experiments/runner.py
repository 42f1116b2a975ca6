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
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..atomic import write_text
from ..data.base import DataBundle
from ..errors import ConfigError, MlauditError, UnsupportedModelError
from ..factory import Executor, make_executor
from ..factory.spec import resolve_device
from ..jsonutil import config_hash, to_jsonable
from ..models.registry import ModelSpec, build_model
from ..provenance import device_name, versions
from ..store import RunStore, default_store_path
from ..train.recipe import Recipe
from .base import ExperimentConfig, config_to_dict, experiment_kind, parse_config
from .context import RunContext
from .diagnostics import flag_models
from .progress import Progress
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
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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

        write_report(out_dir / "report.html", title=f"mlaudit {cfg.kind}: {cfg.display_name}", config=resolved,
                     metrics=output.metrics, trials=output.trials, cost=results["cost"], versions=vers,
                     figures=output.figures, tables=output.tables, notes=[*(f"WARNING: {w}" for w in flags), *output.notes])
        rs.put_metrics(exp_id, to_jsonable(output.metrics))
        rs.set_status(exp_id, "done")
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


def check_device(device: str) -> str:
    """Validate ``auto``/``cpu``/``cuda[:N]`` and resolve ``auto``; returns e.g. ``"cpu"``, ``"cuda"``."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    dev = str(resolve_device(device))
    if dev.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device; "
                              "use --device cpu or --device auto")
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if index >= n:
            raise ConfigError(f"device {device!r}: there are {n} CUDA devices (cuda:0 to cuda:{n - 1})")
    return dev


def preflight(cfg: ExperimentConfig, data: DataBundle | None = None) -> DataBundle:
    """Load the config's dataset (unless given), build its model once for that data and run it on two
    inputs, and import the user's trainer and check its signature, so that missing or corrupt files,
    import strings that do not resolve and model/data mismatches are reported before anything is
    written. This is the first place user code (import strings) is imported. Returns the data."""
    from ..data.registry import load_dataset
    from ..models.registry import check_output
    from ..train.trainer import UserTrainer

    data = load_dataset(cfg.dataset) if data is None else data
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
        check_output(model, input_shape=data.input_shape, num_classes=cfg.model.num_classes or data.num_classes,
                     name=cfg.model.name)
    if cfg.user_trainer is not None:
        UserTrainer(cfg.user_trainer)
    for where, spec, recipe in dp_trainings(cfg):
        check_dp_recipe(where, spec, recipe, data, extra=getattr(getattr(cfg, "attack", None), "eps_d", None))
    return data


def dp_trainings(cfg: ExperimentConfig) -> list[tuple[str, ModelSpec, Recipe]]:
    """(recipe field, architecture, recipe) of every model the kind trains with mlaudit's DP-SGD: the
    config's models, or for the poisoning kinds the victims and the factory-trained crafting models."""
    if cfg.trainer != "mlaudit":
        return []  # the user's trainer does its own training (dp-audit: recipe.dp states the claim)
    victim = getattr(cfg, "victim", None)
    if victim is None:
        found = [("recipe", cfg.model, cfg.recipe)]
    else:
        from ..attacks.poisoning.contract import Needs

        found = [("victim.recipe" if victim.recipe else "recipe", victim.model or cfg.model, victim.recipe or cfg.recipe)]
        crafting = cfg.crafting  # type: ignore[attr-defined]
        if Needs.CRAFTING_MODELS in cfg.attack.entry.needs and crafting.checkpoint is None:  # type: ignore[attr-defined]
            found += [("crafting.recipe" if crafting.recipe else "recipe", spec, crafting.recipe or cfg.recipe)
                      for spec in dict.fromkeys(crafting.specs(cfg.model))]
    return [f for f in found if f[2].dp is not None]


def check_dp_recipe(where: str, spec: ModelSpec, recipe: Recipe, data: DataBundle, *, extra: float | None = None) -> None:
    """Before anything is written: the architecture has no BatchNorm and a target ``dp.epsilon`` is
    finite and reachable (even sigma = MAX_NOISE_MULTIPLIER gives less) with q and steps for the largest
    training set the kind uses (N, or N (1 + ``extra``) with inserted poisons), so that a refusal here
    is one that training would make too (training checks each model's own set, and delta, again)."""
    from ..privacy.accountant import MAX_NOISE_MULTIPLIER, epsilon
    from ..privacy.dpsgd import check_dp_model
    from ..query import model_template

    dp = recipe.dp
    assert dp is not None
    try:
        check_dp_model([model_template(spec, data)])
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}.dp with model {spec.name!r} (norm {spec.norm!r}): {e}") from None
    n = len(data.train)
    if dp.epsilon is None:
        return
    if not math.isfinite(dp.epsilon):
        raise ConfigError(f"{where}.dp.epsilon = {dp.epsilon}: a target epsilon must be a finite number > 0 "
                          "(for training without privacy drop the dp block)")
    n_max = n + math.ceil(n * extra) if extra else n
    q = dp.sample_rate if dp.sample_rate is not None else min(1.0, recipe.batch_size / n_max)
    steps = recipe.epochs * (math.ceil(n_max / recipe.batch_size) if dp.sample_rate is None
                             else max(1, math.ceil(1.0 / dp.sample_rate - 1e-9)))
    with warnings.catch_warnings():  # at this sigma the accountant's best order is its largest: expected here
        warnings.simplefilter("ignore")
        floor = epsilon(noise_multiplier=MAX_NOISE_MULTIPLIER, sample_rate=q, steps=steps, delta=dp.delta,
                        accountant=dp.accountant)
    if dp.epsilon < floor:
        raise ConfigError(f"{where}.dp.epsilon = {dp.epsilon:g} cannot be reached: with q = {q:.4g}, {steps} steps "
                          f"({recipe.epochs} epoch{'s' * (recipe.epochs != 1)} on {n_max} examples), delta = {dp.delta:g} and the {dp.accountant!r} "
                          f"accountant even sigma = {MAX_NOISE_MULTIPLIER:g} gives epsilon {floor:.4g}; ask for "
                          f"epsilon >= {floor:.3g}, or a larger delta")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`mlaudit.atomic.write_text`)."""
    write_text(path, text)
