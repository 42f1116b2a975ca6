"""Experiment configs and the registry of experiment kinds.

Every experiment is a YAML mapping with a ``kind``; the kind's pydantic model validates the rest.
The common fields (``name``, ``dataset``, ``model``, ``recipe``, ``seed``, ``factory``, ``trainer``)
accept the short forms of the contract (``dataset: digits``), mappings (``dataset: {name: cifar10,
root: /data}``) or the user's own code as import strings (``model: mypkg.nets:Net``, ``dataset:
mypkg.data:load``, ``trainer: mypkg.train:fit``; see docs/bring_your_own.md).
A kind registers ``@register_experiment("name", config=ConfigModel)`` on a function
``run(config, ctx) -> ExperimentOutput``; every error in a config is reported as one
:class:`~mlaudit.errors.ConfigError` naming the fields, values and what is allowed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import format_validation_error
from ..data.base import DataBundle
from ..data.registry import DatasetSpec, resolve_dataset_spec
from ..data.view import DataView
from ..errors import ConfigError
from ..factory.spec import FactoryJob, TrialSpec
from ..imports import is_import_string
from ..models.registry import ModelSpec, resolve_model_spec
from ..registry import Registry
from ..train.recipe import Recipe, resolve_recipe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..report.html import ReportTable
    from .context import RunContext


class Stream(enum.IntEnum):
    """Named seed streams: ``config.trial_seed(i, stream=Stream.VICTIMS)``. The numbers are part of
    every published result (they fix which seed each trial gets): never renumber them."""

    MODELS = 0
    """A kind's own models (``train`` trials, the membership pool)."""
    DP_IN = 1
    """dp-audit models trained on D' (with the canary)."""
    DP_OUT = 2
    """dp-audit models trained on D."""
    CRAFTERS = 101
    """Factory-trained crafting models of the poisoning kinds."""
    VICTIMS = 202
    """Victims of the poisoning kinds (the same seed in every view: paired comparisons)."""
    ATTACK = 303
    """An attack's own randomness (crafting restarts and augmentation, poison sampling, random labels)."""
    SURROGATE = 304
    """Availability attacks' surrogate models (error-minimizing noise)."""


class FactoryOptions(BaseModel):
    """How the factory trains this experiment's models: ``batched`` (K models at once),
    ``max_chunk`` (cap on K; None = as many as fit in memory) and ``strategy`` (stack layout:
    ``vmap``, ``loop`` or ``auto``: on a GPU with K > 1 both layouts are timed on a few steps and
    the faster kept; otherwise loop for conv nets on CUDA, vmap elsewhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batched: bool = True
    max_chunk: int | None = Field(None, ge=1, le=4096)
    strategy: Literal["auto", "vmap", "loop"] = "auto"


def model_value(v: Any) -> Any:
    """Before-validator of every model field: a name (zoo or import string) or a ModelSpec becomes a
    ModelSpec; a mapping is left to pydantic (its errors then name ``<field>.<key>``)."""
    return resolve_model_spec(v) if isinstance(v, (str, ModelSpec)) else v


def recipe_value(v: Any, *, where: str) -> Any:
    """Before-validator of every recipe field: a preset name or a mapping becomes a Recipe; errors name
    ``<where>.<field>`` with the allowed ranges."""
    if not isinstance(v, (str, dict)):
        return v
    try:
        return resolve_recipe(v)
    except ConfigError as e:
        # resolve_recipe formats its pydantic error without field ranges; format it again with them
        inner = e.__context__
        if isinstance(inner, ValidationError) and inner.title == Recipe.__name__:
            raise ConfigError(format_validation_error(inner, prefix=where, model=Recipe)) from None
        raise
    except (TypeError, ArithmeticError) as e:  # e.g. epochs: "ten" while scaling a preset's milestones
        raise ValueError(f"{where} fields have invalid types or values ({e}); {where}.epochs must be an "
                         "integer >= 1") from None


ModelField = Annotated[ModelSpec, BeforeValidator(model_value)]
"""A model field that takes what the config's own ``model`` takes (a name, an import string, a mapping)."""


class ExperimentConfig(BaseModel):
    """Fields shared by every experiment kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str | None = Field(None, max_length=200)
    dataset: DatasetSpec
    model: ModelSpec
    recipe: Recipe
    seed: int = Field(0, ge=0, lt=2**32)
    factory: FactoryOptions = FactoryOptions()
    trainer: str = "mlaudit"
    """``mlaudit`` (the factory) or the user's training function ``package.module:function``
    (:mod:`mlaudit.train.trainer`); it trains every model the kind trains."""

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if v != "mlaudit" and not is_import_string(v):
            raise ValueError(f"trainer must be 'mlaudit' (the factory) or your training function as "
                             f"'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _clipping_fits_layout(self) -> ExperimentConfig:
        dp = self.recipe.dp
        if dp is not None and dp.clipping == "fast" and self.factory.strategy == "vmap":
            raise ValueError("recipe.dp.clipping = 'fast' (book-keeping) runs in the loop layout, but factory.strategy "
                             "= 'vmap' (its steps clip per example); allowed: factory.strategy loop or auto, or "
                             "dp.clipping per-example or auto")
        return self

    @model_validator(mode="after")
    def _trainer_fits_recipe(self) -> ExperimentConfig:
        if self.trainer != "mlaudit" and self.recipe.dp is not None and self.kind != "dp-audit":
            raise ValueError(f"recipe.dp configures mlaudit's own DP-SGD, but trainer is {self.trainer!r} (your "
                             "training function does its own training); drop recipe.dp or use trainer: mlaudit")
        if self.trainer != "mlaudit" and self.recipe.adversarial is not None:
            raise ValueError(f"recipe.adversarial configures mlaudit's own adversarial training, but trainer is "
                             f"{self.trainer!r}; drop recipe.adversarial or use trainer: mlaudit")
        if self.trainer != "mlaudit" and self.recipe.noise_sigma > 0:
            raise ValueError(f"recipe.noise_sigma = {self.recipe.noise_sigma} configures mlaudit's own Gaussian noise "
                             f"training, but trainer is {self.trainer!r} (add the noise in your training function); "
                             "drop recipe.noise_sigma or use trainer: mlaudit")
        return self

    @property
    def sequence_model(self) -> bool:
        """True when this config's model is a sequence model, token ids [N, L] -> next-token logits [N, V, L]
        (the ``federated`` kind's Decepticons attack): the preflight then checks that output shape instead of
        a classifier's [N, classes]."""
        return False

    @property
    def user_trainer(self) -> str | None:
        """The user's training function's import string, or None for the factory."""
        return None if self.trainer == "mlaudit" else self.trainer

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> Any:
        return resolve_dataset_spec(v) if isinstance(v, (str, DatasetSpec)) else v

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return model_value(v)

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, v: Any) -> Any:
        return recipe_value(v, where="recipe")

    @property
    def slug(self) -> str:
        """``display_name`` reduced to a safe file-name component (letters, digits, ``-``, ``_``)."""
        s = re.sub(r"[^A-Za-z0-9_-]+", "-", self.display_name).strip("-") or self.kind
        return s[:80]

    @property
    def display_name(self) -> str:
        return self.name or f"{self.kind}-{self.dataset.name}-{self.model.name}"

    def factory_job(self, data: DataBundle, trials: Sequence[TrialSpec], *, device: str,
                    views: dict[str, DataView] | None = None) -> FactoryJob:
        """The factory job training ``trials`` on ``data`` with this config's model, recipe and
        factory options (the one place every experiment kind builds its jobs)."""
        spec = None if self.dataset.in_memory else self.dataset  # in-memory data travels as tensors
        return FactoryJob(model=self.model, recipe=self.recipe, data=data, data_spec=spec, trials=tuple(trials),
                          views=dict(views or {}), device=device, batched=self.factory.batched,
                          max_chunk=self.factory.max_chunk, strategy=self.factory.strategy, trainer=self.user_trainer)

    def trial_seed(self, index: int, *, stream: int = Stream.MODELS) -> int:
        """Seed of trial ``index``: a SeedSequence child of (seed, stream, index), in [0, 2**31)."""
        return int(np.random.SeedSequence([self.seed, stream, index]).generate_state(1)[0] % 2**31)


@dataclass
class ExperimentOutput:
    """What a kind returns: headline ``metrics`` (with uncertainties), per-trial rows, and report
    extras (tables, figures, notes)."""

    metrics: dict[str, Any]
    trials: list[dict[str, Any]]
    tables: list[ReportTable] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExperimentKind:
    """A registered kind: its config model, its ``run(config, ctx)`` and an optional ``check(config,
    data)`` that the runner calls on the loaded dataset before anything is written (raise
    :class:`ConfigError` for a config that cannot work with that data)."""

    name: str
    config: type[ExperimentConfig]
    run: Callable[[Any, RunContext], ExperimentOutput]
    description: str
    check: Callable[[Any, DataBundle], None] | None = None
    growable: tuple[str, ...] = ()
    """Top-level count fields that may be raised when resuming (``grow=True``): the kind guarantees that
    a finished trial's id, seed and inputs do not depend on them, so a grown run keeps every finished
    trial and trains only the new ones (e.g. targeted-poison's ``scenarios`` and ``victims``)."""


KINDS: Registry[ExperimentKind] = Registry("experiment kind")


def register_experiment(name: str, *, config: type[ExperimentConfig],
                        check: Callable[[Any, DataBundle], None] | None = None,
                        growable: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator registering ``run(config, ctx) -> ExperimentOutput`` as experiment kind ``name``
    (``growable``: see :attr:`ExperimentKind.growable`)."""

    def deco(fn: Callable[[Any, RunContext], ExperimentOutput]) -> Callable:
        KINDS.register(name)(ExperimentKind(name, config, fn, (fn.__doc__ or "").strip().split("\n")[0], check,
                                            growable))
        return fn

    return deco


def _ensure_kinds_loaded() -> None:
    from . import (  # noqa: F401  (kinds)
        availability,
        backdoor,
        certify,
        contrastive,
        defend,
        dp_audit,
        federated,
        indiscriminate,
        membership,
        protect,
        robustness,
        targeted_poison,
        train,
    )


def experiment_kinds() -> dict[str, ExperimentKind]:
    """Every registered experiment kind by name."""
    _ensure_kinds_loaded()
    return {n: KINDS.get(n) for n in KINDS.names()}


def experiment_kind(name: str) -> ExperimentKind:
    """The kind registered as ``name``; a ConfigError listing the valid kinds otherwise."""
    _ensure_kinds_loaded()
    return KINDS.get(name)


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into its kind's config.

    Raises :class:`ConfigError` (never another exception) naming each bad field, the value seen and
    what is allowed (valid names for unknown kinds/datasets/models/recipes, ranges for numbers).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping (key: value lines), got {type(raw).__name__}")
    _ensure_kinds_loaded()
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(f"config has no 'kind'; valid kinds: {', '.join(KINDS.names())}")
    if not isinstance(kind, str):
        raise ConfigError(f"kind must be a name, got {kind!r}; valid kinds: {', '.join(KINDS.names())}")
    cls = experiment_kind(kind).config
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=cls)) from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in) as plain YAML/JSON-able data."""
    return config.model_dump(mode="json")
