"""Experiment kind ``indiscriminate-poison``: the indiscriminate attacks of seed 001 (label flip,
parameter corruption GradPC, gradient canceling) judged as in its tables: the clean test accuracy
and the accuracy / drop of victims retrained from scratch by the factory on the poisoned training set
(mean +- SE over paired victims), plus, for the model-targeted attacks, the target's accuracy and the
reachability threshold tau (:mod:`mlaudit.attacks.indiscriminate.threshold`).

Flow: the crafting model(s) w_c (``crafting``, shared with the other poisoning kinds) -> the method
(``attack.method``, one of :data:`~mlaudit.attacks.indiscriminate.ATTACKS`) -> for data attacks,
``victims`` clean and ``victims`` poisoned models trained in one factory job with paired seeds
(``victim`` sets their architecture / recipe); for ``param-corruption`` the corrupted crafting
models themselves are the "poisoned" models (no retraining: it overwrites weights).

Gradient canceling stationarity is that of the objective the *victim* minimises: its recipe's weight
decay (``attack.weight_decay: auto``) and label smoothing enter the canceled gradient (see
:mod:`~mlaudit.attacks.indiscriminate.gradient_canceling`); tau uses the same weight decay.
See docs/indiscriminate.md for every field and the measured numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..attacks.indiscriminate import (
    ATTACKS,
    gradient_canceling,
    gradpc,
    label_flip,
    num_poisons,
    reachability_threshold,
)
from ..data.base import DataBundle
from ..data.export import export_view
from ..data.view import DataView
from ..errors import ConfigError, UnsupportedModelError
from ..models.registry import has_batchnorm
from ..query import ParamVector, model_template
from ..registry import Registry
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.evaluate import evaluate, stack_from_state_dicts
from .base import ExperimentOutput, register_experiment
from .context import RunContext
from .poisoning import (
    PoisoningConfig,
    accuracy_summary,
    check_crafting,
    crafting_models,
    train_victims,
)

ATTACK_STREAM = 303
"""Seed stream of the attack's own randomness (poison sampling, random labels)."""

_COMMON = {"method", "chunk_size"}
_TARGET = {"eps_w", "target_steps", "target_lr", "target_batch_size", "weight_decay"}
USES: dict[str, set[str]] = {
    "label-flip": _COMMON | {"eps_d", "flip"},
    "param-corruption": _COMMON | _TARGET | {"eps_d"},
    "gradient-canceling": _COMMON | _TARGET | {"eps_d", "steps", "lr", "optimizer", "schedule", "relabel_every",
                                               "label_rounds", "reach_tol"},
}
"""The ``attack`` fields each method reads; setting another one is an error (it would be ignored)."""


class AttackConfig(BaseModel):
    """The ``attack`` block; see docs/indiscriminate.md for each field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "gradient-canceling"
    eps_d: float | None = Field(None, gt=0.0, le=100.0)
    eps_w: float = Field(1.0, gt=0.0, le=1e6)
    target_steps: int = Field(50, ge=1, le=100_000)
    target_lr: float = Field(0.1, gt=0.0, le=1.0)
    target_batch_size: int | None = Field(None, ge=1)
    steps: int = Field(300, ge=0, le=100_000)
    lr: float = Field(0.01, gt=0.0, le=1.0)
    optimizer: Literal["adam", "signed-adam", "pgd"] = "adam"
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    relabel_every: int = Field(0, ge=0, le=100_000)
    label_rounds: int = Field(10, ge=0, le=1000)
    flip: Literal["random", "loss-max"] = "random"
    weight_decay: float | Literal["auto"] = "auto"
    reach_tol: float = Field(0.1, gt=0.0, lt=1.0)
    chunk_size: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in ATTACKS:
            raise ValueError(f"unknown method {v!r}; valid methods: {', '.join(ATTACKS.names())}")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _wd(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not (0.0 <= v <= 1.0):
            raise ValueError(f"weight_decay must be 'auto' (the victim recipe's) or a number in [0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _fields_for_method(self) -> AttackConfig:
        entry = ATTACKS.get(self.method)
        if entry.acts_on == "data" and self.eps_d is None:
            raise ValueError(f"method {self.method} inserts eps_d * N poison points: give attack.eps_d > 0 "
                             "(seed 001 uses 0.03, 0.1 and 1)")
        unused = sorted(self.model_fields_set - USES[self.method])
        if unused:
            raise ValueError(f"method {self.method} does not use {', '.join('attack.' + u for u in unused)}; "
                             f"its fields are {', '.join(sorted(USES[self.method]))}")
        return self


class IndiscriminateConfig(PoisoningConfig):
    """See the module docstring and docs/indiscriminate.md."""

    kind: Literal["indiscriminate-poison"] = "indiscriminate-poison"
    attack: AttackConfig
    victims: int = Field(2, ge=1, le=1000)

    @property
    def weight_decay(self) -> float:
        """lambda of the victim's objective: ``attack.weight_decay`` or the victim recipe's."""
        wd = self.attack.weight_decay
        return float(self.victim_recipe.weight_decay if wd == "auto" else wd)


def check_indiscriminate(config: IndiscriminateConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): crafting checkpoint, a nonzero number of poisons,
    no BatchNorm in the crafting model of gradient-based methods, one crafting model for canceling."""
    a = config.attack
    entry = ATTACKS.get(a.method)
    check_crafting(config, data, single_architecture=True)
    if a.eps_d is not None:
        try:
            num_poisons(a.eps_d, len(data.train))
        except ConfigError as e:
            raise ConfigError(f"attack.eps_d: {e}") from None
    spec = config.crafting_model
    if entry.smooth_only and has_batchnorm(model_template(spec, data)):
        where = "crafting.model" if config.crafting.model is not None else "model"
        raise UnsupportedModelError(
            f"{where}: attack.method {a.method} needs a model without BatchNorm, got {spec.name!r} with norm "
            f"{spec.norm!r} (BatchNorm's training gradient is not a sum of per-example gradients, so the target's "
            f"stationarity is undefined); set {where}: {{name: {spec.name}, norm: none}} (or group)")
    if a.method == "gradient-canceling" and config.crafting.ensemble > 1:
        raise ConfigError(f"crafting.ensemble = {config.crafting.ensemble}: gradient canceling targets one parameter "
                          "vector (GradPC of one clean model); set crafting.ensemble: 1")


@dataclass
class Outcome:
    """What a method produced: the poisoned ``view`` (data attacks), the target / corrupted models,
    method facts for the metrics, and report notes."""

    view: DataView | None
    targets: list[nn.Module] = field(default_factory=list)
    target_info: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Handler = Callable[[IndiscriminateConfig, RunContext, DataBundle, list[nn.Module]], Outcome]
_HANDLERS: Registry[Handler] = Registry("indiscriminate method handler")


def _generator(config: IndiscriminateConfig) -> torch.Generator:
    return torch.Generator().manual_seed(config.trial_seed(0, stream=ATTACK_STREAM))


def _inserted(data: DataBundle, x: torch.Tensor, y: torch.Tensor, **meta: Any) -> DataView:
    return DataView.identity(data.train).with_inserted(x.cpu(), y.cpu()).with_meta(**meta)


@_HANDLERS.register("label-flip")
def _label_flip(config: IndiscriminateConfig, ctx: RunContext, data: DataBundle, crafters: list[nn.Module]) -> Outcome:
    a = config.attack
    x, y = data.train.x.to(ctx.device), data.train.y.to(ctx.device)
    res = label_flip(x, y, eps_d=float(a.eps_d), num_classes=data.num_classes, strategy=a.flip, models=crafters,
                     generator=_generator(config))
    view = _inserted(data, res.x, res.y, method="label-flip", strategy=a.flip, eps_d=a.eps_d)
    return Outcome(view, info={"poisons": int(res.y.numel()), "strategy": a.flip, "crafting_loss_of_poisons": res.loss})


def _corrupt(config: IndiscriminateConfig, ctx: RunContext, data: DataBundle, model: nn.Module) -> tuple[nn.Module, dict]:
    a = config.attack
    x, y = data.train.x.to(ctx.device), data.train.y.to(ctx.device)
    res = gradpc(model, x, y, eps_w=a.eps_w, steps=a.target_steps, lr=a.target_lr, batch_size=a.target_batch_size,
                 chunk_size=a.chunk_size, generator=_generator(config))
    th = reachability_threshold(res.model, x, y, num_classes=data.num_classes, weight_decay=config.weight_decay,
                                chunk_size=a.chunk_size)
    info = {"eps_w": a.eps_w, "distance": res.distance, "train_loss_clean": res.loss_clean,
            "train_loss_target": res.loss_corrupted, "threshold": th.to_dict()}
    return res.model, info


@_HANDLERS.register("param-corruption")
def _param_corruption(config: IndiscriminateConfig, ctx: RunContext, data: DataBundle, crafters: list[nn.Module]
                      ) -> Outcome:
    out = Outcome(None, notes=["param-corruption overwrites weights: the 'poisoned' models are the corrupted crafting "
                               "models, evaluated directly (no victims are retrained; `victims` is unused)"])
    for m in crafters:
        t, info = _corrupt(config, ctx, data, m)
        out.targets.append(t)
        out.target_info.append(info)
    return out


@_HANDLERS.register("gradient-canceling")
def _gradient_canceling(config: IndiscriminateConfig, ctx: RunContext, data: DataBundle, crafters: list[nn.Module]
                        ) -> Outcome:
    a = config.attack
    target, tinfo = _corrupt(config, ctx, data, crafters[0])
    x, y = data.train.x.to(ctx.device), data.train.y.to(ctx.device)
    task = ctx.progress.task("crafting gradient-canceling poisons", total=a.steps)
    try:
        res = gradient_canceling(target, x, y, eps_d=float(a.eps_d), steps=a.steps, lr=a.lr, optimizer=a.optimizer,
                                 schedule=a.schedule, relabel_every=a.relabel_every, label_rounds=a.label_rounds,
                                 weight_decay=config.weight_decay,
                                 label_smoothing=config.victim_recipe.label_smoothing, chunk_size=a.chunk_size,
                                 generator=_generator(config), on_step=lambda s, v: ctx.progress.advance(task))
    finally:
        ctx.progress.done(task)
    view = _inserted(data, res.x, res.y, method="gradient-canceling", eps_d=a.eps_d, eps_w=a.eps_w)
    info = {"poisons": int(res.y.numel()), **res.summary(), "reached": bool(res.relative <= a.reach_tol),
            "reach_tol": a.reach_tol, "history": res.history[:: max(1, len(res.history) // 100)]}
    return Outcome(view, [target], [tinfo], info)


def _test_accuracy(models: list[nn.Module], data: DataBundle, device: str) -> list[float]:
    stack = stack_from_state_dicts(models[0], [m.state_dict() for m in models], device)
    return [float(v) for v in evaluate(stack, data.test.to(device))["accuracy"]]


def _distances(ctx: RunContext, records: list[dict[str, Any]], target: nn.Module) -> list[float]:
    wt = ParamVector.from_module(target).to("cpu")
    out = []
    for r in records:
        sd = load_checkpoint(ctx.out_dir / r["checkpoint"], sha256=r.get("sha256"))
        out.append(float((ParamVector({k: sd[k].float() for k in wt}) - wt).norm()))
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _acc_drop(acc: dict[str, Any], drop: dict[str, Any]) -> str:
    se = drop.get("se", math.nan)
    tail = f" ± {100 * se:.2f}" if isinstance(se, float) and math.isfinite(se) else ""
    return f"{_pct(acc['mean'])} / {_pct(drop['mean'])}{tail}"


@register_experiment("indiscriminate-poison", config=IndiscriminateConfig, check=check_indiscriminate)
def run_indiscriminate(config: IndiscriminateConfig, ctx: RunContext) -> ExperimentOutput:
    """Indiscriminate poisoning (seed 001): label flip, GradPC, gradient canceling; victim accuracy drop."""
    a = config.attack
    entry = ATTACKS.get(a.method)
    data = ctx.load_dataset(config.dataset)
    crafters, crafter_records = crafting_models(config, ctx, data)
    crafter_acc = _test_accuracy(crafters, data, ctx.device)
    out = _HANDLERS.get(a.method)(config, ctx, data, crafters)
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"method": a.method, "crafting_accuracy": MeanSE.of(crafter_acc).to_dict()}
    trials = [{"trial_id": r["trial_id"], "role": "crafter", "test_accuracy": acc}
              for r, acc in zip(crafter_records, crafter_acc)]
    target_acc = _test_accuracy(out.targets, data, ctx.device) if out.targets else []
    for i, (t, info) in enumerate(zip(out.targets, out.target_info)):
        info["accuracy"], info["drop"] = target_acc[i], crafter_acc[i] - target_acc[i]
        info["sha256"] = save_checkpoint(t.state_dict(), ctx.artifacts / f"target-{i:02d}.pt")
    if out.view is not None:
        n = len(data.train)
        metrics.update(eps_d=a.eps_d, eps_d_actual=out.view.num_inserted / n, poisons=out.view.num_inserted)
        export_view(out.view, ctx.artifacts / "poisons", base_id=data.id)
        same_arch = config.victim_model == config.crafting_model
        save = bool(out.targets) and same_arch
        recs = train_victims(config, ctx, data, {"clean": None, "poisoned": out.view}, victims=config.victims,
                             save_weights=save)
        metrics.update(accuracy_summary(recs["clean"], recs["poisoned"]))
        trials += [{"trial_id": r["trial_id"], "role": f"victim-{name}", "seed": r["seed"],
                    "test_accuracy": r["metrics"]["test_accuracy"]} for name, rs in recs.items() for r in rs]
        if save:
            d = {name: _distances(ctx, rs, out.targets[0]) for name, rs in recs.items()}
            metrics["target_distance"] = {name: MeanSE.of(v).to_dict() for name, v in d.items()}
    else:
        rows = [{"metrics": {"test_accuracy": v}} for v in crafter_acc]
        metrics.update(accuracy_summary(rows, [{"metrics": {"test_accuracy": v}} for v in target_acc]))
        trials += [{"trial_id": f"target-{i:02d}", "role": "corrupted", "test_accuracy": v}
                   for i, v in enumerate(target_acc)]
    if entry.has_target:
        taus = [info["threshold"]["value"] for info in out.target_info]
        metrics["tau"] = float(np.mean(taus))
        metrics["tau_exact"] = all(info["threshold"]["exact"] for info in out.target_info)
        metrics["targets"] = out.target_info
        metrics["target_accuracy"] = MeanSE.of(target_acc).to_dict()
        eps = metrics.get("eps_d_actual", a.eps_d)
        metrics["reachable"] = None if eps is None else bool(eps >= metrics["tau"])
    metrics.update({k: v for k, v in out.info.items() if k not in metrics})
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(config, metrics),
                            notes=out.notes + _notes(config, metrics, data))


def _tables(config: IndiscriminateConfig, m: dict[str, Any]) -> list[ReportTable]:
    a = config.attack
    label = {"label-flip": f"Label flip ({a.flip})", "param-corruption": f"GradPC (eps_w={a.eps_w:g})",
             "gradient-canceling": "Gradient canceling"}[a.method]
    model = config.victim_model.name
    cols = ["Model", "Clean Acc", f"{label} Acc/Drop"]
    row: list[Any] = [model, _pct(m["clean_accuracy"]["mean"]), _acc_drop(m["poisoned_accuracy"], m["drop"])]
    if a.method == "gradient-canceling":
        t = m["targets"][0]
        cols += [f"Target GradPC (eps_w={a.eps_w:g}) Acc/Drop", "tau", "eps_d", "reachable", "reached"]
        row += [f"{_pct(t['accuracy'])} / {_pct(t['drop'])}", f"{m['tau']:.3g}{'' if m['tau_exact'] else ' (heuristic)'}",
                f"{m['eps_d_actual']:.3g}", m["reachable"], m["reached"]]
    elif a.method == "param-corruption":
        cols += ["tau"]
        row += [f"{m['tau']:.3g}{'' if m['tau_exact'] else ' (heuristic)'}"]
    tables = [ReportTable("Accuracy and drop (seed 001 layout; percent, drop = clean - poisoned, ± SE)", cols, [row])]
    if a.method == "gradient-canceling":
        g = [["||g(mu; w_t) + lambda w_t|| (no poisons)", m["clean_grad_norm"]],
             ["||g(mu) + eps_d g(nu)|| (+ decay terms), crafted", m["residual_norm"]],
             ["relative residual", m["relative_residual"]],
             ["objective 1/2||.||^2 start -> end", f"{m['objective_init']:.4g} -> {m['objective']:.4g}"]]
        if "target_distance" in m:
            g += [[f"||w_victim - w_t||, {k} victims", v] for k, v in m["target_distance"].items()]
        tables.append(ReportTable("Gradient canceling at the target", ["quantity", "value"], g))
    return tables


def _notes(config: IndiscriminateConfig, m: dict[str, Any], data: DataBundle) -> list[str]:
    notes = [f"dataset {data.name}: {len(data.train)} train / {len(data.test)} test; id {data.id}"]
    if "tau" in m:
        notes.append(
            f"tau = {m['tau']:.4g} for eps_d (seed 001 threshold with the multiclass constant W((K-1)/e) = "
            f"{m['targets'][0]['threshold']['constant']:.4f} and weight decay {config.weight_decay:g}; seed 001's "
            f"binary formula <w, g>/0.2785 gives {m['targets'][0]['threshold']['tau_seed']:.4g}). "
            + ("Exact bound: the model is linear in its parameters." if m["tau_exact"] else
               "Heuristic: the model is not linear in its parameters, so tau is not a proven bound (seed 001 lists "
               "it for NN/CNN too)."))
    if config.attack.method == "gradient-canceling" and config.victim_recipe.label_smoothing > 0:
        notes.append("the victim recipe uses label smoothing: gradient canceling includes it, tau is for hard labels")
    return notes
