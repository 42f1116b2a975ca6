"""What the backdoor poisoners share (family ``backdoor`` of the poisoner registry).

Threat model: the attacker controls P = floor(budget x N) rows of the training set (N rows; the
budget is a rate of the whole set and a ceiling: never more poisons than it allows). It stamps a
trigger (:mod:`.trigger`) on them and, for dirty-label attacks, relabels them to the ``target_class``;
the victim trains from scratch on the poisoned set. The backdoor works when the victim classifies
*triggered* test inputs of the source classes as the target class while staying accurate on clean
inputs (attack success rate and clean accuracy; the ``backdoor`` experiment kind measures both).

Which rows: dirty-label attacks draw the poisons uniformly (seeded by ``task.seed``) from the
training rows of the ``source_classes`` (None: every class but the target); clean-label attacks draw
them from the target class itself and keep their labels. ``task.poison_ids``, when given, restricts
the rows they may draw from.

Every poison is a :class:`~mlaudit.data.view.DataView` over the clean split: ``with_delta`` holds
the exact difference (triggered image - clean image) of each poisoned row, unbounded (``eps=None``),
because a trigger is not an l-inf perturbation; ``with_labels`` holds the relabelling. The
hidden-trigger methods (``hidden-trigger``, ``sleeper-agent``) stamp nothing: their rows are crafted
target-class images, held as a delta bounded by ``eps``, and the trigger appears on test inputs only
(and on the triggered source images they craft against, :func:`source_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor

from ....data.view import DataView
from ....errors import ConfigError
from ..contract import Poison, PoisonTask
from .trigger import Trigger, TriggerSpec, apply_trigger


class BackdoorOptions(BaseModel):
    """The options every backdoor method takes: ``target_class``; ``source_classes`` whose triggered
    inputs should go to the target (None: every other class); ``budget`` the poisoned fraction of the
    training set, in (0, 1] (P = floor(budget x N)); ``trigger`` (:class:`~.trigger.TriggerSpec`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_class: int = Field(0, ge=0, le=100_000)
    source_classes: tuple[int, ...] | None = None
    budget: float = Field(0.01, gt=0.0, le=1.0)
    trigger: TriggerSpec = TriggerSpec()

    @field_validator("source_classes")
    @classmethod
    def _sources(cls, v: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("source_classes is empty; give at least one class or leave it out (every class but "
                             "the target)")
        if min(v) < 0 or len(set(v)) != len(v):
            raise ValueError(f"source_classes must be distinct class indices >= 0, got {list(v)}")
        target = info.data.get("target_class")
        if target in v:
            raise ValueError(f"target_class = {target} is also in source_classes = {list(v)}; allowed: source classes "
                             "other than the target (a triggered input of the target class is classified as the "
                             "target already)")
        return tuple(sorted(v))

    def sources(self, num_classes: int) -> list[int]:
        """The source classes: given, or every class but the target."""
        if self.source_classes is not None:
            return list(self.source_classes)
        return [c for c in range(num_classes) if c != self.target_class]


def check_classes(options: BackdoorOptions, num_classes: int) -> None:
    """Registry hook: the target and source classes exist in the data (ConfigError naming the field)."""
    if options.target_class >= num_classes:
        raise ConfigError(f"target_class = {options.target_class} is not a class of this data; allowed 0 <= "
                          f"target_class <= {num_classes - 1}")
    bad = [c for c in options.source_classes or () if c >= num_classes]
    if bad:
        raise ConfigError(f"source_classes = {list(options.source_classes or ())} name classes {bad} that the data "
                          f"does not have; allowed 0 .. {num_classes - 1}")
    if not options.sources(num_classes):
        raise ConfigError(f"the data has {num_classes} class(es): no source class besides target_class = "
                          f"{options.target_class}")


def poison_count(budget: float, n: int) -> int:
    """P = floor(budget x N) (with 1e-9 slack for float rounding, e.g. 0.29 x 100 = 28.999...)."""
    return int(math.floor(budget * n + 1e-9))


def check_budget(budget: float, n: int, eligible: int, *, where: str = "budget", rows: str = "eligible") -> int:
    """The number of poisons P of ``budget`` on N = ``n`` rows; a ConfigError naming ``where`` when P is
    0 (with the smallest rate that yields one) or more than the ``eligible`` rows the method may poison."""
    p = poison_count(budget, n)
    if p < 1:
        raise ConfigError(f"{where} = {budget:g} of {n} training examples gives 0 poisons (P = floor(budget x N)); "
                          f"the smallest rate that yields one poison is 1/{n} = {1 / n:.6g}")
    if p > eligible:
        raise ConfigError(f"{where} = {budget:g} asks for {p} poisons but there are only {eligible} {rows} training "
                          f"rows; allowed {where} <= {eligible}/{n} = {eligible / n:.6g}")
    return p


def choose_rows(task: PoisonTask, classes: list[int], budget: float, *, what: str) -> Tensor:
    """int64 [P] ascending: P = floor(budget x N) rows of ``classes`` (among ``task.ids()``), drawn
    uniformly with ``task.seed``."""
    ids = task.ids()
    y = task.train.y[ids].cpu()
    pool = ids.cpu()[torch.isin(y, torch.tensor(classes, dtype=y.dtype))]
    p = check_budget(budget, len(task.train), len(pool), rows=what)
    pick = torch.randperm(len(pool), generator=task.generator())[:p]
    return pool[pick].sort().values


def source_rows(task: PoisonTask, options: BackdoorOptions, count: int | None, *, salt: int) -> Tensor:
    """int64 [S]: training rows of the source classes that a clean-label crafting method triggers as its
    stand-ins for the test inputs (Hidden Trigger Backdoor, Sleeper Agent): every one when ``count`` is
    None, else ``count`` drawn uniformly (seeded by ``task.seed`` and ``salt``; when ``count`` exceeds
    them, whole permutations are repeated). Any training row counts (``task.poison_ids`` restricts the
    rows that are perturbed, not these)."""
    y = task.train.y.cpu()
    pool = torch.isin(y, torch.tensor(options.sources(task.num_classes), dtype=y.dtype)).nonzero().flatten()
    if len(pool) == 0:
        raise ConfigError(f"the training set has no row of the source classes {options.sources(task.num_classes)}: "
                          "nothing to stamp the trigger on while crafting")
    if count is None:
        return pool
    g = torch.Generator().manual_seed((task.seed * 7919 + salt) % 2**63)
    reps = -(-count // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:count]


def trigger_of(task: PoisonTask, options: BackdoorOptions) -> Trigger:
    """The options' trigger on the task's images."""
    return options.trigger.build(task.train.shape)


def stamped(task: PoisonTask, ids: Tensor, x: Tensor, trigger: Trigger, options: BackdoorOptions, *,
            relabel: bool, info: dict[str, Any] | None = None) -> Poison:
    """The poison of rows ``ids`` [P] whose images become ``apply_trigger(x)`` (``x`` [P, C, H, W]: the
    clean rows, or the rows after a crafted perturbation), relabelled to the target when ``relabel``."""
    return as_poison(task, ids, apply_trigger(x.to(task.train.device), trigger), options, relabel=relabel, info=info)


def as_poison(task: PoisonTask, ids: Tensor, x_poison: Tensor, options: BackdoorOptions, *, relabel: bool,
              info: dict[str, Any] | None = None, eps: float | None = None) -> Poison:
    """The view whose rows ``ids`` [P] are the images ``x_poison`` [P, C, H, W] (in [0, 1]; held as the
    exact difference to the clean rows, bounded by ``eps`` when given, e.g. a crafted poison without a
    trigger) and, when ``relabel``, labelled as the target; with the accounting every backdoor reports."""
    dev = task.train.device
    ids = ids.to(dev)
    view = DataView.identity(task.train).with_delta(ids, x_poison.to(dev) - task.train.x[ids], eps=eps)
    if relabel:
        view = view.with_labels(ids, options.target_class)
    n, p = len(task.train), int(ids.numel())
    base = {"poisons": p, "rate": p / n, "budget": options.budget, "target_class": options.target_class,
            "source_classes": options.sources(task.num_classes), "relabelled": p if relabel else 0,
            "trigger": options.trigger.model_dump(mode="json"), "trigger_text": options.trigger.describe()}
    return Poison(view, info={**base, **(info or {})})
