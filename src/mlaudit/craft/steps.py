"""The engine's update rules: one function per optimizer, ``update(delta, grad, state, step_size, t, info)``.

``delta`` and ``grad`` are [G, R, *shape] (G restarts of R samples still being optimised), changed in
place; ``state`` holds the rule's tensors, each [G, R, ...] (the engine drops the rows of finished
samples from all of them at once); ``step_size`` is absolute (the engine has applied ``lr``, the
constraint's scale and the schedule); ``t`` counts steps from 1; ``info`` has what some rules need
besides: the constraint (for its projection and steepest direction), the inputs, the objective of
the current iterate per sample and the step budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .constraints import Box, Constraint, Free, LinfBall

_SIGNED = (LinfBall, Box, Free)
"""The constraints whose ``steepest`` is ``grad.sign()`` (exact types: a subclass may define its own)."""


@dataclass(frozen=True)
class StepInfo:
    """``x`` [R, *shape] the inputs of the rows being optimised, ``losses`` [G, R] the objective at the
    current iterate (None for joint objectives), ``step`` (0-based) of ``steps``."""

    constraint: Constraint
    x: Tensor
    losses: Tensor | None
    step: int
    steps: int

    def steepest(self, grad: Tensor) -> Tensor:
        """The constraint's steepest direction of grad [G, R, *shape], per sample."""
        if type(self.constraint) in _SIGNED:  # the sign, elementwise: no per-sample view needed
            return grad.sign()
        return self.constraint.steepest(grad.flatten(0, 1)).view_as(grad)

    def project(self, delta: Tensor) -> Tensor:
        """delta [G, R, *shape] projected onto the constraint around x."""
        g = delta.shape[0]
        return self.constraint.project(delta.flatten(0, 1), self.x.expand(g, *self.x.shape).flatten(0, 1)).view_as(delta)


Update = Callable[[Tensor, Tensor, dict[str, Tensor], float, int, StepInfo], None]


def pgd(delta: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, t: int, info: StepInfo) -> None:
    """delta -= step * steepest(grad): signed for l-inf and the box, unit-l2 for l2 (Madry et al. 2018)."""
    delta.sub_(info.steepest(grad), alpha=step)


def adam(delta: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, t: int, info: StepInfo | None = None,
         *, signed: bool = False) -> None:
    """Adam (beta 0.9, 0.999) on the gradient, or on its sign (``signed``, the Witches' Brew default)."""
    g = grad.sign() if signed else grad
    m = state.setdefault("m", torch.zeros_like(delta))
    v = state.setdefault("v", torch.zeros_like(delta))
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
    denom = (v / (1 - 0.999**t)).sqrt_().add_(1e-8)
    delta.addcdiv_(m, denom, value=-step / (1 - 0.9**t))


APGD_MOMENTUM = 0.75
APGD_RHO = 0.75


def apgd_checkpoints(steps: int) -> frozenset[int]:
    """The checkpoints w_j = ceil(p_j * N) of APGD (Croce & Hein 2020, sec. 3.2): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return frozenset(w for w in (math.ceil(round(q * steps, 9)) for q in p[1:]) if 0 < w < steps)


def apgd(delta: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, t: int, info: StepInfo) -> None:
    """One step of APGD (Croce & Hein 2020, Algorithm 1), minimising the objective f per sample:

        z       = P(x_k - eta * steepest(grad f(x_k)))
        x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})),   alpha = 0.75 (plain step at k = 0)

    with the best point x_best (lowest f seen) tracked per sample. At each checkpoint w_j the step
    size eta of a sample is halved, and the sample restarts from x_best (with its gradient), when
    (1) f decreased in fewer than rho = 0.75 of the steps since the last checkpoint, or (2) eta was not
    halved at the last checkpoint and f_best did not improve since. ``step`` is the initial eta."""
    assert info.losses is not None, "apgd needs per-sample losses"
    loss = info.losses.to(delta.device)
    k = t - 1
    shape = (*loss.shape, *([1] * (delta.dim() - 2)))
    if k == 0:
        state.update(eta=torch.full_like(loss, step), prev=delta.clone(), best=delta.clone(), best_grad=grad.clone(),
                     f_best=loss.clone(), f_prev=loss.clone(), f_check=loss.clone(), ups=torch.zeros_like(loss),
                     halved=torch.zeros_like(loss, dtype=torch.bool))
    else:
        state["ups"] += (loss < state["f_prev"]).float()
        state["f_prev"] = loss.clone()
        better = loss < state["f_best"]
        state["f_best"] = torch.where(better, loss, state["f_best"])
        state["best"] = torch.where(better.view(shape), delta, state["best"])
        state["best_grad"] = torch.where(better.view(shape), grad, state["best_grad"])
        checks = sorted(apgd_checkpoints(info.steps))
        if k in checks:
            since = k - max([0, *(c for c in checks if c < k)])
            stalled = state["ups"] < APGD_RHO * since
            no_gain = ~state["halved"] & (state["f_best"] >= state["f_check"])
            halve = stalled | no_gain
            state["eta"] = torch.where(halve, state["eta"] / 2, state["eta"])
            hv = halve.view(shape)
            delta.copy_(torch.where(hv, state["best"], delta))
            grad = torch.where(hv, state["best_grad"], grad)
            state.update(halved=halve, f_check=state["f_best"].clone(), ups=torch.zeros_like(loss))
    z = info.project(delta - state["eta"].view(shape) * info.steepest(grad))
    alpha = 1.0 if k == 0 else APGD_MOMENTUM
    new = info.project(delta + alpha * (z - delta) + (1 - alpha) * (delta - state["prev"]))
    state["prev"] = delta.clone()
    delta.copy_(new)


UPDATES: dict[str, Update] = {
    "pgd": pgd,
    "adam": adam,
    "signed-adam": lambda d, g, s, st, t, i: adam(d, g, s, st, t, i, signed=True),
    "apgd": apgd,
}
