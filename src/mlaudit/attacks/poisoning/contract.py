"""The one contract of every poisoning attack: a poisoner is ``fn(task: PoisonTask) -> Poison``.

Four families share it (seed 002 chapters 1 and 2, seed 001, issue 18):

* ``targeted`` — clean-label targeted poisoning (Witches' Brew and its baselines): perturb the
  scenario's poison rows so that victims classify a target as the adversarial class;
* ``availability`` — perturb (a fraction of) the training set so that victims generalise poorly;
* ``indiscriminate`` — insert points (or overwrite weights) to lower victims' clean accuracy;
* ``backdoor`` — stamp a trigger on a few rows (relabelled, or made hard within eps and kept
  correctly labelled) so that victims classify triggered inputs as a target class; a trigger is not
  an l-inf perturbation, so these views hold unbounded deltas (``eps=None``). The hidden-trigger
  methods (Hidden Trigger Backdoor, Sleeper Agent) put no trigger on their poisons: their views are
  crafted images bounded by ``eps``.

What a poisoner receives (:class:`PoisonTask`): the clean training split, the attacker's models
(what its entry *needs*, :class:`Needs`), the targeted scenario when there is one (:class:`Target`),
the budget (``eps`` for perturbations, ``eps_d`` for inserted points), the crafting settings
(:class:`CraftingSettings`, resolved against the method's defaults), the method's own options (a
validated pydantic model), a seed, a device and a progress callback. What it returns
(:class:`Poison`): the poisoned training set as a :class:`~mlaudit.data.view.DataView` over the clean
split (perturbed rows with ``|delta|_inf <= eps`` and ``0 <= x + delta <= 1``, relabelled rows,
inserted rows), or, for attacks on weights, the models it produced; plus JSON-able ``info``.

Registration and lookup are in :mod:`.registry` (:data:`~.registry.POISONERS`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from ...config import format_validation_error
from ...data.augment import AugmentSpec
from ...data.base import TensorDataset
from ...data.view import DataView
from ...errors import ConfigError

Family = Literal["targeted", "availability", "indiscriminate", "backdoor"]
StepCallback = Callable[[int, float], None]
"""``on_step(step, objective)`` after every optimiser step (progress bars)."""


class CraftingSettings(BaseModel):
    """The crafting block every crafting attack shares (the settings of :func:`mlaudit.craft.craft`).

    ``steps`` optimiser steps (per round for min-min methods), ``lr`` step size (in units of eps for
    norm balls, absolute pixels for inserted points), ``optimizer``, ``schedule``, ``restarts``
    (best kept), ``parallel_restarts`` (restarts optimised together through the objective's batched
    form), ``batch_size`` (poison mini-batch; None: all at once), ``augment`` (the victims'
    augmentation applied differentiably while crafting), ``precision`` (bf16 autocast on CUDA),
    ``channels_last`` / ``cudnn_benchmark`` (CUDA layout of the crafting models and poisons).

    None means "the method's default": each poisoner declares the settings it uses with their
    defaults (:attr:`~.registry.PoisonerEntry.defaults`), and :meth:`resolve` fills them in.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, le=1_000_000)
    lr: float | None = Field(None, gt=0.0, le=100.0)
    optimizer: Literal["signed-adam", "pgd", "adam"] | None = None
    schedule: Literal["step", "cosine", "constant"] | None = None
    restarts: int | None = Field(None, ge=1, le=1000)
    parallel_restarts: int | None = Field(None, ge=1, le=64)
    batch_size: int | None = Field(None, ge=1, le=10_000_000)
    augment: bool | None = None
    precision: Literal["fp32", "bf16"] | None = None
    channels_last: bool | None = None
    cudnn_benchmark: bool | None = None

    def resolve(self, defaults: Mapping[str, Any]) -> CraftingSettings:
        """Every None field from ``defaults`` (values, or callables of the other resolved fields such
        as :func:`pgd_lr`), then from :data:`ENGINE_DEFAULTS`; ``batch_size`` None stays None (all
        poisons in one batch)."""
        given = {k: getattr(self, k) for k in CraftingSettings.model_fields}
        filled = fill_defaults(given, defaults)
        return CraftingSettings.model_construct(**{k: v if v is not None else ENGINE_DEFAULTS[k]
                                                   for k, v in {**given, **filled}.items()})

    @classmethod
    def parse(cls, raw: CraftingSettings | Mapping[str, Any] | None, *, where: str = "settings") -> CraftingSettings:
        """``raw`` validated (a ConfigError naming ``where.<field>``, the value and the range otherwise)."""
        if isinstance(raw, CraftingSettings):
            return raw
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix=where, model=cls)) from None


SETTINGS = tuple(CraftingSettings.model_fields)
ENGINE_DEFAULTS: dict[str, Any] = {
    "steps": 1, "lr": 0.1, "optimizer": "signed-adam", "schedule": "constant", "restarts": 1,
    "parallel_restarts": 1, "batch_size": None, "augment": False, "precision": "fp32", "channels_last": False,
    "cudnn_benchmark": False}
"""What a setting a method does not use resolves to (a method reads only the settings it declares)."""


def fill_defaults(given: Mapping[str, Any], defaults: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """``{field: default}`` for the fields of ``defaults`` that ``given`` leaves None: plain values
    first, then callables of the merged settings. With ``strict=False`` a callable that fails (on
    values not validated yet) leaves its field None instead of raising."""
    out = {k: v for k, v in defaults.items() if given.get(k) is None and not callable(v)}
    for k, v in defaults.items():
        if given.get(k) is None and callable(v):
            try:
                out[k] = v({**given, **out})
            except (ConfigError, TypeError, ZeroDivisionError):
                if strict:
                    raise
    return out


def pgd_lr(settings: Mapping[str, Any]) -> float:
    """The PGD step size 2.5 / steps (in units of eps: the steps can travel 2.5 eps; Madry et al.
    2018), the default ``lr`` of the availability methods."""
    steps = settings.get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the default lr = 2.5 / steps needs steps >= 1, got steps = {steps!r}")
    return 2.5 / steps


class Needs(enum.Flag):
    """What a poisoner needs besides the data (combine with ``|``)."""

    NOTHING = 0
    CRAFTING_MODELS = enum.auto()
    """Fixed pretrained crafting model(s) in eval mode (an ensemble averages over them)."""
    FRESH_MODEL = enum.auto()
    """Exactly one freshly initialised surrogate that the method trains itself."""
    TARGET = enum.auto()
    """A targeted scenario (:class:`Target`)."""


@dataclass(frozen=True)
class Target:
    """A targeted scenario (seed 002 section 1.7): the target test images ``x`` [T, *shape] (one
    class, ``target_class``) that victims should classify as ``adv_class``."""

    x: Tensor
    target_class: int
    adv_class: int


@dataclass(frozen=True)
class VictimObjective:
    """The training objective victims minimise: cross-entropy with ``label_smoothing`` plus
    ``weight_decay`` lambda/2 ||w||^2 (model-targeted attacks make its gradient vanish)."""

    weight_decay: float = 0.0
    label_smoothing: float = 0.0


class NoOptions(BaseModel):
    """Options model of methods without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PoisonTask:
    """What every poisoner receives (module docstring).

    ``train`` the clean training split (x [N, *shape] in [0, 1], y [N]; the base of the returned
    view); ``num_classes``; ``eps`` the l-inf radius in [0, 1] pixel units (16/255 for "eps 16") of
    perturbing attacks; ``poison_ids`` int64 [P] the base rows the attacker may perturb (None: every
    row); ``target`` the targeted scenario; ``eps_d`` the inserted fraction P / N of inserting
    attacks; ``models`` what the entry needs (crafting models or one fresh surrogate);
    ``settings`` / ``options`` the crafting settings and the method's options (raw mappings are
    validated by the entry's call); ``augment`` the victims' augmentation (applied while crafting
    when ``settings.augment``); ``victim`` the victims' training objective; ``seed`` the only source
    of randomness; ``device`` where crafting runs; ``on_step`` progress.
    """

    train: TensorDataset
    num_classes: int
    eps: float | None = None
    poison_ids: Tensor | None = None
    target: Target | None = None
    eps_d: float | None = None
    models: Sequence[nn.Module] = ()
    settings: CraftingSettings | Mapping[str, Any] = field(default_factory=CraftingSettings)
    options: BaseModel | Mapping[str, Any] | None = None
    augment: AugmentSpec | None = None
    victim: VictimObjective = field(default_factory=VictimObjective)
    seed: int = 0
    device: torch.device | str = "cpu"
    on_step: StepCallback | None = None

    def __post_init__(self) -> None:
        if self.eps is not None and not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"eps must lie in (0, 1] pixel units (16/255 = {16 / 255:.4f}), got {self.eps}")
        if self.poison_ids is not None and (self.poison_ids.dim() != 1 or self.poison_ids.numel() == 0):
            raise ConfigError(f"poison_ids must be int64 [P >= 1], got shape {list(self.poison_ids.shape)}")

    @property
    def crafting_settings(self) -> CraftingSettings:
        """``settings`` (resolved by the entry's call before the poisoner sees the task)."""
        return CraftingSettings.parse(self.settings)

    @property
    def crafting_augment(self) -> AugmentSpec | None:
        """The augmentation applied while crafting: ``augment`` when ``settings.augment``, else None."""
        return self.augment if self.crafting_settings.augment else None

    def ids(self) -> Tensor:
        """int64 [P]: the rows the attacker may perturb (``poison_ids``, or every row)."""
        return self.poison_ids if self.poison_ids is not None else torch.arange(len(self.train))

    def poison_rows(self) -> tuple[Tensor, Tensor]:
        """The clean rows to perturb on ``device``: x [P, *shape], y [P]."""
        ids = self.ids()
        return self.train.x[ids].to(self.device), self.train.y[ids].to(self.device)

    def targeted(self) -> Target:
        """``target``, or a ConfigError when this targeted attack was given none."""
        if self.target is None:
            raise ConfigError("a targeted attack needs task.target (the target images and classes)")
        return self.target

    def linf_eps(self) -> float:
        """``eps``, or a ConfigError when this perturbing attack was given none."""
        if self.eps is None:
            raise ConfigError("this attack perturbs images and needs eps (l-inf radius in [0, 1] pixel units)")
        return self.eps

    def inserted_fraction(self) -> float:
        """``eps_d``, or a ConfigError when this inserting attack was given none."""
        if self.eps_d is None:
            raise ConfigError("this attack inserts eps_d * N points and needs eps_d (e.g. 0.03, 0.1 or 1)")
        return float(self.eps_d)

    def generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded with ``seed`` (on the CPU unless ``device``)."""
        return torch.Generator(device=device if device is not None else "cpu").manual_seed(self.seed)

    def perturbed(self, delta: Tensor, info: dict[str, Any], **meta: Any) -> Poison:
        """The poison of a perturbation ``delta`` [P, *shape] of :meth:`ids` (inside the ball and the box)."""
        view = DataView.identity(self.train).with_delta(self.ids(), delta.detach(), eps=self.linf_eps())
        return Poison(view.with_meta(**meta) if meta else view, info=info)


@dataclass
class Poison:
    """What a poisoner returns: ``view`` the poisoned training set as a view over the clean split
    (None for attacks on weights), ``models`` the parameters the attack produced (corrupted weights,
    or the target parameters a model-targeted attack aims at; None otherwise), and ``info``
    (objective, restarts, history, method diagnostics; JSON-able; a list under ``notes`` is report
    text)."""

    view: DataView | None
    models: list[nn.Module] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Poisoner(Protocol):
    """The uniform call: ``poisoner(task) -> Poison``."""

    def __call__(self, task: PoisonTask) -> Poison: ...
