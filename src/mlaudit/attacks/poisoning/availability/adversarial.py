"""Adversarial poisoning (Fowl et al. 2021, "Adversarial Examples Make Strong Poisons"; seed 002
section 2.3.2): adversarial examples of a fixed crafting model, released with their *true* labels.

Threat model: see :mod:`.base`. The crafting model(s) F(.; theta*) are trained on the clean data
and stay fixed; each poison is optimised on its own (the objectives are separable), so poisons can
be crafted in any order and batch size, e.g. as data arrives.

* untargeted (UT), eq. 2.3:        max_{delta in S} sum_i L(F(x_i + delta_i; theta*), y_i)
* class-targeted (CT), eq. 2.4:    min_{delta in S} sum_i L(F(x_i + delta_i; theta*), g(y_i))

with L the cross-entropy (averaged over an ensemble of crafting models), S the l-inf ball of radius
eps intersected with the pixel box, and g a permutation of the labels *with no fixed points* (a
derangement: every image is pushed towards another class). Both run through
:func:`mlaudit.craft.craft` with signed-gradient PGD (Madry et al. 2018; the paper uses 250 steps),
random restarts and differentiable augmentation (section 2.3.3).

Relabelling (section 2.4.6): :func:`crafter_predictions` gives the crafting model's label of each
poison; victims trained on the poisons *with these labels* recover most of the clean accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from ....craft import LinfBall, craft
from ....errors import ConfigError
from ....query import evaluating, forward_batched
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .base import AVAILABILITY_CRAFTING, check_inputs, ensemble_logits

PermutationSpec = tuple[int, ...] | Literal["shift", "random"]


def check_permutation(perm: Sequence[int], num_classes: int | None = None, *, field: str = "permutation"
                      ) -> tuple[int, ...]:
    """``perm`` as a tuple when it is a permutation of ``range(C)`` without fixed points (and, given
    ``num_classes``, of length C); ConfigError naming ``field``, the value and the rule otherwise."""
    p = tuple(int(v) for v in perm)
    c = len(p)
    if num_classes is not None and c != num_classes:
        raise ConfigError(f"{field} has {c} entries but the data has {num_classes} classes; give g(0), ..., "
                          f"g({num_classes - 1})")
    if c < 2:
        raise ConfigError(f"{field} must map at least 2 classes (a derangement of 1 class does not exist), got {list(p)}")
    if sorted(p) != list(range(c)):
        raise ConfigError(f"{field} = {list(p)} is not a permutation of 0..{c - 1} (each class exactly once)")
    fixed = [i for i in range(c) if p[i] == i]
    if fixed:
        raise ConfigError(f"{field} = {list(p)} has fixed points {fixed} (g(y) = y); the class-targeted objective "
                          "(seed 002, eq. 2.4) needs g(y) != y for every class, e.g. g(y) = (y + 1) mod C")
    return p


def shift_permutation(num_classes: int, shift: int = 1) -> Tensor:
    """int64 [C]: g(y) = (y + shift) mod C, a derangement for shift not divisible by C."""
    if num_classes < 2 or shift % num_classes == 0:
        raise ConfigError(f"a shift permutation needs >= 2 classes and shift not divisible by C; got C={num_classes}, "
                          f"shift={shift}")
    return (torch.arange(num_classes) + shift) % num_classes


def random_derangement(num_classes: int, *, generator: torch.Generator) -> Tensor:
    """int64 [C]: a uniformly random permutation without fixed points (rejection sampling; about
    e = 2.72 draws on average)."""
    if num_classes < 2:
        raise ConfigError(f"a derangement needs >= 2 classes, got {num_classes}")
    ar = torch.arange(num_classes)
    while True:
        p = torch.randperm(num_classes, generator=generator, device=generator.device).cpu()
        if bool((p != ar).all()):
            return p


def resolve_permutation(spec: PermutationSpec, num_classes: int, *, generator: torch.Generator) -> Tensor:
    """The label map g as int64 [C]: ``shift`` (y + 1 mod C), ``random`` (a seeded derangement) or
    an explicit tuple (checked)."""
    if spec == "shift":
        return shift_permutation(num_classes)
    if spec == "random":
        return random_derangement(num_classes, generator=generator)
    return torch.tensor(check_permutation(spec, num_classes), dtype=torch.int64)


class ClassTargetedOptions(BaseModel):
    """``permutation``: the label map g of eq. 2.4 — ``shift`` (default), ``random`` or a list
    [g(0), ..., g(C-1)] without fixed points."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    permutation: PermutationSpec = "shift"

    @field_validator("permutation", mode="before")
    @classmethod
    def _perm(cls, v: object) -> object:
        if isinstance(v, (list, tuple)):
            return check_permutation(v, field="g")  # type: ignore[arg-type]
        return v


class AdversarialLoss:
    """Objective ``(x_adv [B, *shape], idx [B]) -> [B]`` for :func:`craft` (which minimises):
    ``+CE(F(x_adv), labels[idx])`` when ``targeted`` (eq. 2.4, labels = g(y)), else
    ``-CE(F(x_adv), labels[idx])`` (eq. 2.3, labels = y); CE averaged over the ensemble."""

    def __init__(self, models: Sequence[nn.Module], labels: Tensor, *, targeted: bool) -> None:
        if not models:
            raise ConfigError("adversarial poisoning needs at least one crafting model")
        self.models = list(models)
        self.labels = labels
        self.sign = 1.0 if targeted else -1.0

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        logits = ensemble_logits(self.models, x_adv)  # [E, B, C]
        e, b, c = logits.shape
        lab = self.labels[idx].repeat(e)
        ce = F.cross_entropy(logits.reshape(e * b, c), lab, reduction="none").view(e, b).mean(0)
        return self.sign * ce


def crafter_predictions(models: Sequence[nn.Module], x: Tensor, *, batch_size: int = 1024) -> Tensor:
    """int64 [N]: the ensemble's label (argmax of the mean softmax) for ``x`` [N, *shape], in eval mode."""
    logits = torch.stack([forward_batched(m, x, batch_size=batch_size, device=x.device) for m in models])  # [E, N, C]
    return logits.softmax(-1).mean(0).argmax(-1)


def _adversarial(task: PoisonTask, labels: Callable[[Tensor], Tensor], generator: torch.Generator, *,
                 targeted: bool) -> Poison:
    """PGD on the task's rows towards ``labels(y)`` (eq. 2.4) or away from y (eq. 2.3); diagnostics in info."""
    s = task.crafting_settings
    x, y = task.poison_rows()
    check_inputs(x, y, task.num_classes)
    targets = labels(y)
    models = list(task.models)
    objective = AdversarialLoss(models, targets, targeted=targeted)
    with evaluating(*models, requires_grad=False):  # gradients reach the poisons only
        res = craft(objective, x, constraint=LinfBall(task.linf_eps()), steps=s.steps, optimizer=s.optimizer,
                    lr=s.lr, schedule=s.schedule, restarts=s.restarts, init="zero", augment=task.crafting_augment,
                    batch_size=s.batch_size, generator=generator, on_step=task.on_step)
    pred = crafter_predictions(models, x + res.delta, batch_size=s.batch_size or 1024)
    info = {"objective_mean": res.objective / x.shape[0], "restart_objectives": res.restarts,
            "crafter_accuracy_on_poisons": float((pred == y).float().mean())}
    if targeted:
        info["crafter_target_rate"] = float((pred == targets).float().mean())
    return task.perturbed(res.delta.to(task.train.device), info)


@register_poisoner("adversarial-untargeted", family="availability", needs=Needs.CRAFTING_MODELS,
                   defaults=AVAILABILITY_CRAFTING)
def adversarial_untargeted(task: PoisonTask) -> Poison:
    """Untargeted adversarial poisoning (Fowl et al. 2021, seed 002 eq. 2.3): maximise the crafting model's loss on y."""
    return _adversarial(task, lambda y: y, task.generator(), targeted=False)


def _check_class_targeted(options: ClassTargetedOptions, num_classes: int) -> None:
    if num_classes < 2:
        raise ConfigError("the class-targeted objective needs at least 2 classes")
    if isinstance(options.permutation, tuple):
        check_permutation(options.permutation, num_classes, field="permutation")


@register_poisoner("adversarial-class-targeted", family="availability", needs=Needs.CRAFTING_MODELS,
                   options=ClassTargetedOptions, defaults=AVAILABILITY_CRAFTING, check_data=_check_class_targeted)
def adversarial_class_targeted(task: PoisonTask) -> Poison:
    """Class-targeted adversarial poisoning (Fowl et al. 2021, seed 002 eq. 2.4): minimise the loss towards g(y)."""
    opts: ClassTargetedOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    gen = task.generator()  # draws the random derangement first, then the crafting's random starts
    g = resolve_permutation(opts.permutation, task.num_classes, generator=gen)
    poison = _adversarial(task, lambda y: g.to(y.device)[y], gen, targeted=True)
    poison.info["permutation"] = g.tolist()
    return poison
