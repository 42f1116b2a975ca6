"""Experiment kind ``targeted-poison``: targeted clean-label poisoning (Witches' Brew and its
baselines) evaluated by the protocol of seed 002, section 1.7.

Threat model (section 1.3.1): the attacker perturbs P = budget * N training images of the
adversarial class within an l-inf ball of radius eps/255 (labels unchanged), knowing a pretrained
crafting model (or an ensemble) but not the victim's initialisation, data order or augmentation;
the victim trains from scratch on the poisoned set (or is fine-tuned from, or with ``victim.model.train:
head`` has only its classifier retrained over, a pretrained ``init``: the transfer setting of Shafahi et
al. 2018, where the crafting model defaults to that pretrained model). Success means the target test image is
classified as the adversarial class (not merely misclassified).

Protocol, per scenario (drawn from the paper's seed series, :mod:`mlaudit.attacks.poisoning.targeted.scenario`):
craft once with the ``targeted`` poisoner ``attack.method`` (restarts keep the best by the objective), then retrain ``victims`` fresh models on the
poisoned set through the factory (all scenarios and the clean baseline in one batched job, victim
``i`` with the same seed everywhere). Reported: average poison success +- standard error over
scenarios (each scenario's success averaged over its victims and targets), the same rate for clean
victims (the baseline), victim clean test accuracy, per-victim outcomes, crafting and victim time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from ..attacks.poisoning import Poison, Target
from ..attacks.poisoning.targeted.alignment import alignment_curves
from ..attacks.poisoning.targeted.scenario import Scenario
from ..data.base import DataBundle
from ..data.export import export_view, view_digest
from ..data.view import DataView
from ..errors import ConfigError
from ..models.registry import model_entry
from ..query import model_template
from ..report.figures import alignment_figure, perturbation_grid, success_figure
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.loop import resolve_augment
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .poison_task import (
    attacker_models,
    check_attack,
    has_poison,
    load_poison,
    poison_task,
    run_poisoner,
    save_poison,
)
from .poisoning import (
    failed_victims_note,
    finished_crafters,
    train_victims,
    victim_predictions,
    victim_setting,
)
from .targeted_poison_config import (  # noqa: F401  (the config is imported from here too)
    ExplicitScenario,
    TargetedAttack,
    TargetedPoisonConfig,
    build_scenarios,
)

GRID_POISONS = 6
"""Poisons of scenario 0 shown in the report's image grid, after the target."""


def check_targeted(config: TargetedPoisonConfig, data: DataBundle) -> None:
    """Runner hook: scenarios fit the data, the crafting checkpoint fits the model, the method can use
    the crafting architecture, the budget is >= 1 poison (DP recipes: the runner's preflight)."""
    if round(config.attack.budget * (n := len(data.train))) < 1:  # (the scenarios would round it up to one)
        raise ConfigError(f"attack.budget = {config.attack.budget:g} of {n} training examples rounds to 0 poisons; "
                          f"use budget >= 1/N = {1 / n:.3g} (one poison)")
    build_scenarios(config, data)
    check_attack(config, data)


def _poison_name(sc: Scenario) -> str:
    return f"scenario-{sc.index:03d}"


def _poison(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, models: list, sc: Scenario
            ) -> tuple[Poison, float]:
    """Craft (or, on resume, reload) the scenario's poison; returns it and the crafting seconds."""
    ids, eps = torch.tensor(sc.poison_ids), config.attack.eps / 255
    loaded = load_poison(ctx, _poison_name(sc), data.train, ids=ids, eps=eps)
    if loaded is not None:
        return loaded[0], loaded[1]
    target = Target(data.test.x[list(sc.target_ids)].to(ctx.device), sc.target_class, sc.adv_class)
    task = poison_task(config, ctx, data, models, seed=config.trial_seed(sc.index, stream=Stream.ATTACK), eps=eps,
                       poison_ids=ids, target=target)
    poison, secs = run_poisoner(config.attack.entry, task, ctx, f"crafting scenario {sc.index} ({config.attack.method})")
    save_poison(ctx, _poison_name(sc), poison, seconds=secs)
    return poison, secs


def craft_scenarios(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, scenarios: list[Scenario]
                    ) -> tuple[dict[int, tuple[Poison, float]], list[dict[str, Any]]]:
    """Every scenario's poison and crafting seconds (by scenario index), crafted or reloaded from an
    earlier run, and the records of the attacker's models (built only when some scenario still needs
    crafting; else those an earlier run trained)."""
    brewed: dict[int, tuple[Poison, float]] = {}
    models: list | None = None  # the attacker's models, built only if some scenario still needs crafting
    crafter_records: list[dict[str, Any]] = []
    for sc in scenarios:
        if models is None and not has_poison(ctx, _poison_name(sc)):
            models, crafter_records = attacker_models(config, ctx, data, config.attack.entry)
        brewed[sc.index] = _poison(config, ctx, data, models or [], sc)
    del models
    if not crafter_records:  # every poison came from an earlier run: report its crafting models
        crafter_records = finished_crafters(ctx)
    return brewed, crafter_records


# scenario k's seed, poisons and victims "s<k>-v<i>" (seed victim_seed(i)) do not depend on the counts,
# so a study can grow: 4 scenarios x 2 victims resumed with scenarios 8 trains only the new ones
@register_experiment("targeted-poison", config=TargetedPoisonConfig, check=check_targeted,
                     growable=("scenarios", "victims"))
def run_targeted_poison(config: TargetedPoisonConfig, ctx: RunContext) -> ExperimentOutput:
    """Targeted clean-label poisoning (Witches' Brew and baselines): poison success +- SE over scenarios."""
    data = ctx.load_dataset(config.dataset)
    scenarios = build_scenarios(config, data)
    eps = config.attack.eps / 255
    brewed, crafter_records = craft_scenarios(config, ctx, data, scenarios)
    views: dict[str, DataView | None] = {f"s{sc.index:03d}": brewed[sc.index][0].view for sc in scenarios}
    if config.baseline:
        views["clean"] = None
    t_train = ctx.cost.train_wall_s
    # a victim that fails to train is left out (named in the report); a scenario left without any fails the run
    records = train_victims(config, ctx, data, views, victims=config.victims, save_weights=True,
                            label="training victims on the poisoned sets", on_failure="skip")
    victim_s = ctx.cost.train_wall_s - t_train

    # poisoned victims are asked about their own scenario's targets, clean victims about every scenario's
    own = {f"s{sc.index:03d}": list(sc.target_ids) for sc in scenarios}
    all_targets = sorted({t for sc in scenarios for t in sc.target_ids})
    col = {t: j for j, t in enumerate(all_targets)}
    preds = {name: victim_predictions(config, ctx, data, recs, own.get(name, all_targets),
                                      keep_weights=config.save_models or name == "clean")
             for name, recs in records.items()}

    rows, per_sc, per_clean, table = [], [], [], []
    per_victim: dict[int, dict[str, list[float]]] = {}  # each scenario's victims: success and accuracy
    for sc in scenarios:
        name = f"s{sc.index:03d}"
        cols = [col[t] for t in sc.target_ids]
        hit = (preds[name] == sc.adv_class).float()  # [V, T]
        rate = float(hit.mean())
        per_sc.append(rate)
        base = float((preds["clean"][:, cols] == sc.adv_class).float().mean()) if config.baseline else None
        if base is not None:
            per_clean.append(base)
        accs = [r["metrics"]["test_accuracy"] for r in records[name]]
        per_victim[sc.index] = {"victim_success": hit.mean(1).tolist(), "victim_accuracies": accs}  # success over targets
        secs = brewed[sc.index][1]
        for v, r in enumerate(records[name]):
            rows.append({"trial_id": r["trial_id"], "seed": r["seed"], "scenario": sc.index,
                         "victim": r["tags"]["victim"], "success": float(hit[v].mean()),
                         "target_predictions": preds[name][v].tolist(),
                         "test_accuracy": r["metrics"]["test_accuracy"]})
        table.append([sc.index, sc.seed if sc.seed is not None else "explicit", data.train.classes[sc.target_class],
                      data.train.classes[sc.adv_class], ", ".join(map(str, sc.target_ids)), len(sc.poison_ids),
                      f"{100 * rate:.1f}%", "" if base is None else f"{100 * base:.1f}%",
                      MeanSE.of(np.array(accs)).to_dict(), round(secs, 2)])
    if config.baseline:
        for v, r in enumerate(records["clean"]):
            rows.append({"trial_id": r["trial_id"], "seed": r["seed"], "scenario": None, "victim": r["tags"]["victim"],
                         "success": None,
                         "target_predictions": preds["clean"][v].tolist(), "test_accuracy": r["metrics"]["test_accuracy"]})

    setting = victim_setting(config, data)
    poisoned_acc = np.array([r["metrics"]["test_accuracy"] for n, recs in records.items() if n != "clean" for r in recs])
    craft_s = [brewed[sc.index][1] for sc in scenarios]
    metrics: dict[str, Any] = {
        "poison_success": MeanSE.of(np.array(per_sc)).to_dict(),
        "victim_accuracy": MeanSE.of(poisoned_acc).to_dict(),
        "scenarios": [{**sc.to_dict(data.train.classes), "success": s, "clean_baseline_success":
                       (per_clean[i] if config.baseline else None), "crafting_s": brewed[sc.index][1],
                       "objective": brewed[sc.index][0].info.get("objective"),
                       "restart_objectives": brewed[sc.index][0].info.get("restarts", []),
                       **per_victim[sc.index]}
                      for i, (sc, s) in enumerate(zip(scenarios, per_sc))],
        "timing": {"crafting_s_total": float(sum(craft_s)), "crafting_s_per_scenario": MeanSE.of(np.array(craft_s)
                                                                                                    ).to_dict(),
                   "victims_s": round(victim_s, 3)},
        "attack": {"method": config.attack.method, "eps": config.attack.eps, "budget": config.attack.budget,
                   "poisons": len(scenarios[0].poison_ids), "restarts": config.attack.restarts,
                   "steps": config.attack.steps},
        "victim": {k: v for k, v in setting.items() if k != "phrase"},
        "crafting_models": [{k: r.get(k) for k in ("trial_id", "checkpoint", "source") if k in r} |
                            {"test_accuracy": r.get("metrics", {}).get("test_accuracy")} for r in crafter_records],
    }
    if config.baseline:
        metrics["clean_baseline_success"] = MeanSE.of(np.array(per_clean)).to_dict()
        metrics["clean_victim_accuracy"] = MeanSE.of(
            np.array([r["metrics"]["test_accuracy"] for r in records["clean"]])).to_dict()

    exported = []
    if config.export:
        digests: dict[str, str] = {}
        for sc in scenarios[:10]:
            name = f"s{sc.index:03d}"
            view = views[name]
            assert view is not None
            folder = export_view(view, ctx.artifacts / "poisoned" / name, base_id=data.id, overwrite=True)
            exported.append(folder.relative_to(ctx.out_dir).as_posix())
            digests[exported[-1]] = view_digest(folder)
        metrics["export_digests"] = digests  # keep these: import_view(..., expected_digest=...) checks them
    notes = failed_victims_note(ctx, metrics) + [
        f"{len(scenarios)} scenarios x {config.victims} victims; success = target classified as the adversarial "
        "class; mean ± SE over scenarios of each scenario's success averaged over its victims (and targets).",
        f"victims: {config.victim_model.name} with recipe {config.victim_recipe.name}"
        f"{' (DP-SGD)' if config.victim_recipe.dp is not None else ''}, {setting['phrase']}; crafting model(s): "
        + (f"the pretrained {found[2].name} of {found[0].name}" if (found := config.crafting_checkpoint) is not None
           else ", ".join(f"{a.name} x {n}" for a, n in Counter(config.crafting.specs(config.model)).items()))]
    if exported:
        notes.append("poisoned training sets exported (PNG + manifest + exact deltas): " + ", ".join(exported)
                     + "; their content digests are in metrics.export_digests (pass one to import_view as "
                     "expected_digest)")
    tables = [ReportTable("Poison success per scenario",
                          ["scenario", "seed", "target class", "adversarial class", "target id(s)", "poisons",
                           "success (poisoned victims)", "success (clean victims)", "victim accuracy", "crafting s"],
                          table)]
    figures = {"Poison success per scenario (bars: mean ± SE over victims; band: mean ± SE over scenarios)":
               success_figure([per_victim[sc.index]["victim_success"] for sc in scenarios],
                              clean=per_clean if config.baseline else None)}
    first = scenarios[0]
    if config.alignment:
        curves = _alignment(config, ctx, data, first, views[f"s{first.index:03d}"])
        metrics["alignment"] = {"scenario": first.index, **curves}
        figures["Gradient alignment during victim training (seed 002 Fig. 1.3b), scenario 0"] = alignment_figure(curves)
    v0 = views[f"s{first.index:03d}"]
    if v0 is not None and v0.indices.numel():
        figures["Target, clean poisons, poisoned images and their difference (scenario 0)"] = perturbation_grid(
            data.train.x[v0.indices[:GRID_POISONS]], v0.delta, eps, n=GRID_POISONS,
            lead=data.test.x[first.target_ids[0]], lead_title=f"target\n{data.train.classes[first.target_class]}")
    return ExperimentOutput(metrics=metrics, trials=rows, tables=tables, figures=figures, notes=notes)


def _alignment(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, sc: Scenario,
               view: DataView | None) -> dict[str, list[float]]:
    """Per-epoch cosine between the adversarial target gradient and training mini-batch gradients of
    one clean and one poisoned victim (victim 0's seed), trained by the shared loop."""
    spec, recipe = config.victim_model, config.victim_recipe
    bar = ctx.progress.task("alignment diagnostic (2 victims)", total=2)
    out = alignment_curves(lambda: model_template(spec, data), data.train, recipe, seed=config.victim_seed(0),
                           lr=recipe.resolved_lr(residual=model_entry(spec.name).residual), device=torch.device(ctx.device),
                           x_target=data.test.x[list(sc.target_ids)], adv_label=sc.adv_class, view=view,
                           augment=resolve_augment(recipe, data.name, data.input_shape),
                           on_victim=lambda: ctx.progress.advance(bar))
    ctx.progress.done(bar)
    return out
