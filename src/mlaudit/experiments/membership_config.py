"""The ``membership-inference`` kind's config (see :mod:`.membership` for the protocol and
docs/membership.md for every field): the pool, the attacks and their options, the queries, Truth
Serum, the external target; plus the pieces of the protocol that only read the config (the pool's
rows, the queries for the data, each attack's shadow requirements)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ..attacks.membership import ATTACKS
from ..data.base import DataBundle
from ..errors import ConfigError
from ..query import parse_query
from ..train.loop import resolve_augment
from .base import ExperimentConfig

FIXED_VARIANCE_BELOW = 64
"""Pools with fewer models fit LiRA with one variance per query (Carlini et al. 2022 do so below 64 shadows)."""


class PoolConfig(BaseModel):
    """``models`` M trained on ``data`` (the training split; ``size`` subsamples N examples from it
    with the seed), each example IN for exactly ``int(keep * models)`` of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: int = Field(16, ge=2, le=4096)
    keep: float = Field(0.5, gt=0.0, lt=1.0)
    data: Literal["train"] = "train"
    size: int | None = Field(None, ge=2)
    save_models: bool = False
    """Keep every pool model's weights (``artifacts/models``, with sha256). Off by default: each model
    reports its logits on the pool (and the population, and the test split for memorization) before it
    leaves the device, so nothing needs the weights; a label-only attack's oracle does, and saves them anyway."""
    query_precision: Literal["float32", "bf16"] = "float32"
    """Precision of the pool models' queries on CUDA (pool, population and test logits): ``bf16`` runs them under
    bfloat16 autocast, as training and evaluation do with ``recipe.precision: auto``; the logits stay float32
    tensors. Ignored on the CPU (always float32)."""
    accuracy: Literal["recipe", "test-logits"] = "recipe"
    """How each pool model's test accuracy is measured: ``recipe`` runs the recipe's own evaluation on the test split
    (with its test-time augmentation, ``recipe.tta``: 6 forward passes per image for ``airbench-muon``);
    ``test-logits`` reads it off the identity-view test logits every model reports anyway (the ``test`` query plan,
    also memorization's), so no evaluation pass runs: no test-time augmentation, and for a 256-model pool of the
    airbench network 60k fewer forward passes per model (docs/membership.md)."""

    @model_validator(mode="after")
    def _counts(self) -> PoolConfig:
        k = int(self.keep * self.models)
        if not 1 <= k <= self.models - 1:
            raise ValueError(f"int(keep * models) = int({self.keep} * {self.models}) = {k} models would hold each "
                             f"example; it must lie in [1, {self.models - 1}] so that every example has IN and OUT "
                             "models: raise models or move keep towards 0.5")
        return self

    @property
    def in_per_example(self) -> int:
        return int(self.keep * self.models)


class TruthSerumConfig(BaseModel):
    """``targets`` pool examples, each poisoned with ``copies`` inserted copies carrying a wrong label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: int = Field(..., ge=1, le=1_000_000)
    copies: int = Field(8, ge=1, le=10_000)


class TargetConfig(BaseModel):
    """An external model to audit: a state_dict ``checkpoint`` of the config's model (verified against
    ``sha256`` when given) and optionally ``members``, a bool mask over the training split (.npy or .pt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    members: Path | None = None


class PopulationConfig(BaseModel):
    """RMIA's population z (Zarifzadeh et al. 2024): examples no pool model trained on. ``data: test``
    takes the test split; ``data: train`` the training rows outside the pool (``pool.size`` must leave
    some), or exactly ``indices`` (training-split rows, which must not overlap the pool). ``size``
    draws that many of them with the seed (None: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Literal["test", "train"] = "test"
    size: int | None = Field(None, ge=1)
    indices: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _indices(self) -> PopulationConfig:
        if self.indices is not None and self.data != "train":
            raise ValueError("population.indices are training-split rows: set population.data: train with them")
        if self.indices is not None and (not self.indices or min(self.indices) < 0):
            raise ValueError("population.indices must be a non-empty list of training-split rows (>= 0)")
        return self


class MembershipConfig(ExperimentConfig):
    """See the module docstring and docs/membership.md for every field."""

    kind: Literal["membership-inference"] = "membership-inference"
    pool: PoolConfig = PoolConfig()
    attacks: tuple[str, ...] = ("loss", "shokri", "lira-online", "lira-offline")
    attack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    queries: tuple[str, ...] | Literal["auto"] = "auto"
    fpr_targets: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    population: PopulationConfig = PopulationConfig()
    n_boot: int = Field(200, ge=0, le=100_000)
    truth_serum: TruthSerumConfig | None = None
    memorization: bool = True
    target: TargetConfig | None = None

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"give at least one attack; valid attacks: {', '.join(ATTACKS.names())}")
        if len(set(v)) != len(v):
            raise ValueError(f"attacks must not repeat a name, got {list(v)}")
        for name in v:
            ATTACKS.get(name)  # ConfigError listing the valid names
        return v

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if v == "auto":
            return v
        if "identity" not in v or len(set(v)) != len(v):
            raise ValueError(f"queries must include 'identity' and not repeat a name, got {list(v)}")
        for q in v:
            parse_query(q)
        return v

    @field_validator("fpr_targets")
    @classmethod
    def _fprs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= t <= 1.0 for t in v):
            raise ValueError(f"fpr_targets must be a non-empty list of rates in [0, 1] (0: no false positive), "
                             f"got {list(v)}")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _options(self) -> MembershipConfig:
        extra = sorted(set(self.attack_options) - set(self.attacks))
        if extra:
            raise ValueError(f"attack_options names {extra}, which are not in attacks {list(self.attacks)}")
        for name, opts in self.attack_options.items():
            fn = ATTACKS.get(name)
            try:
                inspect.signature(fn).bind(None, 0, **opts)
            except TypeError:
                allowed = list(inspect.signature(fn).parameters)[2:]
                raise ValueError(f"attack_options.{name} = {opts} has options {name} does not take; it takes "
                                 f"{', '.join(allowed) or 'none'}") from None
        return self

    def options_for(self, name: str) -> dict[str, Any]:
        """``attack_options[name]``; an attack's ``seed`` defaults to the config's, LiRA's ``variance`` to
        ``fixed`` for pools of fewer than :data:`FIXED_VARIANCE_BELOW` models (Carlini et al. 2022,
        Sec. VI-A), else ``per-example``."""
        opts = dict(self.attack_options.get(name, {}))
        if "seed" in inspect.signature(ATTACKS.get(name)).parameters:
            opts.setdefault("seed", self.seed)
        if name in ("lira-online", "lira-offline"):
            opts.setdefault("variance", "fixed" if self.pool.models < FIXED_VARIANCE_BELOW else "per-example")
        return opts

    @property
    def resolved_attack_options(self) -> dict[str, dict[str, Any]]:
        return {name: self.options_for(name) for name in self.attacks}

    @property
    def uses_test_logits(self) -> bool:
        """Whether the pool models report their test-split logits: memorization reads them, and so does the pool's
        accuracy under ``pool.accuracy: test-logits``."""
        return self.memorization or self.pool.accuracy == "test-logits"


def pool_indices(config: MembershipConfig, n_train: int) -> Tensor:
    """int64 [N] ascending: the training-split rows that form the data pool."""
    size = config.pool.size
    if size is None or size == n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0]))
    return torch.randperm(n_train, generator=g)[:size].sort().values


def resolve_queries(config: MembershipConfig, data: DataBundle) -> tuple[str, ...]:
    """The queries used: as configured, or for ``auto`` ``identity`` plus ``flip`` when training
    mirrors the images (the LiRA queries mirror the training augmentation; digits are not flipped
    in training, so they get ``identity`` only). Non-identity queries need image data."""
    if config.queries != "auto":
        if not data.is_image and config.queries != ("identity",):
            raise ConfigError(f"queries {list(config.queries)} augment images, but {data.name} holds vectors of "
                              f"shape {list(data.input_shape)}; use queries: [identity] (or auto)")
        return tuple(config.queries)
    aug = resolve_augment(config.recipe, data.name, data.input_shape)
    return ("identity", "flip") if aug is not None and aug.flip else ("identity",)


def attack_requirements(name: str, options: dict[str, Any]) -> tuple[int, int]:
    """Fewest (IN, OUT) leave-one-out reference models per example an attack needs under its options
    (the registry entry's ``requirements``; (0, 0) for attacks that use the shadows in aggregate)."""
    return ATTACKS.get(name).required(**options)


def uses_population(config: MembershipConfig) -> bool:
    """Whether an attack of the config scores against an external population (RMIA, unless pool-out)."""
    return any("population" in inspect.signature(ATTACKS.get(n)).parameters
               and config.options_for(n).get("population", "auto") != "pool-out" for n in config.attacks)


def population_rows(config: MembershipConfig, data: DataBundle, pool_rows: Tensor) -> tuple[Tensor, Tensor]:
    """RMIA's population (x [Z, *shape], y [Z]) from ``config.population``; raises ConfigError naming
    the field when it overlaps the pool (the targets) or is empty."""
    name, rows = population_index(config, data, pool_rows)
    split = data.test if name == "test" else data.train
    return split.x[rows], split.y[rows]


def population_index(config: MembershipConfig, data: DataBundle, pool_rows: Tensor) -> tuple[str, Tensor]:
    """Where RMIA's population lies: the split (``train`` or ``test``) and its rows int64 [Z] (see
    :func:`population_rows`)."""
    pc = config.population
    if pc.data == "test":
        split_name, rows = "test", torch.arange(len(data.test))
    else:
        split_name, n_train = "train", len(data.train)
        outside = torch.ones(n_train, dtype=torch.bool)
        outside[pool_rows] = False
        if pc.indices is not None:
            rows = torch.tensor(pc.indices, dtype=torch.long)
            if int(rows.max()) >= n_train:
                raise ConfigError(f"population.indices has row {int(rows.max())}, beyond the {n_train} training rows")
            hit = rows[~outside[rows]]
            if hit.numel():
                raise ConfigError(f"population.indices overlaps the pool (the target examples) in {hit.numel()} rows "
                                  f"(e.g. {hit[:5].tolist()}); allowed: training rows outside the pool ({int(outside.sum())}"
                                  " of them) or population.data: test")
        else:
            rows = torch.nonzero(outside).flatten()
            if rows.numel() == 0:
                raise ConfigError("population.data: train needs training rows outside the pool, but the pool is the whole "
                                  f"training split ({n_train} rows); set pool.size below {n_train} or use "
                                  "population.data: test")
    if pc.size is not None and pc.size < rows.numel():
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, 2]).generate_state(1)[0]))
        rows = rows[torch.randperm(rows.numel(), generator=g)[:pc.size]].sort().values
    return split_name, rows
