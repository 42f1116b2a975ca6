"""Protective perturbations: the "public attacks" a user runs on their own photos before posting them, so
that a face-recognition model trained on the scraped photos fails on their clean ones. Radiya-Dixit,
Hong, Carlini & Tramèr ("Data Poisoning Won't Save You From Facial Recognition", ICLR 2022) show that
they do not protect against a trainer who waits for a later feature extractor ("oblivious") or trains
robustly against the public attack ("adaptive"); :mod:`mlaudit.experiments.protect` runs that study.

Both attacks are objectives of the one crafting engine (:func:`mlaudit.craft.craft`, signed Adam in the
l-inf ball of radius ``eps`` around each photo, inside the pixel box). The attacked extractors Phi_m are
the penultimate features of classifiers (:func:`mlaudit.query.penultimate_features`); with several
(an ensemble, as LowKey uses), the per-photo losses are summed over m.

* ``fawkes`` (Shan et al., USENIX Security 2020, "Fawkes: Protecting Privacy against Unauthorized Deep
  Learning Models", eq. 2-3): cloaking as a targeted feature-space attack. The target identity T is the
  one among ``guides_y`` whose feature centroid (under Phi_1) is farthest from the user's centroid
  (Fawkes picks a dissimilar identity); photo i is pulled to the features of T's photo at position
  i mod |T| in ``guides_x``:
  loss_i = sum_m ||Phi_m(x_i + delta_i) - Phi_m(g_i)||^2 / ||Phi_m(g_i)||^2.
  Fawkes bounds perceptual distance (DSSIM <= rho) with a penalty; here the l-inf ball bounds delta.
* ``lowkey`` (Cherepanova et al., ICLR 2021, "LowKey: Leveraging Adversarial Attacks to Protect Social
  Media Users from Facial Recognition", eq. 1): untargeted; maximise the features' move
  sum_m ||Phi_m(x_i + delta_i) - Phi_m(x_i)||^2 / ||Phi_m(x_i)||^2 (loss_i is its negative). LowKey adds
  the same term at a Gaussian-smoothed x + delta and an LPIPS penalty instead of a hard budget; here
  neither (the l-inf ball bounds delta).

Shapes: photos x [P, C, H, W] in ``box``; guides [G, C, H, W] with identities guides_y [G].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..craft import craft
from ..errors import ConfigError
from ..query import evaluating, features_batched, penultimate_features
from .evasion.base import make_constraint

Method = Literal["fawkes", "lowkey"]
METHODS: tuple[str, ...] = ("fawkes", "lowkey")


class FeatureMove:
    """Engine objective ``(x_adv [B, ...], idx [B]) -> loss [B]``: the normalised squared feature distance
    to ``anchors[m][idx]`` summed over extractors m, with ``sign`` +1 (pull to the anchors: Fawkes) or -1
    (push away from them: LowKey, anchors = the clean photos' features)."""

    def __init__(self, extractors: Sequence[Callable[[Tensor], Tensor]], anchors: Sequence[Tensor], *,
                 sign: float) -> None:
        self.extractors, self.anchors, self.sign = list(extractors), [a.detach() for a in anchors], sign
        self.scale = [a.pow(2).sum(1).clamp_min(1e-12) for a in self.anchors]

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        total = torch.zeros(x_adv.shape[0], device=x_adv.device)
        for phi, a, s in zip(self.extractors, self.anchors, self.scale, strict=True):
            total = total + (phi(x_adv) - a[idx]).pow(2).sum(1) / s[idx]
        return self.sign * total


@dataclass(frozen=True)
class Protection:
    """``x`` [P, C, H, W]: the protected photos; ``target`` the Fawkes target identity (None for LowKey);
    ``feature_shift`` [P]: ||Phi_1(x) - Phi_1(x_clean)|| / ||Phi_1(x_clean)|| under the first extractor."""

    x: Tensor
    target: int | None
    feature_shift: Tensor


def protect(extractors: Sequence[nn.Module], x: Tensor, *, method: Method = "lowkey", eps: float = 8 / 255,
            steps: int = 100, lr: float = 0.1, user: int | None = None, guides_x: Tensor | None = None,
            guides_y: Tensor | None = None, box: tuple[float, float] = (0.0, 1.0),
            generator: torch.Generator | None = None) -> Protection:
    """Protect the user's photos x [P, C, H, W] against the classifiers ``extractors`` (their penultimate
    features are attacked). ``fawkes`` needs ``guides_x`` [G, C, H, W] / ``guides_y`` [G] (photos of other
    identities to choose the target from) and the user's identity ``user``; ``lowkey`` needs neither.
    Signed Adam for ``steps`` steps of ``lr`` * eps, the best iterate per photo kept."""
    if method not in METHODS:
        raise ConfigError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    if not extractors:
        raise ConfigError("protect needs at least one extractor")
    if not 0 <= eps <= box[1] - box[0]:
        raise ConfigError(f"eps = {eps}; allowed 0 <= eps <= {box[1] - box[0]} (the pixel range)")
    if steps < 1:
        raise ConfigError(f"steps = {steps}; allowed >= 1")
    if x.dim() != 4 or len(x) == 0:
        raise ConfigError(f"x: protect needs photos [P, C, H, W], got shape {list(x.shape)}")
    if float(x.min()) < box[0] - 1e-6 or float(x.max()) > box[1] + 1e-6:
        raise ConfigError(f"x: pixels outside the box {box} (range [{float(x.min()):.3g}, {float(x.max()):.3g}])")
    phis = [penultimate_features(m) for m in extractors]
    clean = [features_batched(m, x).to(x.device) for m in extractors]
    target = None
    if method == "fawkes":
        if guides_x is None or guides_y is None or user is None:
            raise ConfigError("method fawkes needs guides_x, guides_y (photos of other identities) and user")
        guides_y = guides_y.to(x.device)
        others = guides_y != user
        if not bool(others.any()):
            raise ConfigError(f"method fawkes: no guide photo of an identity other than the user ({user})")
        target = farthest_identity(clean[0], features_batched(extractors[0], guides_x[others]).to(x.device),
                                   guides_y[others])
        pool = guides_x[guides_y == target]
        g = pool[torch.arange(len(x), device=pool.device) % len(pool)].to(x.device)
        anchors, sign = [features_batched(m, g).to(x.device) for m in extractors], 1.0
    else:
        anchors, sign = clean, -1.0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    objective = FeatureMove(phis, anchors, sign=sign)
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        for m in extractors:  # eval mode, parameters frozen, every flag restored afterwards
            stack.enter_context(evaluating(m, requires_grad=False))
        res = craft(objective, x, constraint=make_constraint("linf", eps, box), steps=steps, optimizer="signed-adam",
                    lr=lr, init="random", generator=gen, keep_best=True)
    x_adv = (x + res.delta).detach().clamp(*box)
    moved = features_batched(extractors[0], x_adv).to(x.device)
    shift = (moved - clean[0]).norm(dim=1) / clean[0].norm(dim=1).clamp_min(1e-12)
    return Protection(x_adv, target, shift.cpu())


def farthest_identity(user_features: Tensor, other_features: Tensor, other_y: Tensor) -> int:
    """The identity among ``other_y`` [G] whose feature centroid is farthest (l2) from the centroid of
    ``user_features`` [P, D] (Fawkes' dissimilar target); ``other_features`` [G, D]."""
    ids = other_y.unique()
    mu = user_features.mean(0)
    dist = torch.stack([(other_features[other_y == k].mean(0) - mu).norm() for k in ids])
    return int(ids[dist.argmax()])
