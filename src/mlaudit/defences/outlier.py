"""Feature-space outlier removal per class: the rows farthest from their class centroid in the feature
space of a model trained on the poisoned set. The "outlier detection" defence of seed 002 (section 1.5.4,
Table 1.4; its Figure 1.5a plots this distance to the base-class centroid), which finds Witches' Brew
poisons only marginally better than random filtering."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import per_class, register_filter, remove_top


@register_filter("outlier", paper="seed 002 section 1.5.4, Table 1.4 (distance to the class centroid)")
def outlier(features: Tensor, labels: Tensor, *, rate: float) -> Tensor:
    """Remove, per class, the ``rate`` fraction of rows farthest (l2) from the class's mean feature."""
    f = features.double()
    scores = torch.zeros(len(f), dtype=torch.float64, device=f.device)
    for rows in per_class(labels):
        scores[rows] = (f[rows] - f[rows].mean(0)).norm(dim=1)
    return remove_top(scores, labels, rate)
