"""Carlini-Wagner l2 (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural Networks",
sec. V.A): a minimal-perturbation attack. With the change of variables x_adv = lo + (hi - lo) *
(tanh(w) + 1) / 2 (the box holds for every w), Adam minimises per example

    ||x_adv - x||_2^2 + c * max(z_y - max_{i != y} z_i, -kappa)          (the f_6 objective)

and a binary search over c (``search_steps`` rounds, per example) finds the smallest c that still
succeeds: after a success c moves halfway down towards the last failure, after a failure halfway up
(or x10 while no success bounds it). Each round starts where the previous one ended (a warm start, so
R rounds of S steps cost and reach about what R * S steps at one c would; the paper restarts every
round from x). Each example keeps its smallest successful perturbation over all rounds and steps; an
example never fooled is returned unchanged. No eps: the returned l2 distances
are the measurement (an eps-ball result is ``||x_adv - x||_2 <= eps and misclassified``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...craft import Free, craft
from ...query.modes import evaluating
from .base import check_inputs, check_positive, register_evasion
from .losses import margin


class _CWObjective:
    """(||x_adv - x||^2 + c * max(margin, -kappa) [B], done [B]) at w [B, *shape]; done = margin < -kappa
    (so among done iterates the objective orders by distance)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, c: Tensor, kappa: float, box: tuple[float, float]):
        self.model, self.x, self.y, self.c, self.kappa, self.box = model, x, y, c, kappa, box

    def image(self, w: Tensor) -> Tensor:
        lo, hi = self.box
        return lo + (hi - lo) * (torch.tanh(w) + 1) / 2

    def __call__(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        xa = self.image(w)
        m = margin(self.model(xa), self.y[idx])
        dist = (xa - self.x[idx]).flatten(1).pow(2).sum(1)
        return dist + self.c[idx] * m.clamp_min(-self.kappa), m < -self.kappa


@register_evasion("cw")
def cw_l2(model: nn.Module, x: Tensor, y: Tensor, *, c: float = 1.0, kappa: float = 0.0, steps: int = 100,
          lr: float = 0.01, search_steps: int = 5, box: tuple[float, float] = (0.0, 1.0),
          batch_size: int | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape]: the smallest-l2 misclassified point found
    (x itself where none was found). ``c`` is the initial trade-off constant, ``kappa`` the confidence."""
    check_inputs(model, x, y, eps=None, norm="l2", box=box)
    check_positive("cw", c=c, steps=steps, lr=lr, search_steps=search_steps)
    if kappa < 0:
        check_positive("cw", kappa=kappa)
    y = y.to(x.device)
    lo, hi = box
    u = ((x - lo) / (hi - lo) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)
    w0 = torch.atanh(u)
    n = len(x)
    const = torch.full((n,), float(c), device=x.device)
    low, high = torch.zeros(n, device=x.device), torch.full((n,), float("inf"), device=x.device)
    best_d, best = torch.full((n,), float("inf"), device=x.device), x.detach().clone()
    objective = _CWObjective(model, x, y, const, kappa, box)
    start = torch.zeros_like(w0)
    with evaluating(model, requires_grad=False):
        for _ in range(search_steps):
            res = craft(objective, w0, constraint=Free(), steps=steps, optimizer="adam", lr=lr, schedule="constant",
                        keep_best=True, batch_size=batch_size, init=start)
            start = res.delta
            xa = objective.image(w0 + res.delta).detach()
            d = (xa - x).flatten(1).norm(dim=1)
            ok = res.done.to(x.device) if res.done is not None else torch.zeros(n, dtype=torch.bool, device=x.device)
            improve = ok & (d < best_d)
            best_d = torch.where(improve, d, best_d)
            best[improve] = xa[improve]
            high = torch.where(ok, torch.minimum(high, const), high)
            low = torch.where(ok, low, torch.maximum(low, const))
            const.copy_(torch.where(high < float("inf"), (low + high) / 2, const * 10))
    return best
