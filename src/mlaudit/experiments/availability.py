"""Experiment kind ``availability-poison``: perturb (a fraction of) the training set within an l-inf
ball so that models trained on it generalise poorly (seed 002 chapter 2), and measure it the only
way that counts: victims retrained from scratch by the factory on the poisoned data, against victims
trained on the clean data with the same seeds (paired).

Methods (the ``availability`` family of :data:`mlaudit.attacks.poisoning.POISONERS`): adversarial poisoning, untargeted (eq. 2.3)
and class-targeted (eq. 2.4), crafted with PGD on a fixed pretrained crafting model (Fowl et al.
2021); error-minimizing noise (Huang et al. 2021); random noise of the same eps (the control). With
``relabel: true`` a third set of victims trains on the adversarial poisons relabelled with the
crafting model's predictions (section 2.4.6: accuracy recovers, so the poisons carry the features
of the "wrong" class). With ``fraction < 1`` a fourth set trains on the clean rows only (the
comparison of Tables 2.4 and 2.5: do the poisons hurt more than throwing them away?).

Threat model: the poisoner perturbs the chosen rows (labels kept), knows the data but not the
victims' initialisation, data order or augmentation draws; victims use ``victim.model`` /
``victim.recipe`` (default: the config's), which may differ from the crafting model (transfer).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..attacks.poisoning import Family, Needs
from ..attacks.poisoning.availability import crafter_predictions
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError
from ..report.figures import accuracy_bars, perturbation_grid
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.loop import resolve_augment
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .poison_task import (
    PoisonAttack,
    attacker_models,
    check_attack,
    load_poison,
    poison_task,
    run_poisoner,
    save_poison,
)
from .poisoning import (
    PoisoningConfig,
    accuracy_summary,
    failed_victims_note,
    finished_crafters,
    train_victims,
)

FIGURE_EXAMPLES = 8


class AvailabilityAttack(PoisonAttack):
    """``method`` (a registered availability method), ``eps`` (l-inf radius in /255 units, in (0, 255]),
    ``fraction`` of the training set poisoned (the rest stays clean); the crafting settings (default:
    250 PGD steps of 2.5 eps / steps, constant step size, one restart, the victims' augmentation
    applied differentiably; ``steps`` per round for error-minimizing; ``batch_size``: crafting
    mini-batch, None = all at once) and the method's ``options`` (``permutation`` of the
    class-targeted method, also as ``attack.permutation``: ``shift``, ``random`` or [g(0), ...,
    g(C-1)] without fixed points)."""

    family: ClassVar[Family] = "availability"
    method: str
    eps: float = Field(8.0, gt=0.0, le=255.0)
    fraction: float = Field(1.0, gt=0.0, le=1.0)


class AvailabilityConfig(PoisoningConfig):
    """See the module docstring and docs/availability.md for every field."""

    kind: Literal["availability-poison"] = "availability-poison"
    attack: AvailabilityAttack
    victims: int = Field(4, ge=1, le=10_000)
    relabel: bool = False
    export: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AvailabilityConfig:
        needs = self.attack.entry.needs
        if self.relabel and Needs.CRAFTING_MODELS not in needs:
            raise ValueError(f"relabel: true relabels poisons with the crafting model's predictions; method "
                             f"{self.attack.method!r} has no pretrained crafting model (use an adversarial-* method)")
        if Needs.CRAFTING_MODELS not in needs and (self.crafting.checkpoint is not None or self.crafting.ensemble != 1
                                                   or self.crafting.architectures is not None):
            raise ValueError(f"crafting.checkpoint / crafting.ensemble are used by methods with pretrained crafting "
                             f"models only; method {self.attack.method!r} uses "
                             f"{'a fresh surrogate' if Needs.FRESH_MODEL in needs else 'no model'}")
        return self


def num_poisoned(config: AvailabilityConfig, n_train: int) -> int:
    return int(round(config.attack.fraction * n_train))


def check_availability(config: AvailabilityConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): at least one poisoned row, the method's data checks
    (e.g. the permutation's length) and the crafting checkpoint (exists, hash, architecture)."""
    n = len(data.train)
    if num_poisoned(config, n) < 1:
        raise ConfigError(f"attack.fraction = {config.attack.fraction} of {n} training examples poisons none; "
                          f"raise it to >= {1 / n:.3g}")
    check_attack(config, data)


def poison_indices(config: AvailabilityConfig, n_train: int) -> torch.Tensor:
    """int64 [P] ascending: the poisoned training rows (all, or a seeded random ``fraction``)."""
    p = num_poisoned(config, n_train)
    if p == n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(config.trial_seed(1, stream=Stream.ATTACK))
    return torch.randperm(n_train, generator=g)[:p].sort().values


# the poison is saved and reloaded, and victim i has seed victim_seed(i) whatever victims is
@register_experiment("availability-poison", config=AvailabilityConfig, check=check_availability,
                     growable=("victims",))
def run_availability(config: AvailabilityConfig, ctx: RunContext) -> ExperimentOutput:
    """Availability poisoning (adversarial UT/CT, error-minimizing, random noise); victims retrained."""
    data = ctx.load_dataset(config.dataset)
    a = config.attack
    idx = poison_indices(config, len(data.train))
    x = data.train.x[idx].to(ctx.device)
    eps = a.eps / 255
    loaded = load_poison(ctx, "poison", data.train, ids=idx, eps=eps)
    if loaded is not None:  # resumed: the poison (and relabelling predictions) of the interrupted run
        poison, craft_wall, extra = loaded
        pred = extra.get("relabel")
        crafter_records = finished_crafters(ctx)
    else:
        models, crafter_records = attacker_models(config, ctx, data, a.entry)
        task = poison_task(config, ctx, data, models, seed=config.trial_seed(0, stream=Stream.ATTACK), eps=eps,
                           poison_ids=idx)
        poison, craft_wall = run_poisoner(a.entry, task, ctx, f"crafting {a.method} ({len(idx)} poisons)")
        assert poison.view is not None  # availability poisoners perturb rows
        poison.view = poison.view.with_meta(method=a.method, eps_255=a.eps)
        pred = (crafter_predictions(models, x + poison.view.delta.to(x.device), batch_size=a.batch_size or 1024).cpu()
                if config.relabel else None)
        save_poison(ctx, "poison", poison, seconds=craft_wall, extra={"relabel": pred} if pred is not None else None)
    view, full_info = poison.view, poison.info
    assert view is not None
    delta = view.delta
    views: dict[str, DataView | None] = {"clean": None, "poisoned": view}
    if config.relabel:
        assert pred is not None
        views["relabelled"] = view.with_labels(idx.to(data.train.device), pred.to(data.train.device))
    if len(idx) < len(data.train):
        keep = torch.ones(len(data.train), dtype=torch.bool, device=data.train.device)
        keep[idx.to(data.train.device)] = False
        views["clean-subset"] = DataView.identity(data.train).with_keep(keep)
    if config.export:
        from ..data.export import export_view, view_digest

        folder = export_view(view, ctx.artifacts / "poisoned", base_id=data.id, overwrite=True)
        digests = {folder.relative_to(ctx.out_dir).as_posix(): view_digest(folder)}
    recs = train_victims(config, ctx, data, views, victims=config.victims, on_failure="skip")

    metrics = dict(accuracy_summary(recs["clean"], recs["poisoned"]))
    if config.export:
        metrics["export_digests"] = digests  # keep these: import_view(..., expected_digest=...) checks them
    for name, key in (("relabelled", "relabelled"), ("clean-subset", "clean_subset")):
        if name in recs:
            s = accuracy_summary(recs["clean"], recs[name])
            metrics[f"{key}_accuracy"], metrics[f"{key}_drop"] = s["poisoned_accuracy"], s["drop"]
    info = {k: v for k, v in full_info.items() if k != "history"}
    aug = resolve_augment(config.victim_recipe, data.name, data.input_shape) if a.augment else None
    metrics["attack"] = {"method": a.method, "eps_255": a.eps, "eps": eps, "steps": a.steps, "lr": a.lr,
                         "restarts": a.restarts, "fraction": a.fraction, "poisoned": len(idx),
                         "augment": aug.model_dump() if aug is not None else None,
                         "craft_wall_s": round(craft_wall, 3), "max_abs_delta": float(delta.abs().max()),
                         "mean_abs_delta": float(delta.abs().mean()), **info}
    if crafter_records:
        acc = [r["metrics"]["test_accuracy"] for r in crafter_records if "metrics" in r]
        metrics["crafting_models"] = {"count": len(crafter_records), **({"test_accuracy": MeanSE.of(acc).to_dict()} if acc else {})}
    text = json.dumps({"indices_count": len(idx), **full_info}, indent=2)
    ctx.write_artifact("attack_info.json", lambda f: f.write(text.encode("utf-8")))
    trials = [{"trial_id": r["trial_id"], "view": r["tags"]["view"], "victim": r["tags"]["victim"], "seed": r["seed"],
               **r["metrics"]} for rs in recs.values() for r in rs]
    notes = [f"{len(idx)} of {len(data.train)} training images of {data.name} perturbed with {a.method} at eps "
             f"{a.eps:g}/255; {config.victims} victims per view, trained from scratch (paired seeds). Crafting took "
             f"{craft_wall:.1f} s on {ctx.device}."]
    notes = failed_victims_note(ctx, metrics) + notes
    return ExperimentOutput(metrics=metrics, trials=trials, tables=[results_table(config, metrics)],
                            figures={"Test accuracy of victims trained on each version of the training set (mean ± SE)":
                                     accuracy_bars({"clean": metrics["clean_accuracy"],
                                                    "poisoned": metrics["poisoned_accuracy"],
                                                    **{k.replace("_", " "): metrics[f"{k}_accuracy"]
                                                       for k in ("relabelled", "clean_subset")
                                                       if f"{k}_accuracy" in metrics}}),
                                     "Clean, poisoned and perturbation (scaled to ±eps)": perturbation_grid(
                                         x, delta.to(x.device), eps, n=FIGURE_EXAMPLES)},
                            notes=notes)


def _pct(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "mean": 100 * m["mean"], "se": 100 * m["se"]}


def results_table(config: AvailabilityConfig, metrics: dict[str, Any]) -> ReportTable:
    """Training data | eps | poisoned | victim test accuracy (%) | drop vs clean (pp), in the form of seed
    002 Table 2.2 (validation accuracy of victims trained on each version of the training set)."""
    a = config.attack
    rows = [["clean", 0, "0%", _pct(metrics["clean_accuracy"]), ""],
            [a.method, a.eps, f"{100 * a.fraction:g}%", _pct(metrics["poisoned_accuracy"]), _pct(metrics["drop"])]]
    if "relabelled_accuracy" in metrics:
        rows.append([f"{a.method}, relabelled by the crafting model", a.eps, f"{100 * a.fraction:g}%",
                     _pct(metrics["relabelled_accuracy"]), _pct(metrics["relabelled_drop"])])
    if "clean_subset_accuracy" in metrics:
        rows.append([f"clean rows only ({100 * (1 - a.fraction):g}% of the data)", 0, "0%",
                     _pct(metrics["clean_subset_accuracy"]), _pct(metrics["clean_subset_drop"])])
    return ReportTable("Victim clean test accuracy (seed 002, Table 2.2 form)",
                       ["training data", "eps (/255)", "poisoned", "victim test accuracy (%)", "drop vs clean (pp)"],
                       rows, note=f"mean ± SE over {config.victims} victims trained from scratch; drop paired by seed")
