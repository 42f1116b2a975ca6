"""An adaptive penalty against the filtering defences (seed 003: evaluate defences with attacks that know
them; Koh, Steinhardt & Liang 2018: poisons crafted to satisfy the sanitizer's constraints), added to a
crafting objective such as gradient matching:

    obj = GradientMatching(model, x_t, adv, poison_labels=y_p,
                           penalty=FilterPenalty(model, clean_x, clean_y, kind="both", weight=1.0))
    # obj(x_p, idx) = 1 - cos(g_t, g_p) + weight * mean_i R(x_p,i)

The filters of :mod:`mlaudit.defences` score training rows in the penultimate feature space phi of a
model trained on the poisoned set (:func:`mlaudit.defences.training_features`, through
:func:`mlaudit.query.features_batched`). The attacker does not have that model; it has its crafting
model, and penalises each poison's position in the crafting model's penultimate features (the same
extraction, :func:`mlaudit.query.penultimate_features`, differentiable), against statistics of the
clean rows of the poison's own class computed once with the crafting model before crafting:

``centroid`` (against ``outlier``, and ``knn`` at a rate)
    R_c(x) = ||phi(x) - mu_y||^2 / mean_j ||phi(x_j) - mu_y||^2: the squared distance to the clean class
    centroid, relative to the clean rows' mean squared distance (1 for a typical clean row).
``spectral`` (against ``spectral``)
    R_s(x) = ||V_y (phi(x) - mu_y)||^2 / mean_j ||V_y (phi(x_j) - mu_y)||^2, V_y [k, D] the top ``directions``
    right singular vectors of the centred clean class: the squared projection on the directions spectral
    signatures score by, relative to the clean rows' (sum of the top k singular values squared / n).
``both``
    R_c + R_s (when the attacker does not know which of the filters runs).

The penalty is evaluated in eval mode (the defender's features are) on the poisons as the objective
receives them (with the crafting augmentation when it is on). Activation clustering is not targeted by
a dedicated term (``both`` keeps the poisons inside the class's main cloud, which is what its 2-means
split looks for).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ....errors import ConfigError
from ....query import evaluating, features_batched, penultimate_features

PenaltyKind = Literal["centroid", "spectral", "both"]
PENALTIES: tuple[str, ...] = ("centroid", "spectral", "both")
PENALTY_FOR_FILTER: dict[str, PenaltyKind] = {"outlier": "centroid", "knn": "centroid", "spectral": "spectral",
                                              "activation-clustering": "both"}
"""The penalty matched to each filtering defence of :mod:`mlaudit.defences` (module docstring)."""


class AdaptiveOptions(BaseModel):
    """``attack.adaptive`` of gradient matching: ``penalty`` (centroid | spectral | both, see
    :mod:`.adaptive`), ``weight`` lambda >= 0 of the penalty beside the cosine term (0: the plain brew),
    ``directions`` k of the spectral term (top singular directions of the clean class)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    penalty: PenaltyKind
    weight: float = Field(1.0, ge=0.0, le=1e4)
    directions: int = Field(1, ge=1, le=64)


class FilterPenalty:
    """``penalty(x [B, ...], labels [B]) -> weight * mean_i R(x_i)`` (module docstring), with the clean
    statistics of ``classes`` (default: every class of ``clean_y``) computed once from ``clean_x`` [N, ...],
    ``clean_y`` [N] in ``model``'s penultimate features."""

    def __init__(self, model: nn.Module, clean_x: Tensor, clean_y: Tensor, *, kind: PenaltyKind,
                 weight: float = 1.0, directions: int = 1, classes: Tensor | None = None,
                 batch_size: int = 1024) -> None:
        if kind not in PENALTIES:
            raise ConfigError(f"penalty must be one of {', '.join(PENALTIES)}, got {kind!r}")
        if weight < 0 or directions < 1:
            raise ConfigError(f"weight must be >= 0 and directions >= 1, got weight={weight}, directions={directions}")
        self.model, self.kind, self.weight = model, kind, float(weight)
        self.features = penultimate_features(model)
        device = next(model.parameters()).device
        clean_y = clean_y.cpu()
        wanted = torch.unique(clean_y if classes is None else classes.cpu())
        keep = torch.isin(clean_y, wanted)
        clean_y = clean_y[keep]
        feats = features_batched(model, clean_x[keep.to(clean_x.device)], batch_size=batch_size,
                                 device=device).double()
        size = int(wanted.max()) + 1
        dim = feats.shape[1]
        k = min(directions, dim)
        mu = torch.zeros(size, dim, dtype=torch.float64)
        basis = torch.zeros(size, k, dim, dtype=torch.float64)
        scale = torch.ones(size, 2, dtype=torch.float64)
        for c in wanted.tolist():
            rows = feats[clean_y == c]
            if len(rows) < 2:
                raise ConfigError(f"the adaptive penalty needs at least 2 clean rows of class {c}, got {len(rows)}")
            centred = rows - rows.mean(0)
            vh = torch.linalg.svd(centred, full_matrices=False).Vh[:k]
            mu[c], basis[c, :len(vh)] = rows.mean(0), vh
            scale[c, 0] = (centred ** 2).sum(1).mean().clamp_min(1e-12)
            scale[c, 1] = ((centred @ vh.T) ** 2).sum(1).mean().clamp_min(1e-12)
        self.mu, self.basis, self.scale = (t.float().to(device) for t in (mu, basis, scale))
        self.classes = wanted

    def scores(self, feats: Tensor, labels: Tensor) -> Tensor:
        """R per row [B] of features ``feats`` [B, D] with ``labels`` [B] (unweighted; in float32 at least)."""
        dtype = torch.promote_types(feats.dtype, torch.float32)
        labels = labels.to(self.mu.device)
        mu, basis, scale = (t.to(dtype)[labels] for t in (self.mu, self.basis, self.scale))
        centred = feats.to(dtype) - mu
        out = torch.zeros(len(feats), device=feats.device, dtype=dtype)
        if self.kind in ("centroid", "both"):
            out = out + (centred ** 2).sum(1) / scale[:, 0]
        if self.kind in ("spectral", "both"):
            proj = torch.einsum("bd,bkd->bk", centred, basis)
            out = out + (proj ** 2).sum(1) / scale[:, 1]
        return out

    def __call__(self, x: Tensor, labels: Tensor) -> Tensor:
        with evaluating(self.model):
            feats = self.features(x)
        return self.weight * self.scores(feats, labels).mean()
