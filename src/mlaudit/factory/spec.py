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
from ..models.registry import ModelSpec
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
    ``fake_memory_models`` simulates a device that holds at most that many models (tests of the
    out-of-memory back-off).
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
