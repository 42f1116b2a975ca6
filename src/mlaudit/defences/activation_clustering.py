"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", 2018): per class, reduce the last hidden layer's activations to a few dimensions and split
them into two clusters with k-means; a backdoored class splits into its clean rows and a small cluster of
poisons, so the smaller cluster is removed when it is small. The paper reduces with ICA (to 10
dimensions) and judges clusters by relative size or silhouette; here the reduction is PCA (the top
``components`` principal directions of the centred class) and the rule is the relative size:
``rate: None`` removes the smaller cluster of every class where it holds at most ``size_threshold`` of
the class. With a ``rate``, every class loses its ``rate`` fraction of rows that sit most on the small
cluster's side (distance to the large cluster's centre minus distance to the small one's)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import per_class, register_filter, remove_top


class ActivationClusteringOptions(BaseModel):
    """``components``: PCA dimensions kept (at most the class's rank); ``size_threshold``: the smaller
    cluster is poison when it holds at most this fraction of its class (``rate: None``); ``restarts`` of
    k-means (k-means++ starts drawn from ``seed``; the lowest within-cluster sum of squares is kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    components: int = Field(10, ge=1, le=4096)
    size_threshold: float = Field(0.35, gt=0.0, le=0.5)
    restarts: int = Field(10, ge=1, le=1000)
    seed: int = Field(0, ge=0, lt=2**32)


def pca(x: Tensor, components: int) -> Tensor:
    """The rows of ``x`` [n, D] centred and projected on their top ``components`` principal directions."""
    centred = x - x.mean(0)
    vh = torch.linalg.svd(centred, full_matrices=False).Vh
    return centred @ vh[:components].T


def two_means(z: Tensor, *, restarts: int, generator: torch.Generator, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """k-means with k = 2 on ``z`` [n, m] (n >= 2): (assignment int64 [n], centres [2, m]) of the restart
    with the smallest within-cluster sum of squares; each restart starts by k-means++ (seeded)."""
    best: tuple[float, Tensor, Tensor] | None = None
    n = len(z)
    for _ in range(restarts):
        first = int(torch.randint(n, (1,), generator=generator))
        d2 = ((z - z[first]) ** 2).sum(1)
        weights = d2.cpu() if float(d2.sum()) > 0 else torch.ones(n, dtype=z.dtype)
        second = int(torch.multinomial(weights.float(), 1, generator=generator))
        centres = torch.stack([z[first], z[second]])
        assign = torch.cdist(z, centres).argmin(1)
        for _ in range(iterations):
            centres = torch.stack([z[assign == j].mean(0) if bool((assign == j).any()) else centres[j] for j in (0, 1)])
            new = torch.cdist(z, centres).argmin(1)
            if torch.equal(new, assign):
                break
            assign = new
        inertia = float(((z - centres[assign]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign, centres)
    assert best is not None
    return best[1], best[2]


@register_filter("activation-clustering", paper="Chen et al. 2018 (activation clustering)",
                 options=ActivationClusteringOptions, rate_optional=True)
def activation_clustering(features: Tensor, labels: Tensor, *, rate: float | None, components: int,
                          size_threshold: float, restarts: int, seed: int) -> Tensor:
    """Per class: PCA to ``components`` dimensions, 2-means; remove the smaller cluster where it holds at
    most ``size_threshold`` of the class (``rate: None``), or the ``rate`` fraction nearest its side."""
    f = features.double()
    generator = torch.Generator().manual_seed(seed)
    scores = torch.zeros(len(f), dtype=torch.float64)
    removed = torch.zeros(len(f), dtype=torch.bool)
    for rows in per_class(labels):
        if len(rows) < 2:
            continue
        z = pca(f[rows], components).cpu()
        assign, centres = two_means(z, restarts=restarts, generator=generator)
        sizes = torch.bincount(assign, minlength=2)
        small = int(sizes.argmin())
        d = torch.cdist(z, centres)
        scores[rows.cpu()] = d[:, 1 - small] - d[:, small]
        if rate is None and int(sizes[small]) <= size_threshold * len(rows):
            removed[rows.cpu()[assign == small]] = True
    return removed if rate is None else remove_top(scores, labels, rate)
