"""Pieces every poisoning kind shares (``targeted-poison``, ``availability-poison``,
``indiscriminate-poison``): the crafting model(s), the victims retrained from scratch on the poisoned
training set, their predictions on chosen test images (kept in the store, weights released), and the
clean-vs-poisoned accuracy summary. Running the attack itself is :mod:`.poison_task`.

Evaluation protocol (seed 002 section 1.7; seed 001 section 4): an attack is judged only by victims
trained *from scratch* by the factory on the poisoned data with the victim recipe (augmentation on),
never by the crafting model. Victim ``i`` of every view shares one seed (same initialisation, data
order and augmentation draws), so clean-vs-poisoned differences are paired.

Config pieces (mapping fields of a kind's config):

* ``crafting: {checkpoint, sha256, model, recipe, ensemble, architectures}`` — the attacker's
  pretrained model(s): a user's state_dict checkpoint (loaded with ``weights_only=True``,
  hash-checked, strictly matched against the architecture before any work starts), or ``ensemble``
  models trained by the factory on the clean training set with ``recipe`` (default: the config's
  recipe) — of one architecture, or of each of ``architectures`` (an ensemble of different
  architectures, seed 002 section 1.3.4).
* ``victim: {model, recipe}`` — the victims' architecture and recipe when they differ from the
  config's (transfer, seed 002 section 1.5.2; a DP-SGD recipe for section 1.5.5). A victim model with
  ``init`` (a pretrained state_dict) is fine-tuned from it (``train: all``) or, with ``train: head``,
  only its classifier is retrained on the poisoned set over the frozen pretrained features (the
  transfer-learning setting of Shafahi et al. 2018 and Saha et al. 2020; :mod:`mlaudit.models.freeze`).
  Then, unless ``crafting`` names other models, the attacker's crafting model *is* that pretrained
  model (:attr:`PoisoningConfig.crafting_checkpoint`): it knows the feature extractor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError, DataError, TrainingError, TrialError
from ..factory import TrialSpec
from ..models.freeze import frozen_parameters, training_setting
from ..models.registry import ModelSpec
from ..query import load_model, logits_from_checkpoints, model_template
from ..stats import MeanSE, mean_difference
from ..train.recipe import Recipe
from .base import ExperimentConfig, ModelField, Stream, model_value, recipe_value
from .context import RunContext, TrialRecord

OptionalModel = Annotated[ModelSpec | None, BeforeValidator(model_value)]
"""A model field that takes a zoo name or a mapping, like the config's own ``model``."""


class CraftingOptions(BaseModel):
    """The attacker's crafting model(s); see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    model: OptionalModel = None
    recipe: Annotated[Recipe | None, BeforeValidator(lambda v: recipe_value(v, where="crafting.recipe"))] = None
    ensemble: int = Field(1, ge=1, le=64)
    architectures: tuple[ModelField, ...] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CraftingOptions:
        if self.architectures is not None:
            if not self.architectures:
                raise ValueError("crafting.architectures is empty; give at least one model or leave it out")
            if self.checkpoint is not None or self.model is not None:
                raise ValueError("crafting.architectures (an ensemble of different architectures, each trained "
                                 "`ensemble` times) excludes crafting.checkpoint and crafting.model")
        return self

    def specs(self, default: ModelSpec) -> list[ModelSpec]:
        """The architecture of every crafting model, in order (``ensemble`` of each)."""
        archs = self.architectures or (self.model or default,)
        return [a for a in archs for _ in range(self.ensemble)]


class VictimOptions(BaseModel):
    """Victim architecture and recipe (None: the config's own ``model`` / ``recipe``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: OptionalModel = None
    recipe: Annotated[Recipe | None, BeforeValidator(lambda v: recipe_value(v, where="victim.recipe"))] = None


class PoisoningConfig(ExperimentConfig):
    """Fields every poisoning kind shares: the attacker's ``crafting`` model(s) and the ``victim``
    architecture and recipe (each kind adds its own ``attack`` and ``victims``)."""

    crafting: CraftingOptions = CraftingOptions()
    victim: VictimOptions = VictimOptions()

    @property
    def crafting_model(self) -> ModelSpec:
        """Architecture of the crafting model (``crafting.model``, else the config's ``model``)."""
        return self.crafting.model or self.model

    @property
    def victim_model(self) -> ModelSpec:
        return self.victim.model or self.model

    @property
    def victim_recipe(self) -> Recipe:
        return self.victim.recipe or self.recipe

    @property
    def crafting_checkpoint(self) -> tuple[Path, str | None, ModelSpec] | None:
        """``(file, sha256, architecture)`` of the attacker's pretrained crafting model, or None when the
        factory trains the crafting model(s): ``crafting.checkpoint`` when given; else, when the victim
        model starts from ``init`` and ``crafting`` sets nothing else (no model, architectures, recipe,
        ensemble), that very file (the victims' pretrained model, all of it trainable for crafting)."""
        c = self.crafting
        if c.checkpoint is not None:
            return c.checkpoint, c.sha256, self.crafting_model
        v = self.victim_model
        if v.init is None or c.model is not None or c.architectures is not None or c.recipe is not None or c.ensemble != 1:
            return None
        spec = v.model_copy(update={"init": None, "init_sha256": None, "train": "all", "reset_head": False})
        return Path(v.init), v.init_sha256, spec

    def victim_seed(self, i: int) -> int:
        """Seed of victim ``i`` (the same in every view, so clean/poisoned comparisons are paired)."""
        return self.trial_seed(i, stream=Stream.VICTIMS)


def check_crafting(config: PoisoningConfig, data: DataBundle, *, single_architecture: bool = False) -> None:
    """Runner hook piece: a crafting checkpoint exists, loads weights-only, matches its hash and the
    architecture exactly (missing/unexpected keys, shapes) — all before any work starts. With
    ``single_architecture`` (kinds whose method needs one model family) ``architectures`` is refused."""
    crafting = config.crafting
    if single_architecture and crafting.architectures is not None and len(set(crafting.architectures)) > 1:
        raise ConfigError(f"crafting.architectures: {config.kind} crafts with one architecture, got "
                          f"{[a.name for a in crafting.architectures]}; use crafting.model")
    for arch in crafting.architectures or ():
        model_template(arch, data)  # UnsupportedModelError naming the model when it cannot take this data
    if config.crafting_checkpoint is not None:
        _crafting_checkpoint(config, data)


def _crafting_checkpoint(config: PoisoningConfig, data: DataBundle) -> nn.Module:
    """The crafting model with the weights of :attr:`PoisoningConfig.crafting_checkpoint` (hash- and
    fit-checked, CPU)."""
    found = config.crafting_checkpoint
    assert found is not None
    path, sha256, spec = found
    given = config.crafting.checkpoint is not None
    return load_model(spec, path, sha256=sha256, data=data,
                      source=f"crafting.checkpoint {str(path)!r}" if given else f"victim model.init {str(path)!r}",
                      hint="set crafting.model to the checkpoint's architecture" if given else
                           "give crafting.checkpoint and crafting.model, or crafting.recipe to train crafting models")


def crafting_models(config: PoisoningConfig, ctx: RunContext, data: DataBundle
                    ) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """The crafting model(s) in eval mode on ``ctx.device`` and their records (test accuracy, ...).

    From ``crafting.checkpoint`` when given, else ``crafting.ensemble`` models of each architecture
    (``crafting.architectures``, or ``crafting.model``, or the config's model) trained by the factory
    on the clean training split (committed to the store, so a resumed run reuses them).
    """
    crafting = config.crafting
    if (found := config.crafting_checkpoint) is not None:
        m = _crafting_checkpoint(config, data)
        source = "crafting.checkpoint" if crafting.checkpoint is not None else "victim model.init"
        return [m.to(ctx.device).eval()], [{"trial_id": "crafter-checkpoint", "checkpoint": str(found[0]),
                                            "source": source}]
    specs = crafting.specs(config.model)
    models, records = [], []
    for arch in dict.fromkeys(specs):  # one factory job per architecture, crafter ids in ensemble order
        cfg = config.model_copy(update={"model": arch, "recipe": crafting.recipe or config.recipe})
        trials = [TrialSpec(f"crafter-{i:02d}", seed=config.trial_seed(i, stream=Stream.CRAFTERS),
                            tags={"role": "crafter", "model": arch.name}) for i, s in enumerate(specs) if s == arch]
        for r in ctx.train(cfg.factory_job(data, trials, device=ctx.device), save_weights=True,
                           label=f"training the crafting model(s): {arch.name}"):
            m = load_model(arch, ctx.out_dir / r["checkpoint"], sha256=r.get("sha256"), data=data)
            models.append(m.to(ctx.device).eval())
            records.append(r)
    return models, records


def train_victims(config: PoisoningConfig, ctx: RunContext, data: DataBundle, views: Mapping[str, DataView | None], *,
                  victims: int, save_weights: bool = False, label: str = "training victims",
                  on_failure: str = "raise") -> dict[str, list[dict[str, Any]]]:
    """Retrain ``victims`` models (the config's victim architecture and recipe) from scratch on each
    view (None = the clean training split), all in one factory job (so the factory batches across
    views). Trial ids ``<view>-v<i>``; victim ``i`` has seed ``config.victim_seed(i)`` in every view.
    Returns the records per view name, in victim order. ``on_failure="skip"`` leaves out victims whose
    training failed (named in ``ctx.failed``; see :meth:`RunContext.train`) and raises the first
    failure only when a view is left without any victim.
    """
    if victims < 1:
        raise ConfigError(f"victims must be >= 1, got {victims}")
    for name in views:
        if not name or "/" in name:
            raise ConfigError(f"view names must be non-empty and contain no '/', got {name!r}")
    cfg = config.model_copy(update={"model": config.victim_model, "recipe": config.victim_recipe})
    trials = []
    for name, view in views.items():
        for i in range(victims):
            trials.append(TrialSpec(f"{name}-v{i:03d}", seed=config.victim_seed(i),
                                    view=name if view is not None else None, tags={"view": name, "victim": i}))
    job = cfg.factory_job(data, trials, device=ctx.device,
                          views={k: vw for k, vw in views.items() if vw is not None})
    records = ctx.train(job, save_weights=save_weights, label=label, on_failure=on_failure)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in views}
    for r in records:
        out[r["tags"]["view"]].append(r)
    empty = [name for name, rs in out.items() if not rs]
    if empty:  # only reachable when skipping: nothing to compare for that view
        first = next(iter(ctx.failed))
        raise TrialError(first, TrainingError(f"every victim of view {empty[0]!r} failed; the first: {ctx.failed[first]}"))
    return out


def victim_setting(config: PoisoningConfig, data: DataBundle) -> dict[str, Any]:
    """How the victims train, for metrics and report: ``setting`` (from scratch, fine-tuned, transfer, head
    on random features; :func:`mlaudit.models.freeze.training_setting`), ``train`` (all / head),
    ``reset_head``, ``init`` and its sha256, ``frozen_parameters`` of ``parameters``, and a report phrase."""
    spec = config.victim_model
    m = model_template(spec, data)
    total, frozen = sum(p.numel() for p in m.parameters()), frozen_parameters(m)
    setting = training_setting(spec)
    phrase = {"from scratch": "trained from scratch",
              "fine-tuned": "fine-tuned (all parameters) from the pretrained model.init",
              "transfer": "transfer learning: only the classifier retrained"
                          + (" (re-initialised)" if spec.reset_head else "") + " on the frozen features of model.init",
              "head on random features": "only the classifier trained, on frozen random features"}[setting]
    if frozen:
        phrase += f"; {frozen:,} of {total:,} parameters frozen"
    return {"setting": setting, "train": spec.train, "reset_head": spec.reset_head,
            "init": spec.init, "init_sha256": spec.init_sha256, "frozen_parameters": frozen,
            "parameters": total, "phrase": phrase}


def failed_victims_note(ctx: RunContext, metrics: dict[str, Any]) -> list[str]:
    """Record victims skipped after a failed training in ``metrics["failed_trials"]``; the report note."""
    return ctx.failed_note(metrics, what="victim(s)")


def victim_logits(config: PoisoningConfig, ctx: RunContext, data: DataBundle, records: Sequence[dict[str, Any]],
                  x: Tensor) -> Tensor:
    """Logits [V, N, C] of saved victims (records with ``checkpoint``) on inputs ``x`` [N, ...]."""
    if any("checkpoint" not in r for r in records):
        raise DataError("victim_logits needs victims trained with save_weights=True")
    spec = config.victim_model
    paths = [ctx.out_dir / r["checkpoint"] for r in records]
    return logits_from_checkpoints(functools.partial(model_template, spec, data), paths, x, device=ctx.device,
                                   sha256=[r.get("sha256") for r in records])[:, :, 0]


def victim_predictions(config: PoisoningConfig, ctx: RunContext, data: DataBundle, recs: list[dict[str, Any]],
                        targets: list[int], *, keep_weights: bool = False) -> Tensor:
    """Predicted classes [V, T] of the victims ``recs`` on the test images ``targets``.

    Predictions kept in a record's ``outputs`` (a resumed run) are reused; the missing ones come from
    the checkpoints. The checkpoints are then released (the predictions stay in the store, so a resume
    never retrains) unless ``keep_weights`` (e.g. targeted-poison's clean victims keep theirs, because
    a grown study, with more scenarios, asks them about new targets)."""
    for r in recs:  # records written before 2026-11-23 kept {"targets": "4,17", "predictions": [1, 3]}
        if isinstance((r.get("outputs") or {}).get("predictions"), list):
            r["outputs"] = {**r["outputs"], "predictions": kept_predictions(r)}

    def predict(missing: list[TrialRecord], need: list[int]) -> list[dict[int, int]]:
        logits = victim_logits(config, ctx, data, missing, data.test.x[need])
        return [dict(zip(need, row.argmax(-1).tolist(), strict=True)) for row in logits]

    got = ctx.derived(recs, key="predictions", compute=predict, items=targets, keep_weights=keep_weights)
    return torch.tensor([[int(g[t]) for t in targets] for g in got], dtype=torch.long)


def kept_predictions(rec: dict[str, Any]) -> dict[int, int]:
    """``{target id: predicted class}`` kept in a victim record's outputs (empty when none)."""
    out = rec.get("outputs") or {}
    preds = out.get("predictions")
    if isinstance(preds, dict):
        return {int(t): int(c) for t, c in preds.items()}
    if isinstance(preds, list) and isinstance(out.get("targets"), str):  # records written before 2026-11-23
        return {int(t): int(c) for t, c in zip(out["targets"].split(","), preds, strict=True)}
    return {}


def finished_crafters(ctx: RunContext) -> list[dict[str, Any]]:
    """Records of the crafting models an earlier run of this experiment trained (for the report of a
    resumed run that reloads its poisons and so never builds the crafting models)."""
    return [r for t, r in sorted(ctx.finished.items()) if t.startswith("crafter-")]


def accuracy_summary(clean: Sequence[dict[str, Any]], poisoned: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Clean and poisoned victims' test accuracy (mean +- SE) and the drop clean - poisoned
    (:func:`mlaudit.stats.mean_difference`: paired over victims that share a seed when both sides
    have the same count, else the difference of means)."""
    a = np.array([r["metrics"]["test_accuracy"] for r in clean], dtype=float)
    b = np.array([r["metrics"]["test_accuracy"] for r in poisoned], dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ConfigError("accuracy_summary needs at least one clean and one poisoned victim")
    return {"clean_accuracy": MeanSE.of(a).to_dict(), "poisoned_accuracy": MeanSE.of(b).to_dict(),
            "drop": mean_difference(a, b)}
