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


QUERY_SPLITS = ("train", "test")


@dataclass(frozen=True)
class QueryPlan:
    """Logits every trained model reports before it leaves the device (:attr:`FactoryJob.queries`).

    A membership pool needs each model's logits on the pool examples (and augmented copies, LiRA's
    queries); asking for them here computes them on the trained stack while it is still on the device,
    on the device-resident data, instead of saving M checkpoints and loading them back to query.

    ``split`` is ``train`` or ``test`` (the base rows of the job's data, never a view's inserted
    ones), ``rows`` int64 [N] indices into it (None: the whole split), ``queries`` the query names
    of :mod:`mlaudit.query.logits` (A of them), ``bf16`` autocast on CUDA. The result is
    float32 [N, A, C] on the CPU per model, in :attr:`TrainedModel.outputs` under the plan's name.
    """

    split: str = "train"
    rows: Tensor | None = None
    queries: tuple[str, ...] = ("identity",)
    bf16: bool = False

    def __post_init__(self) -> None:
        from ..query.logits import parse_queries  # the query module imports training code, not the factory

        if self.split not in QUERY_SPLITS:
            raise ConfigError(f"QueryPlan.split must be one of {list(QUERY_SPLITS)}, got {self.split!r}")
        if self.rows is not None and (self.rows.dtype != torch.int64 or self.rows.dim() != 1 or self.rows.numel() == 0):
            raise ConfigError(f"QueryPlan.rows must be a non-empty 1-D int64 tensor of row indices, got "
                              f"{self.rows.dtype} {list(self.rows.shape)}")
        parse_queries(self.queries)

    def check(self, data: DataBundle) -> None:
        """Raise :class:`ConfigError` when ``rows`` fall outside the split of ``data`` (before any training)."""
        n = len(data.train if self.split == "train" else data.test)
        if self.rows is not None and (int(self.rows.min()) < 0 or int(self.rows.max()) >= n):
            raise ConfigError(f"QueryPlan.rows holds indices outside [0, {n}) of the {self.split} split")

    def inputs(self, data: DataBundle) -> Tensor:
        """The plan's inputs [N, *shape] from ``data`` (on the data's device)."""
        split = data.train if self.split == "train" else data.test
        return split.x if self.rows is None else split.x[self.rows.to(split.x.device)]


@dataclass
class TrainedModel:
    """A finished model: CPU ``state_dict``, ``metrics`` (test accuracy/loss, final train loss),
    optimisation ``steps``, ``wall_s`` = this model's share of its chunk's wall time, and ``outputs``:
    the logits float32 [N, A, C] of each of the job's :attr:`FactoryJob.queries`, by name."""

    trial_id: str
    seed: int
    state_dict: dict[str, Tensor]
    metrics: dict[str, float]
    steps: int
    wall_s: float
    tags: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)


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
    ``queries`` names the logits each trained model reports before it leaves the device (:class:`QueryPlan`).
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
    queries: dict[str, QueryPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data is None and self.data_spec is None:
            raise ConfigError("FactoryJob needs data (a loaded DataBundle) or data_spec (to load it)")
        for name, value, low in (("max_chunk", self.max_chunk, 1), ("fake_memory_models", self.fake_memory_models, 0)):
            if value is not None and value < low:
                raise ConfigError(f"FactoryJob.{name} must be None or >= {low}, got {value}")
        for name, plan in self.queries.items():
            if not isinstance(plan, QueryPlan):
                raise ConfigError(f"FactoryJob.queries[{name!r}] must be a QueryPlan, got {type(plan).__name__}")
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
