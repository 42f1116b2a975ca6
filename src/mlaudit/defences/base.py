"""Filtering defences against poisoning: one registry, one call shape.

    removed = FILTERS.get("spectral")(features, labels, rate=0.1)      # bool [N]

``features`` float [N, D] are the training rows in a model's feature space (the penultimate layer of a
model trained on the poisoned set: :func:`training_features`), ``labels`` int64 [N] their training
labels as the defender sees them (poisoned labels included). A filter scores every row and, at
``rate``, removes the ``round(rate * n_c)`` highest-scoring rows of every class c (:func:`remove_top`:
the per-class filtering of seed 002's Table 1.4 and of Tran et al.). Methods whose paper has its own
rule (activation clustering's small cluster, deep kNN's plurality vote) apply it when ``rate`` is None.
Each method's options are a pydantic model validated once (:meth:`FilterEntry.make_options`).

:func:`removal_summary` compares what a filter removed with random filtering at the same per-class
counts (:func:`mlaudit.stats.random_removal`: expected poisons removed and the chance of doing at
least as well at random).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from ..config import format_validation_error
from ..data.view import DataView
from ..errors import ConfigError
from ..query import features_batched
from ..registry import Registry
from ..stats import random_removal


class NoFilterOptions(BaseModel):
    """A filter without options of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class FilterEntry:
    """A registered filtering defence: ``fn(features, labels, *, rate, **options) -> removed bool [N]``,
    the paper it follows, its ``options`` model and whether it has a rule of its own for ``rate=None``."""

    name: str
    fn: Callable[..., Tensor]
    paper: str
    options: type[BaseModel]
    rate_optional: bool

    def make_options(self, raw: Mapping[str, Any] | BaseModel | None = None, *, where: str = "options") -> BaseModel:
        """The method's options from a mapping (or a model), validated; errors name ``<where>.<field>``."""
        if isinstance(raw, self.options):
            return raw
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        try:
            return self.options.model_validate(dict(raw or {}))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix=where, model=self.options)) from None

    def __call__(self, features: Tensor, labels: Tensor, *, rate: float | None, **options: Any) -> Tensor:
        if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
            raise ConfigError(f"a filter takes features [N, D] and labels [N], got {list(features.shape)} and "
                              f"{list(labels.shape)}")
        if rate is None and not self.rate_optional:
            raise ConfigError(f"filter {self.name} needs a rate (the fraction of each class removed, 0 < rate < 1)")
        if rate is not None and not 0.0 < float(rate) < 1.0:
            raise ConfigError(f"rate must lie in (0, 1) (the fraction of each class removed), got {rate!r}")
        opts = self.make_options(options)
        removed = self.fn(features, labels.to(features.device), rate=rate, **opts.model_dump())
        return removed.cpu()


FILTERS: Registry[FilterEntry] = Registry("filtering defence")


def register_filter(name: str, *, paper: str, options: type[BaseModel] = NoFilterOptions,
                    rate_optional: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering ``fn(features, labels, *, rate, **options) -> removed bool [N]`` as filter ``name``."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        FILTERS.register(name)(FilterEntry(name, fn, paper, options, rate_optional))
        return fn

    return deco


def class_quota(labels: Tensor, rate: float) -> dict[int, int]:
    """Rows removed per class at ``rate``: ``floor(rate * n_c + 1/2)`` of the n_c rows of class c."""
    classes, counts = torch.unique(labels.cpu(), return_counts=True)
    return {int(c): int(rate * int(n) + 0.5) for c, n in zip(classes, counts, strict=True)}


def remove_top(scores: Tensor, labels: Tensor, rate: float, *, tiebreak: Tensor | None = None) -> Tensor:
    """bool [N]: in every class, the :func:`class_quota` rows of highest ``scores`` (equal scores: higher
    ``tiebreak`` first, then the lower row index)."""
    scores, labels = scores.detach().cpu().double(), labels.cpu()
    order = torch.arange(len(scores))
    if tiebreak is not None:
        order = order[torch.sort(tiebreak.detach().cpu().double()[order], descending=True, stable=True).indices]
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    removed = torch.zeros(len(scores), dtype=torch.bool)
    for c, q in class_quota(labels, rate).items():
        mine = order[labels[order] == c]
        removed[mine[:q]] = True
    return removed


def per_class(labels: Tensor) -> list[Tensor]:
    """Row indices of each class present in ``labels``, in class order."""
    return [(labels == c).nonzero().squeeze(1) for c in torch.unique(labels)]


def training_features(model: nn.Module, view: DataView, *, device: torch.device | str | None = None,
                      batch_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """The training set ``view`` as the defender sees it, in ``model``'s penultimate feature space:
    (kept virtual indices int64 [M], features float32 [M, D] on the CPU, training labels int64 [M])."""
    kept = view.kept_indices()
    x, y = view.gather(kept, validate=False)
    return kept.cpu(), features_batched(model, x, batch_size=batch_size, device=device), y.cpu()


def removal_summary(removed: Tensor, poison: Tensor, labels: Tensor) -> dict[str, Any]:
    """What a filter removed (bool [N]) among the poisons (bool [N]), with the classes ``labels`` [N] it
    filtered in, next to random filtering that removes as many rows from each class: ``poisons``,
    ``removed``, ``poisons_removed``, ``clean_removed``, ``random_poisons_removed`` (expected),
    ``random_clean_removed`` (expected) and ``p_value`` (the chance that random filtering removes at least
    ``poisons_removed`` poisons)."""
    removed, poison, labels = removed.cpu().bool(), poison.cpu().bool(), labels.cpu()
    classes = torch.unique(labels)
    sizes = [int((labels == c).sum()) for c in classes]
    marked = [int((poison & (labels == c)).sum()) for c in classes]
    draws = [int((removed & (labels == c)).sum()) for c in classes]
    hit = int((removed & poison).sum())
    rnd = random_removal(sizes, marked, draws, observed=hit)
    total = int(removed.sum())
    return {"poisons": int(poison.sum()), "removed": total, "poisons_removed": hit, "clean_removed": total - hit,
            "random_poisons_removed": rnd["expected"], "random_clean_removed": total - rnd["expected"],
            "p_value": rnd["p_value"]}
