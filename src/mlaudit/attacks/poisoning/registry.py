"""The one registry of poisoners, :data:`POISONERS`, filled by :func:`register_poisoner`.

    @register_poisoner("bullseye", family="targeted", needs=Needs.CRAFTING_MODELS | Needs.TARGET,
                       defaults=TARGETED_CRAFTING, check_model=penultimate_features)
    def bullseye(task: PoisonTask) -> Poison: ...

    entry = POISONERS.get("bullseye", family="targeted")
    poison = entry(PoisonTask(train=data.train, num_classes=10, eps=16 / 255, poison_ids=ids,
                              target=Target(x_t, 3, 5), models=[crafter], options={}))

An entry declares what the method needs (:class:`~.contract.Needs`), its options model, the
crafting settings it uses with their defaults, and model requirements checked before any work.
Calling the entry validates the task's options and settings once (a ConfigError naming the
field), resolves the settings against the defaults, checks the needs, and runs the method.
Names are unique within a family (``label-flip`` is both a targeted and an indiscriminate method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from torch import nn

from ...config import format_validation_error
from ...errors import ConfigError
from .contract import SETTINGS, CraftingSettings, Family, Needs, NoOptions, Poison, Poisoner, PoisonTask

FAMILIES: tuple[Family, ...] = ("targeted", "availability", "indiscriminate", "backdoor")


@dataclass(frozen=True)
class PoisonerEntry:
    """A registered poisoner: ``fn`` (the uniform call), its ``family``, what it ``needs``, its
    ``options`` model, ``defaults`` of the crafting settings it uses (values or callables of the
    other settings; the keys are the settings it reads), ``acts_on`` (``data``: returns a view;
    ``model``: returns models), ``check_model(model)`` (raises for a crafting model the method
    cannot use, before any work), ``check_data(options, num_classes)`` (raises for options that do
    not fit the data, before any work), ``model_count`` (exactly this many crafting models; None: any),
    ``progress(settings, options)`` (optimiser steps, for progress bars) and a one-line ``description``."""

    name: str
    family: Family
    fn: Poisoner
    needs: Needs
    options: type[BaseModel] = NoOptions
    defaults: Mapping[str, Any] = field(default_factory=dict)
    acts_on: Literal["data", "model"] = "data"
    check_model: Callable[[nn.Module], object] | None = None
    check_data: Callable[[Any, int], object] | None = None
    model_count: int | None = None
    progress: Callable[[CraftingSettings, Any], int] | None = None
    description: str = ""

    def make_options(self, raw: BaseModel | Mapping[str, Any] | None, *, where: str = "options") -> BaseModel:
        """``raw`` validated by the options model (None: its defaults); ConfigError naming ``where.<field>``."""
        if isinstance(raw, self.options):
            return raw
        if isinstance(raw, BaseModel):
            raise ConfigError(f"{self.name} takes {self.options.__name__} options, got {type(raw).__name__}")
        try:
            return self.options.model_validate(dict(raw or {}))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix=where, model=self.options)) from None

    def settings(self, raw: CraftingSettings | Mapping[str, Any] | None = None) -> CraftingSettings:
        """``raw`` validated and resolved against :attr:`defaults` (every field set)."""
        return CraftingSettings.parse(raw).resolve(self.defaults)

    def steps(self, settings: CraftingSettings, options: BaseModel) -> int:
        """Optimiser steps the method takes (0 for methods that optimise nothing)."""
        if self.progress is not None:
            return self.progress(settings, options)
        return (settings.steps or 0) * (settings.restarts or 1) if "steps" in self.defaults else 0

    def __call__(self, task: PoisonTask) -> Poison:
        """Validate and resolve ``task`` (options, settings, needs), then run the method."""
        options = self.make_options(task.options)
        settings = self.settings(task.settings)
        models = list(task.models)
        if Needs.CRAFTING_MODELS in self.needs and not models:
            raise ConfigError(f"{self.name} needs at least one pretrained crafting model (task.models)")
        if Needs.FRESH_MODEL in self.needs and len(models) != 1:
            raise ConfigError(f"{self.name} trains exactly one fresh surrogate model, got {len(models)}")
        if self.model_count is not None and len(models) != self.model_count:
            raise ConfigError(f"{self.name} takes exactly {self.model_count} crafting model(s), got {len(models)}")
        if Needs.TARGET in self.needs and task.target is None:
            raise ConfigError(f"{self.name} is a targeted attack and needs task.target")
        if self.check_data is not None:
            self.check_data(options, task.num_classes)
        return self.fn(replace(task, options=options, settings=settings, models=models))


class PoisonerRegistry:
    """Poisoners by (family, name); lookups of unknown names list the valid ones."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], PoisonerEntry] = {}

    def add(self, entry: PoisonerEntry) -> None:
        key = (entry.family, entry.name)
        if entry.family not in FAMILIES:
            raise ValueError(f"unknown poisoning family {entry.family!r}; valid: {', '.join(FAMILIES)}")
        if key in self._items:
            raise ValueError(f"{entry.family} poisoner {entry.name!r} registered twice")
        unknown = sorted(set(entry.defaults) - set(SETTINGS))
        if unknown:
            raise ValueError(f"{entry.name}: defaults name {unknown}, which are not crafting settings")
        self._items[key] = entry

    def get(self, name: str, *, family: Family | None = None) -> PoisonerEntry:
        """The entry ``name`` of ``family`` (any family when the name is unique)."""
        hits = [e for (f, n), e in self._items.items() if n == name and family in (None, f)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ConfigError(f"{name!r} is a poisoner of families {sorted(e.family for e in hits)}; pass family=")
        what = f"{family} poisoning method" if family else "poisoning method"
        raise ConfigError(f"unknown {what} {name!r}; valid methods: {', '.join(self.names(family))}")

    def names(self, family: Family | None = None) -> list[str]:
        return sorted({n for (f, n) in self._items if family in (None, f)})

    def entries(self, family: Family | None = None) -> list[PoisonerEntry]:
        return [self._items[k] for k in sorted(self._items) if family in (None, k[0])]

    def __contains__(self, name: object) -> bool:
        return any(n == name for (_, n) in self._items)

    def __iter__(self) -> Iterator[PoisonerEntry]:
        return iter(self.entries())


POISONERS = PoisonerRegistry()
"""Every poisoner of every family (registered on import of :mod:`mlaudit.attacks.poisoning`)."""


def register_poisoner(name: str, *, family: Family, needs: Needs, options: type[BaseModel] = NoOptions,
                      defaults: Mapping[str, Any] | None = None, acts_on: Literal["data", "model"] = "data",
                      check_model: Callable[[nn.Module], object] | None = None,
                      check_data: Callable[[Any, int], object] | None = None, model_count: int | None = None,
                      progress: Callable[[CraftingSettings, Any], int] | None = None
                      ) -> Callable[[Poisoner], Poisoner]:
    """Decorator registering ``fn(task) -> Poison`` in :data:`POISONERS` (see :class:`PoisonerEntry`)."""

    def deco(fn: Poisoner) -> Poisoner:
        doc = (getattr(fn, "__doc__", None) or "").strip().split("\n")[0]
        POISONERS.add(PoisonerEntry(name, family, fn, needs, options, dict(defaults or {}), acts_on, check_model,
                                    check_data, model_count, progress, doc))
        return fn

    return deco
