"""Adversarial training, two methods (``recipe.adversarial.method``), both crafting through the one
crafting engine (:func:`mlaudit.craft.craft`, the ``pgd`` step) against the current weights of each
model of the stack:

``pgd``  PGD-AT (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks",
         eq. 2.1): min_theta E max_{delta in S} L(f_theta(x + delta), y). Each training batch is replaced
         by PGD examples on the cross-entropy (:class:`_StackLoss`), from a random start in the ball.

             recipe: {name: fast, adversarial: {method: pgd, eps: 0.1, norm: linf, steps: 7}}

``trades``  TRADES (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and
         Accuracy", eq. 5 and Algorithm 1):

             min_theta E[ CE(f(x), y) + beta * max_{x' in B(x, eps)} KL(softmax f(x) || softmax f(x')) ].

         The inner maximisation is PGD on the KL to the clean prediction (:class:`_StackKL`; the clean
         logits computed once, eval mode, detached) from x + 0.001 * N(0, I) (the paper's start);
         the outer loss is :func:`trades_loss` on one train-mode forward of [clean; adversarial]
         (so BatchNorm normalises both halves together; see there).

             recipe: {name: fast, adversarial: {method: trades, eps: 0.1, steps: 7, beta: 6.0}}

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

TRADES_START_STD = 0.001
"""Standard deviation of TRADES' random start around x (Zhang et al. 2019, Algorithm 1 and their code)."""


class _StackLoss:
    """Engine objective over a stack's batch flattened to [K * B, *shape]: -CE per example (PGD-AT)."""

    def __init__(self, stack: StackedModels, y: Tensor) -> None:
        self.stack, self.y, self.k = stack, y, y.shape[0]

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        logits = self.stack.forward(x_adv.view(self.k, -1, *x_adv.shape[1:]), train=False)
        return -F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten()[idx], reduction="none")


class _StackKL:
    """Engine objective over a stack's batch flattened to [K * B, *shape] (TRADES' inner maximisation,
    Zhang et al. 2019, eq. 5): -KL(p_clean || p_adv) per example [K * B], with ``clean_logp`` the
    detached eval-mode log-softmax of the clean batch [K, B, C]."""

    def __init__(self, stack: StackedModels, clean_logp: Tensor) -> None:
        self.stack, self.clean_logp, self.k = stack, clean_logp.detach(), clean_logp.shape[0]

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        logits = self.stack.forward(x_adv.view(self.k, -1, *x_adv.shape[1:]), train=False)
        return -kl_per_example(self.clean_logp.flatten(0, 1)[idx], logits.float().flatten(0, 1).log_softmax(-1))


def kl_per_example(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last dimension, from log-probabilities
    [..., C] -> [...]; differentiable in both arguments."""
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def trades_loss(logits: Tensor, y: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """TRADES' outer loss per model (Zhang et al. 2019, eq. 5): CE(f(x), y) + beta * KL(softmax f(x) ||
    softmax f(x')), each averaged over the model's batch ("batchmean").

    ``logits`` [K, 2B, C] is one forward of the concatenation [clean; adversarial] of each model's
    batch (clean rows first), ``y`` [K, B]; returns [K]. The KL's gradient flows through both the
    clean and the adversarial logits, as in the authors' code (``nn.KLDivLoss`` with the clean
    softmax as target, not detached). ``label_smoothing`` applies to the CE term only.

    BatchNorm: the one train-mode forward normalises both halves with the statistics of the 2B rows
    (and updates the running statistics once, from both); the authors' code calls the model on the
    clean and the adversarial batch separately, each with its own statistics. Models without
    BatchNorm compute the same either way.
    """
    k, b = y.shape
    clean, adv = logits.float().view(k, 2, b, -1).unbind(1)  # each [K, B, C]
    ce = F.cross_entropy(clean.flatten(0, 1), y.flatten(), label_smoothing=label_smoothing,
                         reduction="none").view(k, b).mean(1)
    kl = kl_per_example(clean.log_softmax(-1), adv.log_softmax(-1)).mean(1)
    return ce + beta * kl


def adversarial_batch(stack: StackedModels, xb: Tensor, yb: Tensor, spec: AdversarialConfig, *,
                      generators: Sequence[torch.Generator]) -> Tensor:
    """Adversarial examples [K, B, *shape] for the batch xb [K, B, *shape], yb [K, B], each against its
    own model: PGD on the CE (``method: pgd``) or on the KL to the clean prediction (``method: trades``).
    Model k's random start is drawn from ``generators[k]`` (so it does not depend on the stack it is in):
    uniform in the ball for pgd, x + 0.001 * N(0, I) for trades (projected into the ball and box).
    The last iterate is returned, detached."""
    params = stack.trainable()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    ball = (LinfBall if spec.norm == "linf" else L2Ball)(spec.eps, box=spec.box)
    lr = 2.5 / spec.steps if spec.step_size is None else spec.step_size / spec.eps
    xd = xb.detach()
    flat = xd.flatten(0, 1)
    try:
        if spec.method == "trades":
            with torch.no_grad():
                clean_logp = stack.forward(xd, train=False).float().log_softmax(-1)  # [K, B, C]
            objective: _StackLoss | _StackKL = _StackKL(stack, clean_logp)
            start = torch.cat([TRADES_START_STD * torch.randn(xk.shape, generator=g, device=g.device).to(xk)
                               for xk, g in zip(xd, generators, strict=True)])
        else:
            objective = _StackLoss(stack, yb)
            start = torch.cat([ball.random_init(xk, g) for xk, g in zip(xd, generators, strict=True)])
        res = craft(objective, flat, constraint=ball, steps=spec.steps, optimizer="pgd", lr=lr,
                    schedule="constant", init=start)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return (flat + res.delta).view_as(xb).detach()
