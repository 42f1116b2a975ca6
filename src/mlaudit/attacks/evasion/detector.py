"""A statistical detector of adversarial examples in feature space, and the feature collision attack
that walks past it (seed 003, Tramèr: tailored attacks break defences; Carlini & Wagner 2017,
"Adversarial Examples Are Not Easily Detected").

Detectors score an input by how atypical its penultimate features f(x) (:func:`mlaudit.query.penultimate_features`)
are for clean data, and flag scores above the (1 - ``fpr``) quantile of held-out clean scores:

* ``mahalanobis`` (Lee et al. 2018): class means mu_c and one tied covariance S of clean features;
  score(x) = min_c (f(x) - mu_c)^T S^-1 (f(x) - mu_c);
* ``knn``: the mean Euclidean distance to the k nearest clean features.

A PGD adversarial example pushed across the decision boundary tends to land where clean features do
not, and is flagged. The **feature collision** attack (Sabour et al. 2016, "Adversarial Manipulation
of Deep Representations"; the feature-collision objective of Poison Frogs, Shafahi et al. 2018)
instead minimises ||f(x + delta) - f(g)||^2 inside the eps ball, where g is a natural input of another
class (the guide: the one of a guide pool whose features are nearest to x's): the result is classified
like g and looks like g to a feature-space detector. It runs as an objective of the crafting engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...craft import craft
from ...errors import ConfigError
from ...query import evaluating, features_batched, forward_batched, penultimate_features
from ...query.features import classification_head
from .base import check_inputs, make_constraint
from .pgd import pgd

Method = Literal["mahalanobis", "knn"]


@dataclass
class FeatureDetector:
    """A fitted detector: ``score(x)`` [N] (higher = more atypical), ``flags(x)`` [N] bool."""

    model: nn.Module
    method: Method
    reference: Tensor  # [M, D] clean features (knn) or class means [C, D] (mahalanobis)
    precision: Tensor | None  # [D, D] inverse tied covariance (mahalanobis)
    k: int
    threshold: float

    @classmethod
    def fit(cls, model: nn.Module, x_fit: Tensor, y_fit: Tensor, x_calib: Tensor, *, method: Method = "mahalanobis",
            fpr: float = 0.05, k: int = 10, ridge: float = 1e-3) -> FeatureDetector:
        """Fit on clean (x_fit, y_fit); set the threshold so that a fraction ``fpr`` of the clean
        ``x_calib`` is flagged."""
        if method not in ("mahalanobis", "knn"):
            raise ConfigError(f"detector method {method!r}; allowed: mahalanobis, knn")
        if not 0 < fpr < 1:
            raise ConfigError(f"detector fpr = {fpr}; allowed 0 < fpr < 1")
        if k < 1 or k > len(x_fit):
            raise ConfigError(f"detector k = {k}; allowed 1 <= k <= {len(x_fit)} (the clean inputs it is fitted on)")
        f = features_batched(model, x_fit).double()
        if method == "knn":
            det = cls(model, method, f, None, k, 0.0)
        else:
            y = y_fit.cpu()
            classes = torch.unique(y)
            means = torch.zeros(int(classes.max()) + 1, f.shape[1], dtype=torch.float64)
            centred = torch.empty_like(f)
            for c in classes.tolist():
                sel = y == c
                means[c] = f[sel].mean(0)
                centred[sel] = f[sel] - means[c]
            cov = centred.T @ centred / max(len(f) - 1, 1)
            cov += ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=torch.float64)
            det = cls(model, method, means[classes], torch.linalg.inv(cov), k, 0.0)
        det.threshold = float(torch.quantile(det.score(x_calib), 1 - fpr))
        return det

    def _score_features(self, f: Tensor) -> Tensor:
        f = f.double()
        if self.method == "knn":
            d = torch.cdist(f, self.reference)
            return d.topk(self.k, dim=1, largest=False).values.mean(1)
        assert self.precision is not None
        diff = f[:, None, :] - self.reference[None]  # [N, C, D]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision, diff).min(1).values

    def score(self, x: Tensor) -> Tensor:
        """float64 [N] on the CPU."""
        return self._score_features(features_batched(self.model, x))

    def flags(self, x: Tensor) -> Tensor:
        return self.score(x) > self.threshold


class FeatureCollision:
    """Engine objective: ``(||f(x_adv) - f(guide)||^2 [B], done [B])``, done when x_adv is classified as
    its guide's class."""

    def __init__(self, model: nn.Module, guide_features: Tensor, guide_labels: Tensor) -> None:
        self.model, self.features, self.head = model, penultimate_features(model), classification_head(model)
        self.guide_features, self.guide_labels = guide_features, guide_labels

    def __call__(self, x_adv: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x_adv)
        loss = (f - self.guide_features[idx]).pow(2).sum(1)
        done = self.head(f).argmax(1) == self.guide_labels[idx]
        return loss, done


class DetectorAware:
    """Engine objective of the adaptive attack on a detector-defended classifier (Carlini & Wagner 2017,
    sec. 5): the margin loss z_y - max_{j != y} z_j (floored at -``kappa``) plus ``weight`` times how far
    the detector's score is above ``slack`` times its threshold, relative to the threshold; done when
    x_adv is misclassified and not flagged."""

    def __init__(self, model: nn.Module, y: Tensor, detector: FeatureDetector, *, weight: float = 1.0,
                 kappa: float = 5.0, slack: float = 0.9) -> None:
        self.model, self.y, self.detector = model, y, detector
        self.features = penultimate_features(model)
        self.head = classification_head(model)
        self.weight, self.kappa, self.slack = weight, kappa, slack

    def __call__(self, x_adv: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x_adv)
        z = self.head(f)
        y = self.y[idx]
        true = z.gather(1, y[:, None])[:, 0]
        other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
        margin = (true - other).clamp_min(-self.kappa)
        t = self.detector.threshold
        score = self.detector._score_features(f.cpu() if self.detector.reference.device.type == "cpu" else f)
        over = (score - self.slack * t).clamp_min(0) / t
        loss = margin + self.weight * over.to(margin.dtype).to(margin.device)
        done = (true < other) & (score.to(margin.device) <= t)
        return loss, done


def detector_aware(model: nn.Module, x: Tensor, y: Tensor, detector: FeatureDetector, *, eps: float = 8 / 255,
                   norm: str = "linf", steps: int = 100, lr: float = 0.1, weight: float = 1.0,
                   box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """x [N, *shape], y [N] -> x_adv [N, *shape] in the eps ball, misclassified and below the detector's
    threshold where the optimisation finds such a point (signed Adam through the engine)."""
    check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    if steps < 1:
        raise ConfigError(f"detector_aware steps = {steps}; allowed >= 1")
    with evaluating(model, requires_grad=False):
        res = craft(DetectorAware(model, y.to(x.device), detector, weight=weight), x,
                    constraint=make_constraint(norm, eps, box), steps=steps, optimizer="signed-adam", lr=lr,
                    init="random", keep_best=True, early_stop=True, generator=torch.Generator().manual_seed(0))
    return (x + res.delta).detach()


def choose_guides(model: nn.Module, x: Tensor, y: Tensor, pool_x: Tensor, pool_y: Tensor) -> tuple[Tensor, Tensor]:
    """Per input, the pool input of another class whose features are nearest: (features [N, D], labels [N])."""
    fx, fp = features_batched(model, x), features_batched(model, pool_x)
    d = torch.cdist(fx, fp)
    d[y.cpu()[:, None] == pool_y.cpu()[None, :]] = float("inf")
    j = d.argmin(1)
    return fp[j].to(x.device), pool_y.cpu()[j].to(x.device)


def feature_collision(model: nn.Module, x: Tensor, y: Tensor, *, pool_x: Tensor, pool_y: Tensor,
                      eps: float = 8 / 255, norm: str = "linf", steps: int = 100, lr: float = 0.1,
                      box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """x [N, *shape], y [N] -> x_adv [N, *shape] within the eps ball whose features approach those of the
    nearest natural input of another class in (pool_x, pool_y) (signed Adam through the engine)."""
    check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    if steps < 1:
        raise ConfigError(f"feature_collision steps = {steps}; allowed >= 1")
    gf, gy = choose_guides(model, x, y, pool_x, pool_y)
    with evaluating(model, requires_grad=False):
        res = craft(FeatureCollision(model, gf, gy), x, constraint=make_constraint(norm, eps, box), steps=steps,
                    optimizer="signed-adam", lr=lr, keep_best=True)
    return (x + res.delta).detach()


def evaluate_detector(model: nn.Module, x: Tensor, y: Tensor, detector: FeatureDetector, *, pool_x: Tensor,
                      pool_y: Tensor, eps: float, norm: str = "linf", steps: int = 50,
                      box: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Clean flags, and for PGD (non-adaptive to the detector), feature collision and the detector-aware
    attack (both adaptive): the
    fraction of examples misclassified, flagged, and misclassified without being flagged (the attack's
    real success against the detector-defended system)."""
    clean_pred = forward_batched(model, x).argmax(1).cpu()
    out: dict[str, Any] = {"method": detector.method, "threshold": detector.threshold, "eps": eps, "norm": norm,
                           "clean_accuracy": float((clean_pred == y.cpu()).float().mean()),
                           "clean_flagged": float(detector.flags(x).float().mean())}
    for name, x_adv in (("pgd", pgd(model, x, y, eps=eps, norm=norm, steps=steps, box=box)),  # type: ignore[arg-type]
                        ("feature-collision", feature_collision(model, x, y, pool_x=pool_x, pool_y=pool_y, eps=eps,
                                                                norm=norm, steps=steps, box=box)),
                        ("detector-aware", detector_aware(model, x, y, detector, eps=eps, norm=norm, steps=steps,
                                                          box=box))):
        wrong = forward_batched(model, x_adv).argmax(1).cpu() != y.cpu()
        flagged = detector.flags(x_adv)
        out[name] = {"misclassified": float(wrong.float().mean()), "flagged": float(flagged.float().mean()),
                     "undetected_success": float((wrong & ~flagged).float().mean())}
    return out
