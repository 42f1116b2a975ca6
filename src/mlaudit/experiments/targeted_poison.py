"""Experiment kind ``targeted-poison``: targeted clean-label poisoning (Witches' Brew and its
baselines) evaluated by the protocol of seed 002, section 1.7.

Threat model (section 1.3.1): the attacker perturbs P = budget * N training images of the
adversarial class within an l-inf ball of radius eps/255 (labels unchanged), knowing a pretrained
crafting model (or an ensemble) but not the victim's initialisation, data order or augmentation;
the victim trains from scratch on the poisoned set. Success means the target test image is
classified as the adversarial class (not merely misclassified).

Protocol, per scenario (drawn from the paper's seed series, :mod:`mlaudit.attacks.poisoning.scenario`):
craft once (restarts keep the best by the objective), then retrain ``victims`` fresh models on the
poisoned set through the factory (all scenarios and the clean baseline in one batched job, victim
``i`` with the same seed everywhere). Reported: average poison success +- standard error over
scenarios (each scenario's success averaged over its victims and targets), the same rate for clean
victims (the baseline), victim clean test accuracy, per-victim outcomes, crafting and victim time.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ..attacks.poisoning.alignment import alignment_curve
from ..attacks.poisoning.brew import METHODS, BrewInputs, BrewOptions, BrewResult, brew
from ..attacks.poisoning.features import penultimate_features
from ..attacks.poisoning.scenario import Scenario, explicit_scenario, sample_scenario, scenario_seeds
from ..data.base import DataBundle
from ..data.export import export_view
from ..data.view import DataView
from ..errors import ConfigError, DataError
from ..models.registry import model_entry
from ..privacy.dpsgd import check_dp_model
from ..query import model_template
from ..report.figures import alignment_figure, perturbation_grid
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.loop import resolve_augment
from .base import ExperimentOutput, register_experiment
from .context import RunContext
from .poisoning import (
    PoisoningConfig,
    check_crafting,
    crafting_models,
    finished_crafters,
    has_poison,
    load_poison,
    save_poison,
    train_victims,
    victim_logits,
)

GRID_POISONS = 6
"""Poisons of scenario 0 shown in the report's image grid, after the target."""


class TargetedAttack(BaseModel):
    """The attack: ``method`` (gradient-matching, poison-frogs, bullseye, watermark, label-flip),
    ``eps`` in /255 pixel units, ``budget`` = fraction of the training set poisoned, ``targets`` per
    scenario, crafting ``steps`` / ``restarts`` / ``lr`` (in units of eps) / ``optimizer`` /
    ``schedule``, ``parallel_restarts`` (restarts optimised together in one batched double backward;
    gradient matching only), ``augment`` (differentiable augmentation with the victim recipe's augmentation),
    ``batch_size`` (poison mini-batch; None = all at once), ``precision`` (bf16 autocast on CUDA),
    ``dp_clip`` / ``dp_noise`` (DP-aware gradient matching), ``opacity`` (watermark)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "gradient-matching"
    eps: float = Field(16.0, gt=0.0, le=255.0)
    budget: float = Field(0.01, gt=0.0, le=1.0)
    targets: int = Field(1, ge=1, le=10_000)
    steps: int = Field(250, ge=0, le=100_000)
    restarts: int = Field(8, ge=1, le=1000)
    parallel_restarts: int = Field(1, ge=1, le=64)
    lr: float = Field(0.1, gt=0.0, le=100.0)
    optimizer: Literal["signed-adam", "pgd", "adam"] = "signed-adam"
    schedule: Literal["step", "cosine", "constant"] = "step"
    augment: bool = True
    batch_size: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    dp_clip: float | None = Field(None, gt=0.0)
    dp_noise: float = Field(0.0, ge=0.0)
    opacity: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        METHODS.get(v)  # ConfigError listing the valid names
        return v

    @model_validator(mode="after")
    def _dp(self) -> TargetedAttack:
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ValueError(f"attack.dp_noise = {self.dp_noise} needs attack.dp_clip (noise std = dp_noise * dp_clip)")
        if (self.dp_clip is not None) and self.method != "gradient-matching":
            raise ValueError(f"attack.dp_clip applies to gradient-matching only, not {self.method!r}")
        return self


class ExplicitScenario(BaseModel):
    """A user-given scenario: ``target_ids`` (test-set ids, one class), ``poison_class`` (index or
    class name), and optionally ``poison_ids`` (training ids of that class; default: drawn with
    the config's seed at the attack's budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_ids: tuple[int, ...] = Field(..., min_length=1)
    poison_class: int | str
    poison_ids: tuple[int, ...] | None = None


class TargetedPoisonConfig(PoisoningConfig):
    """See the module docstring and docs/targeted_poisoning.md."""

    kind: Literal["targeted-poison"] = "targeted-poison"
    attack: TargetedAttack = TargetedAttack()
    scenarios: int | tuple[ExplicitScenario, ...] = 1
    first_scenario: int = Field(0, ge=0, le=10_000)
    victims: int = Field(8, ge=1, le=10_000)
    baseline: bool = True
    export: bool = True
    save_models: bool = False
    alignment: bool = False

    @field_validator("scenarios")
    @classmethod
    def _scenarios(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 10_000:
            raise ValueError(f"scenarios must be a count in [1, 10000] or a list of explicit scenarios, got {v}")
        if isinstance(v, tuple) and not v:
            raise ValueError("scenarios is an empty list; give a count or at least one scenario")
        return v

    @model_validator(mode="after")
    def _first_scenario(self) -> TargetedPoisonConfig:
        if self.first_scenario and not isinstance(self.scenarios, int):
            raise ValueError(f"first_scenario = {self.first_scenario} picks a position in the seed series and needs "
                             "scenarios to be a count, not a list of explicit scenarios")
        return self


def build_scenarios(config: TargetedPoisonConfig, data: DataBundle) -> list[Scenario]:
    """The config's scenarios on ``data`` (drawn from the seed series, or explicit and checked)."""
    ytr, yte, c = data.train.y, data.test.y, data.num_classes
    if isinstance(config.scenarios, int):  # positions first .. first + n - 1 of the paper's seed series
        first = config.first_scenario
        seeds = scenario_seeds(config.seed, first + config.scenarios)[first:]
        return [sample_scenario(first + j, s, train_y=ytr, test_y=yte, num_classes=c, budget=config.attack.budget,
                                targets=config.attack.targets)
                for j, s in enumerate(seeds)]
    out = []
    classes = list(data.train.classes)
    for i, sc in enumerate(config.scenarios):
        pc = sc.poison_class
        if isinstance(pc, str):
            if pc not in classes:
                raise ConfigError(f"scenarios[{i}].poison_class = {pc!r} is not a class of {data.name}; valid: "
                                  f"{', '.join(classes)}")
            pc = classes.index(pc)
        out.append(explicit_scenario(i, target_ids=sc.target_ids, poison_class=pc, test_y=yte, train_y=ytr,
                                     budget=config.attack.budget, num_classes=c, poison_ids=sc.poison_ids,
                                     seed=config.seed + i))
    return out


def check_targeted(config: TargetedPoisonConfig, data: DataBundle) -> None:
    """Runner hook: scenarios fit the data, the crafting checkpoint fits the model, feature methods
    have a linear head, a DP victim recipe has no BatchNorm — before anything is written."""
    build_scenarios(config, data)
    check_crafting(config, data)
    if config.attack.method in ("poison-frogs", "bullseye", "label-flip"):
        for spec in dict.fromkeys(config.crafting.specs(config.model)):
            penultimate_features(model_template(spec, data))
    if config.victim_recipe.dp is not None:
        check_dp_model([model_template(config.victim_model, data)])


def _options(config: TargetedPoisonConfig, data: DataBundle, scenario: Scenario) -> BrewOptions:
    a = config.attack
    aug = resolve_augment(config.victim_recipe, data.name, data.input_shape) if a.augment else None
    return BrewOptions(eps=a.eps / 255, steps=a.steps, restarts=a.restarts, lr=a.lr, optimizer=a.optimizer,
                       schedule=a.schedule, augment=aug, batch_size=a.batch_size, bf16=a.precision == "bf16",
                       dp_clip=a.dp_clip, dp_noise=a.dp_noise, opacity=a.opacity, parallel_restarts=a.parallel_restarts,
                       seed=config.trial_seed(scenario.index, stream=303))


def _poison_name(sc: Scenario) -> str:
    return f"scenario-{sc.index:03d}"


def _poison(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, models: list, sc: Scenario
            ) -> tuple[BrewResult, float]:
    """Craft (or, on resume, reload) the scenario's poison; returns it and the crafting seconds."""
    loaded = load_poison(ctx, _poison_name(sc))
    if loaded is not None:
        saved, meta = loaded
        relabel = (saved["relabel_ids"], saved["relabel_to"]) if "relabel_ids" in saved else None
        return BrewResult(saved.get("delta"), relabel, meta["objective"], meta["restarts"], meta["history"]), \
            meta["crafting_s"]
    dev = torch.device(ctx.device)
    ids = torch.tensor(sc.poison_ids)
    inputs = BrewInputs(models=models, x_target=data.test.x[list(sc.target_ids)].to(dev), adv_class=sc.adv_class,
                        x_poison=data.train.x[ids].to(dev), y_poison=data.train.y[ids].to(dev),
                        train_x=data.train.x, train_y=data.train.y, target_class=sc.target_class)
    opts = _options(config, data, sc)
    total = opts.steps * opts.restarts
    task = ctx.progress.task(f"crafting scenario {sc.index} ({config.attack.method})", total=max(total, 1))
    t0 = time.perf_counter()
    try:
        res = brew(config.attack.method, inputs, opts, on_step=lambda s, v: ctx.progress.advance(task))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    finally:
        ctx.progress.done(task)
    secs = time.perf_counter() - t0
    blob: dict[str, Tensor] = {}
    if res.delta is not None:
        blob["delta"] = res.delta
    if res.relabel is not None:
        blob["relabel_ids"], blob["relabel_to"] = res.relabel
    save_poison(ctx, _poison_name(sc), blob, {"objective": res.objective, "restarts": res.restarts,
                                              "history": res.history, "crafting_s": secs})
    res.delta = res.delta.detach().cpu() if res.delta is not None else None
    return res, secs


def _view(data: DataBundle, sc: Scenario, res: BrewResult, eps: float) -> DataView:
    view = DataView.identity(data.train)
    if res.delta is not None:
        view = view.with_delta(list(sc.poison_ids), res.delta, eps=eps)
    if res.relabel is not None:
        view = view.with_labels(res.relabel[0], res.relabel[1])
    return view


# scenario k's seed, poisons and victims "s<k>-v<i>" (seed victim_seed(i)) do not depend on the counts,
# so a study can grow: 4 scenarios x 2 victims resumed with scenarios 8 trains only the new ones
@register_experiment("targeted-poison", config=TargetedPoisonConfig, check=check_targeted,
                     growable=("scenarios", "victims"))
def run_targeted_poison(config: TargetedPoisonConfig, ctx: RunContext) -> ExperimentOutput:
    """Targeted clean-label poisoning (Witches' Brew and baselines): poison success +- SE over scenarios."""
    data = ctx.load_dataset(config.dataset)
    scenarios = build_scenarios(config, data)
    eps = config.attack.eps / 255
    views: dict[str, DataView | None] = {}
    brewed: dict[int, tuple[BrewResult, float]] = {}
    models: list | None = None  # the crafting models, built only if some scenario still needs crafting
    crafter_records: list[dict[str, Any]] = []
    for sc in scenarios:
        if models is None and not has_poison(ctx, _poison_name(sc)):
            models, crafter_records = crafting_models(config, ctx, data)
        res, secs = _poison(config, ctx, data, models or [], sc)
        brewed[sc.index] = (res, secs)
        views[f"s{sc.index:03d}"] = _view(data, sc, res, eps)
    del models
    if not crafter_records:  # every poison came from an earlier run: report its crafting models
        crafter_records = finished_crafters(ctx)
    if config.baseline:
        views["clean"] = None
    t_train = ctx.cost.train_wall_s
    records = train_victims(config, ctx, data, views, victims=config.victims,
                            save_weights=True, label="training victims on the poisoned sets")
    victim_s = ctx.cost.train_wall_s - t_train

    # poisoned victims are asked about their own scenario's targets, clean victims about every scenario's
    own = {f"s{sc.index:03d}": list(sc.target_ids) for sc in scenarios}
    all_targets = sorted({t for sc in scenarios for t in sc.target_ids})
    col = {t: j for j, t in enumerate(all_targets)}
    preds = {name: _target_predictions(config, ctx, data, recs, own.get(name, all_targets), keep=name == "clean")
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
        res, secs = brewed[sc.index]
        for v, r in enumerate(records[name]):
            rows.append({"trial_id": r["trial_id"], "seed": r["seed"], "scenario": sc.index, "victim": v,
                         "success": float(hit[v].mean()), "target_predictions": preds[name][v].tolist(),
                         "test_accuracy": r["metrics"]["test_accuracy"]})
        table.append([sc.index, sc.seed if sc.seed is not None else "explicit", data.train.classes[sc.target_class],
                      data.train.classes[sc.adv_class], ", ".join(map(str, sc.target_ids)), len(sc.poison_ids),
                      f"{100 * rate:.1f}%", "" if base is None else f"{100 * base:.1f}%",
                      MeanSE.of(np.array(accs)).to_dict(), round(secs, 2)])
    if config.baseline:
        for v, r in enumerate(records["clean"]):
            rows.append({"trial_id": r["trial_id"], "seed": r["seed"], "scenario": None, "victim": v, "success": None,
                         "target_predictions": preds["clean"][v].tolist(), "test_accuracy": r["metrics"]["test_accuracy"]})

    poisoned_acc = np.array([r["metrics"]["test_accuracy"] for n, recs in records.items() if n != "clean" for r in recs])
    craft_s = [brewed[sc.index][1] for sc in scenarios]
    metrics: dict[str, Any] = {
        "poison_success": MeanSE.of(np.array(per_sc)).to_dict(),
        "victim_accuracy": MeanSE.of(poisoned_acc).to_dict(),
        "scenarios": [{**sc.to_dict(data.train.classes), "success": s, "clean_baseline_success":
                       (per_clean[i] if config.baseline else None), "crafting_s": brewed[sc.index][1],
                       "objective": brewed[sc.index][0].objective, "restart_objectives": brewed[sc.index][0].restarts,
                       **per_victim[sc.index]}
                      for i, (sc, s) in enumerate(zip(scenarios, per_sc))],
        "timing": {"crafting_s_total": float(sum(craft_s)), "crafting_s_per_scenario": MeanSE.of(np.array(craft_s)
                                                                                                    ).to_dict(),
                   "victims_s": round(victim_s, 3)},
        "attack": {"method": config.attack.method, "eps": config.attack.eps, "budget": config.attack.budget,
                   "poisons": len(scenarios[0].poison_ids), "restarts": config.attack.restarts,
                   "steps": config.attack.steps},
        "crafting_models": [{k: r.get(k) for k in ("trial_id", "checkpoint")} |
                            {"test_accuracy": r.get("metrics", {}).get("test_accuracy")} for r in crafter_records],
    }
    if config.baseline:
        metrics["clean_baseline_success"] = MeanSE.of(np.array(per_clean)).to_dict()
        metrics["clean_victim_accuracy"] = MeanSE.of(
            np.array([r["metrics"]["test_accuracy"] for r in records["clean"]])).to_dict()

    exported = []
    if config.export:
        for sc in scenarios[:10]:
            name = f"s{sc.index:03d}"
            view = views[name]
            assert view is not None
            folder = export_view(view, ctx.artifacts / "poisoned" / name, base_id=data.id, overwrite=True)
            exported.append(folder.relative_to(ctx.out_dir).as_posix())
    notes = [f"{len(scenarios)} scenarios x {config.victims} victims; success = target classified as the adversarial "
             "class; mean ± SE over scenarios of each scenario's success averaged over its victims (and targets).",
             f"victims: {config.victim_model.name} with recipe {config.victim_recipe.name}"
             f"{' (DP-SGD)' if config.victim_recipe.dp is not None else ''}; crafting model(s): "
             + ", ".join(f"{a.name} x {n}" for a, n in Counter(config.crafting.specs(config.model)).items())]
    if exported:
        notes.append("poisoned training sets exported (PNG + manifest + exact deltas): " + ", ".join(exported))
    tables = [ReportTable("Poison success per scenario",
                          ["scenario", "seed", "target class", "adversarial class", "target id(s)", "poisons",
                           "success (poisoned victims)", "success (clean victims)", "victim accuracy", "crafting s"],
                          table)]
    figures = {}
    first = scenarios[0]
    if config.alignment:
        curves = _alignment(config, ctx, data, first, views[f"s{first.index:03d}"])
        metrics["alignment"] = {"scenario": first.index, **curves}
        figures["Gradient alignment during victim training (seed 002 Fig. 1.3b), scenario 0"] = alignment_figure(curves)
    res0 = brewed[first.index][0]
    if res0.delta is not None:
        figures["Target, clean poisons, poisoned images and their difference (scenario 0)"] = perturbation_grid(
            data.train.x[list(first.poison_ids[:GRID_POISONS])], res0.delta, eps, n=GRID_POISONS,
            lead=data.test.x[first.target_ids[0]], lead_title=f"target\n{data.train.classes[first.target_class]}")
    return ExperimentOutput(metrics=metrics, trials=rows, tables=tables, figures=figures, notes=notes)


def _target_predictions(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, recs: list[dict[str, Any]],
                        targets: list[int], *, keep: bool = False) -> Tensor:
    """Predicted classes [V, T] of the victims ``recs`` on the test images ``targets``.

    Predictions kept in a record's ``outputs`` (a resumed run) are reused; the missing ones come from
    the checkpoints. The checkpoints are then released (the predictions stay in the store, so a resume
    never retrains) unless ``save_models`` or ``keep``: the clean victims keep theirs, because a grown
    study (more scenarios) asks them about new targets."""
    have = [_kept_predictions(r) for r in recs]
    todo = [i for i, h in enumerate(have) if any(t not in h for t in targets)]
    if todo:
        need = sorted({t for i in todo for t in targets if t not in have[i]})
        gone = [recs[i]["trial_id"] for i in todo if "checkpoint" not in recs[i]]
        if gone:
            raise DataError(f"victims {', '.join(gone)} have neither weights nor predictions for target(s) "
                            f"{need}; their weights were released by an earlier run (before clean victims kept "
                            "theirs), so this study cannot grow in place: start a new --out")
        logits = victim_logits(config, ctx, data, [recs[i] for i in todo], data.test.x[need])
        for j, i in enumerate(todo):
            have[i].update(zip(need, logits[j].argmax(-1).tolist(), strict=True))
        if not (config.save_models or keep):
            ctx.release_weights([recs[i] for i in todo], outputs={
                recs[i]["trial_id"]: {"predictions": {str(t): c for t, c in sorted(have[i].items())}} for i in todo})
    return torch.tensor([[h[t] for t in targets] for h in have], dtype=torch.long)


def _kept_predictions(rec: dict[str, Any]) -> dict[int, int]:
    """``{target id: predicted class}`` kept in a victim record's outputs (empty when none)."""
    out = rec.get("outputs") or {}
    preds = out.get("predictions")
    if isinstance(preds, dict):
        return {int(t): int(c) for t, c in preds.items()}
    if isinstance(preds, list) and isinstance(out.get("targets"), str):  # records written before 2026-11-23
        return {int(t): int(c) for t, c in zip(out["targets"].split(","), preds, strict=True)}
    return {}


def _alignment(config: TargetedPoisonConfig, ctx: RunContext, data: DataBundle, sc: Scenario,
               view: DataView | None) -> dict[str, list[float]]:
    """Per-epoch cosine between the adversarial target gradient and training mini-batch gradients of
    one clean and one poisoned victim (victim 0's seed), trained by the shared loop."""
    spec = config.victim_model
    recipe = config.victim_recipe
    dev = torch.device(ctx.device)
    lr = recipe.resolved_lr(residual=model_entry(spec.name).residual)
    aug = resolve_augment(recipe, data.name, data.input_shape)
    x_t = data.test.x[list(sc.target_ids)]
    seed = config.victim_seed(0)
    out = {}
    task = ctx.progress.task("alignment diagnostic (2 victims)", total=2)
    for name, v in (("clean", None), ("poisoned", view)):
        out[name] = alignment_curve(lambda: model_template(spec, data), data.train, recipe, seed=seed, lr=lr,
                                    device=dev, x_target=x_t, adv_label=sc.adv_class, view=v, augment=aug)
        ctx.progress.advance(task)
    ctx.progress.done(task)
    return out
