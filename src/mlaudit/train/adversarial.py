"""Adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks", eq. 2.1): min_theta E max_{delta in S} L(f_theta(x + delta), y). Each training batch is
replaced by PGD examples against the current weights of each model of the stack, crafted through the
one crafting engine (:func:`mlaudit.craft.craft`, the ``pgd`` step, a random start in the ball), then
the loop takes its usual step on them.

    recipe: {name: fast, adversarial: {method: pgd, eps: 0.1, norm: linf, steps: 7}}

The examples are crafted with the models in eval mode (BatchNorm running statistics, no dropout) and
their weights frozen; the training step itself stays in train mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..craft import L2Ball, LinfBall, craft
from .recipe import AdversarialConfig
from .stacked import StackedModels


class _StackLoss:
    """Engine objective over a stack's batch flattened to [K * B, *shape]: -CE per example."""

    def __init__(self, stack: StackedModels, y: Tensor) -> None:
        self.stack, self.y, self.k = stack, y, y.shape[0]

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        logits = self.stack.forward(x_adv.view(self.k, -1, *x_adv.shape[1:]), train=False)
        return -F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten()[idx], reduction="none")


def adversarial_batch(stack: StackedModels, xb: Tensor, yb: Tensor, spec: AdversarialConfig, *,
                      generators: Sequence[torch.Generator]) -> Tensor:
    """PGD examples [K, B, *shape] for the batch xb [K, B, *shape], yb [K, B], each against its own model;
    model k's random start is drawn from ``generators[k]`` (so it does not depend on the stack it is in)."""
    params = stack.trainable()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    ball = (LinfBall if spec.norm == "linf" else L2Ball)(spec.eps, box=spec.box)
    lr = 2.5 / spec.steps if spec.step_size is None else spec.step_size / spec.eps
    flat = xb.detach().flatten(0, 1)
    start = torch.cat([ball.random_init(xk, g) for xk, g in zip(xb.detach(), generators, strict=True)])
    try:
        res = craft(_StackLoss(stack, yb), flat, constraint=ball, steps=spec.steps, optimizer="pgd", lr=lr,
                    schedule="constant", init=start)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return (flat + res.delta).view_as(xb).detach()
