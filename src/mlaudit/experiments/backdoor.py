"""Experiment kind ``backdoor``: plant a backdoor in the training set and measure it the way the
backdoor literature does, on victims retrained from scratch by the factory.

Threat model (:mod:`mlaudit.attacks.poisoning.backdoor`): the attacker poisons P = floor(budget x N)
training rows with a trigger (BadNets' patch, a blended pattern; dirty label: relabelled to the
target class; label-consistent: target-class rows made hard within eps, labels kept) or, for the
hidden-trigger methods (Hidden Trigger Backdoor, Sleeper Agent), crafts P target-class rows within eps
with no trigger on them (labels kept; the trigger appears on test inputs only); it knows neither the
victims' initialisation nor their data order. The victim trains from scratch, or, with ``victim.model``
starting from a pretrained ``init``, is fine-tuned from it (``train: all``) or only has its classifier
retrained over the frozen pretrained features (``train: head``: the transfer setting of Saha et al. 2020);
the report states which (:func:`.poisoning.victim_setting`).

Protocol: build the poison once with the ``backdoor`` poisoner ``attack.method`` (kept under
``artifacts/poisons/``, so a resumed run reuses it), then train ``victims`` models on the poisoned set
and, with ``baseline: true``, ``victims`` clean models (victim ``i`` has the same seed in both: paired),
all in one factory job. Each victim is scored on

* the **attack success rate** (ASR): the fraction of triggered test inputs of the source classes
  (those of the target class left out) that it classifies as the target class;
* its **clean accuracy**: accuracy on the clean test set.

Reported: both as mean +- SE over victims, for poisoned and clean victims (the clean victims' ASR is
the baseline: how often the trigger alone sends inputs to the target), the ASR gain and the clean
accuracy drop (paired by seed), the number of poisons and their rate P / N. Each victim's ASR is kept
in the run store (``ctx.derived``), so a resumed or grown run never recomputes it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..attacks.poisoning import Poison
from ..attacks.poisoning.backdoor import apply_trigger
from ..data.base import DataBundle
from ..report.figures import accuracy_bars, perturbation_grid
from ..report.html import ReportTable
from ..stats import MeanSE, mean_difference
from .backdoor_config import (  # noqa: F401  (the config is imported from here too)
    BackdoorAttack,
    BackdoorConfig,
    check_backdoor,
    source_test_rows,
)
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .poison_task import attacker_models, load_poison, poison_task, run_poisoner, save_poison
from .poisoning import failed_victims_note, finished_crafters, train_victims, victim_logits, victim_setting

GRID = 8
"""Poisons shown in the report's image grid."""


# the poison is saved and reloaded, and victim i has seed victim_seed(i) whatever victims is
@register_experiment("backdoor", config=BackdoorConfig, check=check_backdoor, growable=("victims",))
def run_backdoor(config: BackdoorConfig, ctx: RunContext) -> ExperimentOutput:
    """Backdoor attacks (BadNets, blended, label-consistent, Hidden Trigger, Sleeper Agent): attack success rate and clean accuracy +- SE."""
    data = ctx.load_dataset(config.dataset)
    a, opts = config.attack, config.attack.backdoor
    trigger = opts.trigger.build(data.input_shape)
    poison, seconds, crafters = build_poison(config, ctx, data)
    view = poison.view
    assert view is not None
    views = {"clean": None, "poisoned": view} if config.baseline else {"poisoned": view}
    recs = train_victims(config, ctx, data, views, victims=config.victims, save_weights=True,
                         label="training victims", on_failure="skip")

    rows = source_test_rows(config, data)
    x_trig = triggered_test_inputs(config, data)
    asr = {name: attack_success(config, ctx, data, rs, x_trig, keep_weights=config.save_models)
           for name, rs in recs.items()}
    acc = {name: np.array([r["metrics"]["test_accuracy"] for r in rs]) for name, rs in recs.items()}

    n = len(data.train)
    p = int(view.indices.numel())
    setting = victim_setting(config, data)
    metrics: dict[str, Any] = {
        "attack_success_rate": MeanSE.of(asr["poisoned"]).to_dict(),
        "clean_accuracy": MeanSE.of(acc["poisoned"]).to_dict(),
        "poisons": p, "poison_rate": p / n, "train_size": n, "asr_test_inputs": int(rows.sum()),
        "victim": {k: v for k, v in setting.items() if k != "phrase"},
    }
    if config.baseline:
        metrics |= {"baseline_attack_success_rate": MeanSE.of(asr["clean"]).to_dict(),
                    "baseline_clean_accuracy": MeanSE.of(acc["clean"]).to_dict(),
                    "asr_gain": mean_difference(asr["poisoned"], asr["clean"]),
                    "clean_accuracy_drop": mean_difference(acc["clean"], acc["poisoned"])}
    info = {k: v for k, v in poison.info.items() if k not in ("history", "trigger")}
    metrics["attack"] = {"method": a.method, "eps_255": a.eps, "trigger": opts.trigger.model_dump(mode="json"),
                         "poison_seconds": round(seconds, 3), **info}
    if crafters:
        c_acc = [r["metrics"]["test_accuracy"] for r in crafters if "metrics" in r]
        metrics["crafting_models"] = {"count": len(crafters),
                                      **({"test_accuracy": MeanSE.of(c_acc).to_dict()} if c_acc else {}),
                                      **({"source": crafters[0]["source"]} if "source" in crafters[0] else {})}
    trials = [{"trial_id": r["trial_id"], "view": name, "victim": r["tags"]["victim"], "seed": r["seed"],
               "attack_success_rate": float(asr[name][i]), "test_accuracy": r["metrics"]["test_accuracy"]}
              for name, rs in recs.items() for i, r in enumerate(rs)]
    notes = failed_victims_note(ctx, metrics) + [
        f"{p} of {n} training images of {data.name} poisoned ({100 * p / n:.2f}%) with {a.method}: "
        f"{opts.trigger.describe()}, target class {data.train.classes[opts.target_class]}"
        + ("" if a.eps is None else f", crafted within eps {a.eps:g}/255 outside the trigger (the trigger's pixels "
                                    "are outside that budget)" if view.eps is None else
           f", crafted within eps {a.eps:g}/255 with no trigger on them (the trigger appears on test inputs only)")
        + f". ASR: triggered test inputs of the source classes ({int(rows.sum())}, target class left out) classified "
        f"as the target; mean ± SE over {config.victims} victims, {setting['phrase']}"
        + (" (clean victims: same seeds, trained without poisons)." if config.baseline else ".")]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=[_table(config, metrics, setting["phrase"])],
                            figures=_figures(metrics, data.train.x, data.train.y, view, trigger.picture(),
                                             [str(c) for c in data.train.classes]),
                            notes=notes)


def build_poison(config: BackdoorConfig, ctx: RunContext, data: DataBundle) -> tuple[Poison, float, list[dict[str, Any]]]:
    """The config's poison (a view over the clean training split), its seconds and the records of the
    crafting models: built once by the ``backdoor`` poisoner ``attack.method`` and kept under
    ``artifacts/poisons/poison`` (a resumed run reloads exactly the poison of the interrupted one)."""
    a = config.attack
    loaded = load_poison(ctx, "poison", data.train, ids=torch.zeros(0, dtype=torch.long), eps=None)
    if loaded is not None:  # resumed: exactly the poison of the interrupted run
        return loaded[0], loaded[1], finished_crafters(ctx)
    eps = a.eps / 255 if a.eps is not None else None
    models, crafters = attacker_models(config, ctx, data, a.entry)
    task = poison_task(config, ctx, data, models, seed=config.trial_seed(0, stream=Stream.ATTACK), eps=eps)
    if getattr(task.options, "retrain_recipe", "given") is None:  # sleeper-agent retrains with the crafters' recipe
        task = replace(task, options=task.options.model_copy(update={"retrain_recipe": crafting_recipe(config)}))
    poison, seconds = run_poisoner(a.entry, task, ctx, f"poisoning with {a.method}")
    del models
    assert poison.view is not None  # backdoor poisoners return views
    poison.view = poison.view.with_meta(method=a.method)
    save_poison(ctx, "poison", poison, seconds=seconds)
    return poison, seconds, crafters


def crafting_recipe(config: BackdoorConfig) -> dict[str, Any]:
    """The recipe that trained the crafting models (``crafting.recipe``, else the config's), as a mapping
    with ``lr: auto`` resolved for the crafting architecture: what sleeper-agent retrains them with."""
    recipe = config.crafting.recipe or config.recipe
    return {**recipe.model_dump(mode="json"), "lr": recipe.resolved_lr(residual=config.crafting_model.residual)}


def triggered_test_inputs(config: BackdoorConfig, data: DataBundle) -> torch.Tensor:
    """The test inputs of the source classes (target class left out) with the trigger applied: what the
    attack success rate is measured on."""
    trigger = config.attack.backdoor.trigger.build(data.input_shape)
    return apply_trigger(data.test.x[source_test_rows(config, data)], trigger)


def attack_success(config: BackdoorConfig, ctx: RunContext, data: DataBundle, records: list[Any],
                   x_trig: torch.Tensor, *, keep_weights: bool = False) -> np.ndarray:
    """Attack success rate [V] of saved victims on the triggered inputs ``x_trig`` (the fraction
    classified as the target), kept in the run store under ``backdoor`` (:meth:`RunContext.derived`;
    the weights are released unless ``keep_weights``)."""
    target = config.attack.backdoor.target_class

    def score(recs: list[Any]) -> list[dict[str, int]]:
        pred = victim_logits(config, ctx, data, recs, x_trig).argmax(-1)  # [V, n]
        return [{"hits": int((p == target).sum()), "n": int(p.numel())} for p in pred]

    scored = ctx.derived(records, key="backdoor", compute=score, keep_weights=keep_weights)
    return np.array([s["hits"] / s["n"] for s in scored])


def _pct(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "mean": 100 * m["mean"], "se": 100 * m["se"]}


def _table(config: BackdoorConfig, metrics: dict[str, Any], setting: str) -> ReportTable:
    rows = []
    if config.baseline:
        rows.append(["clean (no poisons)", 0, _pct(metrics["baseline_attack_success_rate"]),
                     _pct(metrics["baseline_clean_accuracy"])])
    rows.append([f"poisoned ({config.attack.method})", metrics["poisons"], _pct(metrics["attack_success_rate"]),
                 _pct(metrics["clean_accuracy"])])
    return ReportTable("Attack success rate and clean accuracy of the victims",
                       ["training set", "poisons", "attack success rate (%)", "clean accuracy (%)"], rows,
                       note=f"mean ± SE over {config.victims} victims ({setting}; paired seeds); poison "
                            f"rate {100 * metrics['poison_rate']:.3g}% of {metrics['train_size']} training images")


def _figures(metrics: dict[str, Any], x: torch.Tensor, y: torch.Tensor, view: Any, picture: torch.Tensor,
             classes: list[str]) -> dict[str, Any]:
    ids = view.indices[:GRID]
    delta = view.delta[:GRID]
    labels = view.labels[ids]
    scale = max(float(delta.abs().max()), 1e-6)
    figs: dict[str, Any] = {}
    if ids.numel():
        figs["Trigger (on grey), clean training rows, poisons and their difference (scaled to ± its largest value)"] = (
            perturbation_grid(x[ids], delta, scale, n=GRID, lead=picture, lead_title="trigger",
                              titles=[f"{classes[int(a)]} -> {classes[int(b)]}" for a, b in zip(y[ids], labels,
                                                                                              strict=True)]))
    groups = {"clean victims": "baseline_", "poisoned victims": ""}
    for title, key in (("attack success rate", "attack_success_rate"), ("clean accuracy", "clean_accuracy")):
        bars = {g: metrics[f"{pre}{key}"] for g, pre in groups.items() if f"{pre}{key}" in metrics}
        figs[f"{title[0].upper()}{title[1:]} of clean and poisoned victims (mean ± SE)"] = accuracy_bars(bars, title=title)
    return figs
