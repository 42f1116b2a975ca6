"""Experiment configs and the registry of experiment kinds.

Every experiment is a YAML mapping with a ``kind``; the kind's pydantic model validates the rest.
The common fields (``name``, ``dataset``, ``model``, ``recipe``, ``seed``, ``factory``) accept the
short forms of the contract (``dataset: digits``) or mappings (``dataset: {name: cifar10, root: /data}``).
A kind registers ``@register_experiment("name", config=ConfigModel)`` on a function
``run(config, ctx) -> ExperimentOutput``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import format_validation_error
from ..data.registry import DatasetSpec, resolve_dataset_spec
from ..errors import ConfigError, unknown_name
from ..models.registry import ModelSpec, resolve_model_spec
from ..train.recipe import Recipe, resolve_recipe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..report.html import ReportTable
    from .context import RunContext


class FactoryOptions(BaseModel):
    """How the factory trains this experiment's models: ``batched`` (K models at once) and
    ``max_chunk`` (cap on K; None = as many as fit in memory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batched: bool = True
    max_chunk: int | None = Field(None, ge=1, le=4096)


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

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> Any:
        return resolve_dataset_spec(v) if isinstance(v, (str, DatasetSpec)) else v

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return resolve_model_spec(v) if isinstance(v, (str, ModelSpec)) else v

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            return resolve_recipe(v)
        return v

    @property
    def display_name(self) -> str:
        return self.name or f"{self.kind}-{self.dataset.name}-{self.model.name}"

    def trial_seed(self, index: int, *, stream: int = 0) -> int:
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
    name: str
    config: type[ExperimentConfig]
    run: Callable[[Any, RunContext], ExperimentOutput]
    description: str


_KINDS: dict[str, ExperimentKind] = {}


def register_experiment(name: str, *, config: type[ExperimentConfig]) -> Callable[[Callable], Callable]:
    def deco(fn: Callable[[Any, RunContext], ExperimentOutput]) -> Callable:
        if name in _KINDS:
            raise ValueError(f"experiment kind {name!r} registered twice")
        _KINDS[name] = ExperimentKind(name, config, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def experiment_kinds() -> dict[str, ExperimentKind]:
    from . import train  # noqa: F401  (registers the built-in kinds)

    return dict(_KINDS)


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into its kind's config; ConfigError names field, value and rule."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    kinds = experiment_kinds()
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(f"config has no 'kind'; valid kinds: {', '.join(sorted(kinds))}")
    if kind not in kinds:
        raise unknown_name("experiment kind", kind, list(kinds))
    try:
        return kinds[kind].config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in) as plain YAML/JSON-able data."""
    return config.model_dump(mode="json")
