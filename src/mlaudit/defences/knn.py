"""Deep kNN label consistency (Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning
Attacks", ECCV workshops 2020): a training row whose label is not the plurality label of its k nearest
neighbours in the feature space of a model trained on the poisoned set is removed (``rate: None``; a row
whose label ties with the plurality is kept). Feature-collision poisons sit among the target class's
rows with the base class's label, so their neighbours outvote them. With a ``rate``, every class loses
its ``rate`` fraction of rows with the most neighbours of another label (ties: the larger mean distance
to the neighbours first)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..errors import ConfigError
from .base import register_filter, remove_top

CHUNK = 2048
"""Rows whose neighbours are searched at once (a [CHUNK, N] distance matrix)."""


class KNNOptions(BaseModel):
    """``k``: neighbours of each row (the row itself excluded); Peri et al. tune it to the number of poisons."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(10, ge=2, le=100_000)


def neighbour_votes(features: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(votes int64 [N, C]: labels of each row's k nearest other rows (l2), mean distance [N] to them)."""
    n = len(features)
    if k >= n:
        raise ConfigError(f"k = {k} neighbours needs more than k training rows, got {n}")
    c = int(labels.max()) + 1
    f = features.float()
    votes = torch.zeros(n, c, dtype=torch.int64, device=f.device)
    mean_d = torch.zeros(n, dtype=torch.float64, device=f.device)
    for i in range(0, n, CHUNK):
        rows = torch.arange(i, min(i + CHUNK, n), device=f.device)
        d = torch.cdist(f[rows], f)
        d[torch.arange(len(rows), device=f.device), rows] = float("inf")  # not its own neighbour
        near = d.topk(k, largest=False)
        votes[rows] = torch.nn.functional.one_hot(labels[near.indices], c).sum(1)
        mean_d[rows] = near.values.double().mean(1)
    return votes, mean_d


@register_filter("knn", paper="Peri et al. 2020 (deep k-NN)", options=KNNOptions, rate_optional=True)
def knn(features: Tensor, labels: Tensor, *, rate: float | None, k: int) -> Tensor:
    """Remove rows whose label loses the plurality vote of their k nearest neighbours (``rate: None``), or
    per class the ``rate`` fraction with the fewest neighbours of their own label."""
    votes, mean_d = neighbour_votes(features, labels, k)
    own = votes.gather(1, labels[:, None]).squeeze(1)
    if rate is None:
        return (own < votes.max(1).values).cpu()
    return remove_top((k - own).double(), labels, rate, tiebreak=mean_d)
