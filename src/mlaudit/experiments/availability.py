"""Experiment kind ``availability-poison``: perturb (a fraction of) the training set within an l-inf
ball so that models trained on it generalise poorly (seed 002 chapter 2), and measure it the only
way that counts: victims retrained from scratch by the factory on the poisoned data, against victims
trained on the clean data with the same seeds (paired).

Methods (:data:`mlaudit.attacks.availability.METHODS`): adversarial poisoning, untargeted (eq. 2.3)
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
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..attacks.availability import METHODS, CraftBudget, crafter_predictions
from ..attacks.availability.adversarial import PermutationSpec, check_permutation
from ..config import format_validation_error
from ..data.augment import AugmentSpec
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError
from ..query import model_template
from ..report.figures import perturbation_grid
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.loop import init_models, resolve_augment
from .base import ExperimentOutput, register_experiment
from .context import RunContext
from .poisoning import (
    PoisoningConfig,
    accuracy_summary,
    check_crafting,
    crafting_models,
    finished_crafters,
    load_poison,
    save_poison,
    train_victims,
)

POISON_STREAM = 303
"""Seed stream of the poisoned-row choice and the crafting generator."""
SURROGATE_STREAM = 304
"""Seed stream of the fresh surrogate's initialisation (error-minimizing noise)."""
FIGURE_EXAMPLES = 8


class AttackConfig(BaseModel):
    """``method`` (a registered name), ``eps`` (l-inf radius in /255 units, in (0, 255]), ``steps``
    (PGD steps; per round for error-minimizing), ``lr`` (step size in eps units; default 2.5 / steps),
    ``restarts``, ``fraction`` of the training set poisoned (the rest stays clean), ``permutation``
    (class-targeted only: ``shift``, ``random`` or [g(0), ..., g(C-1)] without fixed points),
    ``augment`` (differentiable augmentation while crafting, the victims' training augmentation),
    ``batch_size`` (crafting mini-batch; None: all at once) and method-specific ``options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    eps: float = Field(8.0, gt=0.0, le=255.0)
    steps: int = Field(250, ge=1, le=1_000_000)
    lr: float | None = Field(None, gt=0.0, le=100.0)
    restarts: int = Field(1, ge=1, le=1000)
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    permutation: PermutationSpec | None = None
    augment: bool = True
    batch_size: int | None = Field(None, ge=1, le=1_000_000)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        METHODS.get(v)  # ConfigError listing the valid names
        return v

    @field_validator("permutation", mode="before")
    @classmethod
    def _permutation(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return check_permutation(v, field="g")  # the error is prefixed with attack.permutation
        return v

    @model_validator(mode="after")
    def _method_options(self) -> AttackConfig:
        if self.permutation is not None and self.method != "adversarial-class-targeted":
            raise ValueError(f"attack.permutation applies to method adversarial-class-targeted only, not {self.method!r}")
        if "permutation" in self.options:
            raise ValueError("give the class-targeted label map as attack.permutation, not attack.options.permutation")
        self.method_options()
        return self

    @property
    def resolved_lr(self) -> float:
        """Step size in eps units: ``lr`` or 2.5 / steps (Madry et al. 2018: the steps can travel 2.5 eps)."""
        return self.lr if self.lr is not None else 2.5 / self.steps

    def method_options(self) -> BaseModel:
        """The method's validated options (ConfigError naming ``attack.options.<field>`` otherwise)."""
        model = METHODS.get(self.method).options
        raw = dict(self.options)
        if self.permutation is not None:
            raw["permutation"] = self.permutation
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix="attack.options", model=model)) from None


class AvailabilityConfig(PoisoningConfig):
    """See the module docstring and docs/availability.md for every field."""

    kind: Literal["availability-poison"] = "availability-poison"
    attack: AttackConfig
    victims: int = Field(4, ge=1, le=10_000)
    relabel: bool = False
    export: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AvailabilityConfig:
        crafter = METHODS.get(self.attack.method).crafter
        if self.relabel and crafter != "pretrained":
            raise ValueError(f"relabel: true relabels poisons with the crafting model's predictions; method "
                             f"{self.attack.method!r} has no pretrained crafting model (use an adversarial-* method)")
        if crafter != "pretrained" and (self.crafting.checkpoint is not None or self.crafting.ensemble != 1
                                        or self.crafting.architectures is not None):
            raise ValueError(f"crafting.checkpoint / crafting.ensemble are used by adversarial-* methods only; method "
                             f"{self.attack.method!r} uses {'a fresh surrogate' if crafter == 'fresh' else 'no model'}")
        return self


def num_poisoned(config: AvailabilityConfig, n_train: int) -> int:
    return int(round(config.attack.fraction * n_train))


def check_availability(config: AvailabilityConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): at least one poisoned row, the permutation's length,
    and the crafting checkpoint (exists, hash, architecture)."""
    n = len(data.train)
    if num_poisoned(config, n) < 1:
        raise ConfigError(f"attack.fraction = {config.attack.fraction} of {n} training examples poisons none; "
                          f"raise it to >= {1 / n:.3g}")
    if isinstance(config.attack.permutation, tuple):
        check_permutation(config.attack.permutation, data.num_classes, field="attack.permutation")
    if data.num_classes < 2 and config.attack.method == "adversarial-class-targeted":
        raise ConfigError("the class-targeted objective needs at least 2 classes")
    if METHODS.get(config.attack.method).crafter == "pretrained":
        check_crafting(config, data)


def poison_indices(config: AvailabilityConfig, n_train: int) -> torch.Tensor:
    """int64 [P] ascending: the poisoned training rows (all, or a seeded random ``fraction``)."""
    p = num_poisoned(config, n_train)
    if p == n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(config.trial_seed(1, stream=POISON_STREAM))
    return torch.randperm(n_train, generator=g)[:p].sort().values


def crafting_augment(config: AvailabilityConfig, data: DataBundle) -> AugmentSpec | None:
    """The victims' training augmentation (applied differentiably while crafting), or None."""
    if not config.attack.augment:
        return None
    recipe = config.victim_recipe
    return resolve_augment(recipe, data.name, data.input_shape)


# the poison is saved and reloaded, and victim i has seed victim_seed(i) whatever victims is
@register_experiment("availability-poison", config=AvailabilityConfig, check=check_availability,
                     growable=("victims",))
def run_availability(config: AvailabilityConfig, ctx: RunContext) -> ExperimentOutput:
    """Availability poisoning (adversarial UT/CT, error-minimizing, random noise); victims retrained."""
    data = ctx.load_dataset(config.dataset)
    method = METHODS.get(config.attack.method)
    idx = poison_indices(config, len(data.train))
    x = data.train.x[idx].to(ctx.device)
    y = data.train.y[idx].to(ctx.device)
    a = config.attack
    budget = CraftBudget(eps=a.eps / 255, steps=a.steps, lr=a.resolved_lr, restarts=a.restarts,
                         augment=crafting_augment(config, data), batch_size=a.batch_size)
    models, crafter_records = [], []
    saved = load_poison(ctx, "poison")
    if saved is not None:  # resumed: the poison (and relabelling predictions) of the interrupted run
        tensors, meta = saved
        delta, pred = tensors["delta"].to(data.train.device), tensors.get("relabel")
        full_info, craft_wall = meta["info"], float(meta["craft_wall_s"])
        crafter_records = finished_crafters(ctx)
    else:
        if method.crafter == "pretrained":
            models, crafter_records = crafting_models(config, ctx, data)
        elif method.crafter == "fresh":
            spec = config.crafting_model
            models = [m.to(ctx.device) for m in init_models(lambda: model_template(spec, data),
                                                             [config.trial_seed(0, stream=SURROGATE_STREAM)])]
        opts = a.method_options()
        rounds = getattr(opts, "rounds", 1)
        task = ctx.progress.task(f"crafting {a.method} ({len(idx)} poisons)", total=a.steps * a.restarts * rounds)
        gen = torch.Generator().manual_seed(config.trial_seed(0, stream=POISON_STREAM))
        t0 = time.perf_counter()
        res = method.fn(x, y, models=models, budget=budget, num_classes=data.num_classes, generator=gen,
                        options=opts, on_step=lambda s, t: ctx.progress.advance(task))
        craft_wall = time.perf_counter() - t0
        ctx.progress.done(task)
        delta = res.delta.detach().to(data.train.device)
        pred = (crafter_predictions(models, x + res.delta, batch_size=a.batch_size or 1024).cpu()
                if config.relabel else None)
        full_info = dict(res.info)
        save_poison(ctx, "poison", {"delta": delta, **({"relabel": pred} if pred is not None else {})},
                    {"info": full_info, "craft_wall_s": craft_wall})
    view = DataView.from_delta(data.train, idx.to(data.train.device), delta, eps=budget.eps,
                               meta={"method": a.method, "eps_255": a.eps})
    views: dict[str, DataView | None] = {"clean": None, "poisoned": view}
    if config.relabel:
        assert pred is not None
        views["relabelled"] = view.with_labels(idx.to(data.train.device), pred.to(data.train.device))
    if len(idx) < len(data.train):
        keep = torch.ones(len(data.train), dtype=torch.bool, device=data.train.device)
        keep[idx.to(data.train.device)] = False
        views["clean-subset"] = DataView.identity(data.train).with_keep(keep)
    if config.export:
        from ..data.export import export_view

        export_view(view, ctx.artifacts / "poisoned", base_id=data.id, overwrite=True)
    recs = train_victims(config, ctx, data, views, victims=config.victims)

    metrics = dict(accuracy_summary(recs["clean"], recs["poisoned"]))
    for name, key in (("relabelled", "relabelled"), ("clean-subset", "clean_subset")):
        if name in recs:
            s = accuracy_summary(recs["clean"], recs[name])
            metrics[f"{key}_accuracy"], metrics[f"{key}_drop"] = s["poisoned_accuracy"], s["drop"]
    info = {k: v for k, v in full_info.items() if k != "history"}
    metrics["attack"] = {"method": a.method, "eps_255": a.eps, "eps": budget.eps, "steps": a.steps, "lr": budget.lr,
                         "restarts": a.restarts, "fraction": a.fraction, "poisoned": len(idx),
                         "augment": budget.augment.model_dump() if budget.augment is not None else None,
                         "craft_wall_s": round(craft_wall, 3), "max_abs_delta": float(delta.abs().max()),
                         "mean_abs_delta": float(delta.abs().mean()), **info}
    if crafter_records:
        acc = [r["metrics"]["test_accuracy"] for r in crafter_records if "metrics" in r]
        metrics["crafting_models"] = {"count": len(crafter_records), **({"test_accuracy": MeanSE.of(acc).to_dict()} if acc else {})}
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    (ctx.artifacts / "attack_info.json").write_text(json.dumps({"indices_count": len(idx), **full_info}, indent=2))
    trials = [{"trial_id": r["trial_id"], "view": r["tags"]["view"], "victim": r["tags"]["victim"], "seed": r["seed"],
               **r["metrics"]} for rs in recs.values() for r in rs]
    notes = [f"{len(idx)} of {len(data.train)} training images of {data.name} perturbed with {a.method} at eps "
             f"{a.eps:g}/255; {config.victims} victims per view, trained from scratch (paired seeds). Crafting took "
             f"{craft_wall:.1f} s on {ctx.device}."]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=[results_table(config, metrics)],
                            figures={"Clean, poisoned and perturbation (scaled to ±eps)": perturbation_grid(
                                x, delta.to(x.device), budget.eps, n=FIGURE_EXAMPLES)},
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
