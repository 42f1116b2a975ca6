"""What the factory is asked to do (:class:`FactoryJob`, :class:`TrialSpec`) and what it returns
(:class:`TrainedModel`). All of it pickles, so jobs travel to process pools and Ray workers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..data.base import DataBundle
from ..data.registry import DatasetSpec
from ..data.view import DataView
from ..errors import ConfigError
from ..models.registry import ModelSpec
from ..train.hooks import DPStepHooks
from ..train.recipe import Recipe


@dataclass(frozen=True)
class TrialSpec:
    """One model to train.

    ``seed`` fixes its initial weights, data order and augmentation; ``mask`` (bool [N_total]) is the
    subset of (virtual) training indices it may see; ``view`` names an entry of
    :attr:`FactoryJob.views` (a poisoned / relabelled / extended training set); ``tags`` are copied
    into the result (scenario ids, IN/OUT roles, ...).
    """

    trial_id: str
    seed: int
    mask: Tensor | None = None
    view: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    hooks: DPStepHooks | None = None
    """Hooks of its DP-SGD step (the DP audit's gradient canary or broken fixture)."""


@dataclass
class TrainedModel:
    """A finished model: CPU ``state_dict``, ``metrics`` (test accuracy/loss, final train loss),
    optimisation ``steps``, and ``wall_s`` = this model's share of its chunk's wall time."""

    trial_id: str
    seed: int
    state_dict: dict[str, Tensor]
    metrics: dict[str, float]
    steps: int
    wall_s: float
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FactoryJob:
    """Everything needed to train a list of trials, anywhere.

    ``data`` is the loaded bundle; ``data_spec`` (when the data came from a registered source) lets
    remote workers reload it instead of receiving the tensors. ``max_chunk`` caps how many models
    train together (None = as many as fit in memory); ``batched=False`` trains one at a time.
    ``strategy`` picks the stack layout (``auto``, ``vmap``, ``loop``; :mod:`mlaudit.train.stacked`).
    ``fake_memory_models`` simulates a device that holds at most that many models (tests of the
    out-of-memory back-off; 0 = not even one fits). Trial ids must be unique, views named by trials
    must exist and masks must be 1-D bool (checked here; mask lengths are checked against the data
    when training starts). ``trainer`` names the user's training function (None: mlaudit's loop).
    """

    model: ModelSpec
    recipe: Recipe
    data: DataBundle | None
    trials: tuple[TrialSpec, ...]
    data_spec: DatasetSpec | None = None
    views: dict[str, DataView] = field(default_factory=dict)
    device: str = "cpu"
    batched: bool = True
    max_chunk: int | None = None
    evaluate: bool = True
    fake_memory_models: int | None = None
    strategy: str = "auto"
    trainer: str | None = None
    """The user's training function (``package.module:function``; :mod:`mlaudit.train.trainer`), or
    None for mlaudit's own loop. A user trainer trains one trial at a time."""

    def __post_init__(self) -> None:
        if self.data is None and self.data_spec is None:
            raise ConfigError("FactoryJob needs data (a loaded DataBundle) or data_spec (to load it)")
        for name, value, low in (("max_chunk", self.max_chunk, 1), ("fake_memory_models", self.fake_memory_models, 0)):
            if value is not None and value < low:
                raise ConfigError(f"FactoryJob.{name} must be None or >= {low}, got {value}")
        seen: set[str] = set()
        for t in self.trials:
            if t.trial_id in seen:
                raise ConfigError(f"trial id {t.trial_id!r} appears more than once; trial ids must be unique")
            seen.add(t.trial_id)
            if t.view is not None and t.view not in self.views:
                raise ConfigError(f"trial {t.trial_id!r} names view {t.view!r}, but the job's views are "
                                  f"{sorted(self.views)}; add it to FactoryJob.views")
            if t.mask is not None and (t.mask.dtype != torch.bool or t.mask.dim() != 1):
                raise ConfigError(f"trial {t.trial_id!r}: mask must be a 1-D bool tensor [N_total], got "
                                  f"{t.mask.dtype} {list(t.mask.shape)}; turn indices into a mask with "
                                  "torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True)")

    def with_trials(self, trials: list[TrialSpec] | tuple[TrialSpec, ...]) -> FactoryJob:
        return replace(self, trials=tuple(trials))

    def for_remote(self) -> FactoryJob:
        """A copy to send to another process: drops the tensors when the spec can reload them."""
        return replace(self, data=None) if self.data_spec is not None else self

    def slim_views(self) -> FactoryJob:
        """Keep only the views this job's trials use."""
        used = {t.view for t in self.trials if t.view is not None}
        return replace(self, views={k: v for k, v in self.views.items() if k in used})


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
