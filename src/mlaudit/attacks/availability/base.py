"""The uniform call of every availability-poisoning method and the registry :data:`METHODS`.

Threat model (seed 002, section 2.3.1): the poisoner perturbs P training images (all of them for
secure dataset release, or a fraction) within an l-inf ball of radius ``eps`` and keeps their labels;
the victim trains a new model from scratch on the released data; success is a low victim accuracy on
clean test data. The poisoner knows neither the victim's initialisation, recipe nor architecture.

Every method is a function

    fn(x [P, *shape], y [P], *, models, budget, num_classes, generator, options, on_step) -> PoisonResult

with ``models`` the attacker's networks (what :attr:`AvailabilityMethod.crafter` asks for: fixed
pretrained crafting models, one freshly initialised surrogate that the method trains, or none),
``budget`` the shared crafting budget (:class:`CraftBudget`), ``options`` an instance of the
method's own pydantic options model, and ``generator`` the only source of randomness. The returned
``delta`` [P, *shape] satisfies ``|delta|_inf <= budget.eps`` and ``0 <= x + delta <= 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ...data.augment import AugmentSpec
from ...errors import ConfigError
from ...registry import Registry

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class CraftBudget:
    """The perturbation budget and optimiser settings shared by all methods.

    ``eps`` l-inf radius in [0, 1] pixel units (configs give it in /255 units); ``steps`` optimiser
    steps (per round for min-min methods); ``lr`` step size in units of ``eps`` (the convention of
    :func:`mlaudit.craft.craft`); ``restarts`` random restarts (best kept per sample); ``augment``
    the differentiable augmentation applied while crafting (None: none); ``batch_size`` crafting
    mini-batch (None: all P at once).
    """

    eps: float
    steps: int
    lr: float
    restarts: int = 1
    augment: AugmentSpec | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"eps must lie in (0, 1] pixel units (8/255 = {8 / 255:.4f}), got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or not self.lr > 0:
            raise ConfigError(f"a crafting budget needs steps >= 1, restarts >= 1 and lr > 0; got steps={self.steps}, "
                              f"restarts={self.restarts}, lr={self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None, got {self.batch_size}")


@dataclass
class PoisonResult:
    """``delta`` [P, *shape] (inside the budget) and method diagnostics ``info`` (JSON-able)."""

    delta: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class NoOptions(BaseModel):
    """Options model of methods without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


PoisonFn = Callable[..., PoisonResult]


@dataclass(frozen=True)
class AvailabilityMethod:
    """A registered method: ``fn`` (the uniform call above), which ``models`` it needs
    (``pretrained``: the fixed crafting model(s); ``fresh``: one untrained surrogate it trains
    itself; ``none``), its ``options`` model and a one-line ``description``."""

    name: str
    fn: PoisonFn
    crafter: Literal["pretrained", "fresh", "none"]
    options: type[BaseModel]
    description: str


METHODS: Registry[AvailabilityMethod] = Registry("availability-poisoning method")


def register_method(name: str, *, crafter: Literal["pretrained", "fresh", "none"],
                    options: type[BaseModel] = NoOptions) -> Callable[[PoisonFn], PoisonFn]:
    """Decorator registering ``fn`` as availability-poisoning method ``name``."""

    def deco(fn: PoisonFn) -> PoisonFn:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS.register(name)(AvailabilityMethod(name, fn, crafter, options, doc))
        return fn

    return deco


def ensemble_logits(models: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Logits [E, B, C] of every model on ``x`` [B, *shape] (with gradients w.r.t. ``x``)."""
    return torch.stack([m(x) for m in models])


def check_inputs(x: Tensor, y: Tensor, num_classes: int) -> None:
    """Shapes, labels and the pixel box of the clean images; ConfigError otherwise."""
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ConfigError(f"x must be [P, *shape] and y [P]; got x {list(x.shape)} and y {list(y.shape)}")
    if x.shape[0] == 0:
        raise ConfigError("nothing to poison: x holds no examples")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError(f"images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]")
