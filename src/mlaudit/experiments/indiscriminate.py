"""Experiment kind ``indiscriminate-poison``: the indiscriminate attacks of seed 001 (label flip,
parameter corruption GradPC, gradient canceling) judged as in its tables: the clean test accuracy
and the accuracy / drop of victims retrained from scratch by the factory on the poisoned training set
(mean +- SE over paired victims), plus, for the model-targeted attacks, the target's accuracy and the
reachability threshold tau (:mod:`mlaudit.attacks.poisoning.indiscriminate.threshold`).

Flow: the crafting model(s) w_c (``crafting``, shared with the other poisoning kinds) -> the poisoner
(``attack.method``, of the ``indiscriminate`` family of :data:`~mlaudit.attacks.poisoning.POISONERS`,
called with a :class:`~mlaudit.attacks.poisoning.PoisonTask`, returning a ``Poison``) -> for data attacks,
``victims`` clean and ``victims`` poisoned models trained in one factory job with paired seeds
(``victim`` sets their architecture / recipe); for ``param-corruption`` the corrupted crafting
models themselves are the "poisoned" models (no retraining: it overwrites weights).

Gradient canceling stationarity is that of the objective the *victim* minimises: its recipe's weight
decay (``attack.weight_decay: auto``) and label smoothing enter the canceled gradient (see
:mod:`~mlaudit.attacks.poisoning.indiscriminate.gradient_canceling`); tau uses the same weight decay.
See docs/indiscriminate.md for every field and the measured numbers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from torch import nn

from ..attacks.poisoning import Family
from ..attacks.poisoning.indiscriminate import num_poisons
from ..data.base import DataBundle
from ..data.export import export_view, view_digest
from ..errors import ConfigError
from ..query import ParamVector
from ..report.figures import accuracy_bars
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.evaluate import evaluate, stack_from_state_dicts
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .poison_task import PoisonAttack, attacker_models, check_attack, poison_task, run_poisoner
from .poisoning import PoisoningConfig, accuracy_summary, failed_victims_note, train_victims


class IndiscriminateAttack(PoisonAttack):
    """The ``attack`` block: ``method``, ``eps_d`` (inserted fraction P / N of the data attacks), the
    crafting settings of gradient canceling (default: 300 Adam steps of lr 0.01 pixels, cosine) and
    the method's options, also as flat keys (``flip``; ``eps_w``, ``target_steps``, ``target_lr``,
    ``target_batch_size``, ``weight_decay``; ``relabel_every``, ``label_rounds``, ``reach_tol``;
    ``chunk_size``); see docs/indiscriminate.md for each field."""

    family: ClassVar[Family] = "indiscriminate"
    method: str = "gradient-canceling"
    eps_d: float | None = Field(None, gt=0.0, le=100.0)

    @model_validator(mode="after")
    def _eps_d_for_data_attacks(self) -> IndiscriminateAttack:
        if self.entry.acts_on == "data" and self.eps_d is None:
            raise ValueError(f"method {self.method} inserts eps_d * N poison points: give attack.eps_d > 0 "
                             "(seed 001 uses 0.03, 0.1 and 1)")
        return self


class IndiscriminateConfig(PoisoningConfig):
    """See the module docstring and docs/indiscriminate.md."""

    kind: Literal["indiscriminate-poison"] = "indiscriminate-poison"
    attack: IndiscriminateAttack
    victims: int = Field(2, ge=1, le=1000)


def check_indiscriminate(config: IndiscriminateConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): crafting checkpoint (one architecture), a nonzero
    number of poisons, and the method's model requirements (no BatchNorm for the gradient-based
    methods, one crafting model for gradient canceling)."""
    a = config.attack
    check_attack(config, data, single_architecture=True)
    if a.eps_d is not None:
        try:
            num_poisons(a.eps_d, len(data.train))
        except ConfigError as e:
            raise ConfigError(f"attack.eps_d: {e}") from None


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
    entry = a.entry
    data = ctx.load_dataset(config.dataset)
    crafters, crafter_records = attacker_models(config, ctx, data, entry)
    crafter_acc = _test_accuracy(crafters, data, ctx.device)
    task = poison_task(config, ctx, data, crafters, seed=config.trial_seed(0, stream=Stream.ATTACK), eps_d=a.eps_d)
    poison, _ = run_poisoner(entry, task, ctx, f"crafting {a.method}")
    info = dict(poison.info)
    label, target_info = info.pop("label", a.method), info.pop("targets", [])
    notes = ([f"{a.method} overwrites weights: the 'poisoned' models are the corrupted crafting models, evaluated "
              "directly (no victims are retrained; `victims` is unused)"] if entry.acts_on == "model" else [])
    notes += info.pop("notes", [])
    targets = poison.models or []
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"method": a.method, "crafting_accuracy": MeanSE.of(crafter_acc).to_dict()}
    trials = [{"trial_id": r["trial_id"], "role": "crafter", "test_accuracy": acc}
              for r, acc in zip(crafter_records, crafter_acc)]
    target_acc = _test_accuracy(targets, data, ctx.device) if targets else []
    for i, (t, tinfo) in enumerate(zip(targets, target_info)):
        tinfo["accuracy"], tinfo["drop"] = target_acc[i], crafter_acc[i] - target_acc[i]
        tinfo["sha256"] = save_checkpoint(t.state_dict(), ctx.artifacts / f"target-{i:02d}.pt")
    if poison.view is not None:
        n = len(data.train)
        metrics.update(eps_d=a.eps_d, eps_d_actual=poison.view.num_inserted / n, poisons=poison.view.num_inserted)
        folder = export_view(poison.view, ctx.artifacts / "poisons", base_id=data.id, overwrite=True)
        metrics["export_digests"] = {folder.relative_to(ctx.out_dir).as_posix(): view_digest(folder)}
        save = bool(targets) and config.victim_model == config.crafting_model
        recs = train_victims(config, ctx, data, {"clean": None, "poisoned": poison.view}, victims=config.victims,
                             save_weights=save, on_failure="skip")
        metrics.update(accuracy_summary(recs["clean"], recs["poisoned"]))
        trials += [{"trial_id": r["trial_id"], "role": f"victim-{name}", "seed": r["seed"],
                    "test_accuracy": r["metrics"]["test_accuracy"]} for name, rs in recs.items() for r in rs]
        if save:
            d = {name: _distances(ctx, rs, targets[0]) for name, rs in recs.items()}
            metrics["target_distance"] = {name: MeanSE.of(v).to_dict() for name, v in d.items()}
    else:
        rows = [{"metrics": {"test_accuracy": v}} for v in crafter_acc]
        metrics.update(accuracy_summary(rows, [{"metrics": {"test_accuracy": v}} for v in target_acc]))
        trials += [{"trial_id": f"target-{i:02d}", "role": "corrupted", "test_accuracy": v}
                   for i, v in enumerate(target_acc)]
    if target_info:  # model-targeted: the target's tau (seed 001's threshold) and accuracy
        metrics["tau"] = float(np.mean([t["threshold"]["value"] for t in target_info]))
        metrics["tau_exact"] = all(t["threshold"]["exact"] for t in target_info)
        metrics["targets"] = target_info
        metrics["target_accuracy"] = MeanSE.of(target_acc).to_dict()
        eps = metrics.get("eps_d_actual", a.eps_d)
        metrics["reachable"] = None if eps is None else bool(eps >= metrics["tau"])
    metrics.update({k: v for k, v in info.items() if k not in metrics})
    figures = {"Test accuracy of clean and poisoned victims (mean ± SE)": accuracy_bars(
        {"clean": metrics["clean_accuracy"], label.lower(): metrics["poisoned_accuracy"]})}
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(config, metrics, label),
                            figures=figures, notes=failed_victims_note(ctx, metrics) + notes + _notes(metrics, data))


def _tables(config: IndiscriminateConfig, m: dict[str, Any], label: str) -> list[ReportTable]:
    model = config.victim_model.name
    cols = ["Model", "Clean Acc", f"{label} Acc/Drop"]
    row: list[Any] = [model, _pct(m["clean_accuracy"]["mean"]), _acc_drop(m["poisoned_accuracy"], m["drop"])]
    canceling = "residual_norm" in m  # a data attack aimed at a target (gradient canceling)
    if canceling:
        t = m["targets"][0]
        cols += [f"Target GradPC (eps_w={t['eps_w']:g}) Acc/Drop", "tau", "eps_d", "reachable", "reached"]
        row += [f"{_pct(t['accuracy'])} / {_pct(t['drop'])}", f"{m['tau']:.3g}{'' if m['tau_exact'] else ' (heuristic)'}",
                f"{m['eps_d_actual']:.3g}", m["reachable"], m["reached"]]
    elif "tau" in m:
        cols += ["tau"]
        row += [f"{m['tau']:.3g}{'' if m['tau_exact'] else ' (heuristic)'}"]
    tables = [ReportTable("Accuracy and drop (seed 001 layout; percent, drop = clean - poisoned, ± SE)", cols, [row])]
    if canceling:
        g = [["||g(mu; w_t) + lambda w_t|| (no poisons)", m["clean_grad_norm"]],
             ["||g(mu) + eps_d g(nu)|| (+ decay terms), crafted", m["residual_norm"]],
             ["relative residual", m["relative_residual"]],
             ["objective 1/2||.||^2 start -> end", f"{m['objective_init']:.4g} -> {m['objective']:.4g}"]]
        if "target_distance" in m:
            g += [[f"||w_victim - w_t||, {k} victims", v] for k, v in m["target_distance"].items()]
        tables.append(ReportTable("Gradient canceling at the target", ["quantity", "value"], g))
    return tables


def _notes(m: dict[str, Any], data: DataBundle) -> list[str]:
    notes = [f"dataset {data.name}: {len(data.train)} train / {len(data.test)} test; id {data.id}"]
    if "tau" in m:
        th = m["targets"][0]["threshold"]
        notes.append(
            f"tau = {m['tau']:.4g} for eps_d (seed 001 threshold with the multiclass constant W((K-1)/e) = "
            f"{th['constant']:.4f} and weight decay {th['weight_decay']:g}; seed 001's "
            f"binary formula <w, g>/0.2785 gives {th['tau_seed']:.4g}). "
            + ("Exact bound: the model is linear in its parameters." if m["tau_exact"] else
               "Heuristic: the model is not linear in its parameters, so tau is not a proven bound (seed 001 lists "
               "it for NN/CNN too)."))
    return notes
