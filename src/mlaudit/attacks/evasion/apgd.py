"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1): PGD with momentum 0.75 and a per-example step size,
starting at 2 * eps and halved at checkpoints when progress stalls (restarting from the best point),
so it needs no step-size tuning. It runs as the engine's ``apgd`` step rule.

* ``apgd`` with ``loss="ce"`` (APGD-CE) or ``loss="dlr"`` (APGD-DLR, eq. 5, needs >= 3 classes);
* ``apgd_targeted`` (APGD-T): the targeted DLR loss (eq. 6, >= 4 classes) towards each of the
  ``targets`` highest-scoring wrong classes of the clean input in turn, each run only on the examples
  that are still classified correctly; the goal stays misclassification.

Examples keep their best iterate (a misclassified one first), leave once misclassified, and restarts
(random starts in the ball) run only on examples still classified correctly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...query import forward_batched
from .base import Norm, check_inputs, check_loss, check_positive, register_evasion, run_engine


@register_evasion("apgd")
def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf", steps: int = 100,
         restarts: int = 1, loss: str = "ce", random_start: bool = True, box: tuple[float, float] = (0.0, 1.0),
         batch_size: int | None = None, generator: torch.Generator | None = None, eot: int = 1) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape] with ||x_adv - x|| <= eps (APGD-CE / APGD-DLR);
    ``eot`` > 1: the loss is averaged over that many forward passes per step (randomised defences)."""
    # the device read of the input ranges, queued behind the first forward pass and read before the second (at once
    # when eps = 0: no pass)
    later: list = []
    check_loss(loss, check_inputs(model, x, y, eps=eps, norm=norm, box=box, later=later if eps else None), targeted=False)
    check_positive("apgd", steps=steps, restarts=restarts, eot=eot)
    if eps == 0:
        return x.detach().clone()
    return run_engine(model, x, y, eps=eps, norm=norm, box=box, loss=loss, steps=steps, optimizer="apgd", lr=2.0,
                      restarts=restarts, random_start=random_start, generator=generator, batch_size=batch_size,
                      eot=eot, checks=later)


@register_evasion("apgd-t")
def apgd_targeted(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf",
                  steps: int = 100, restarts: int = 1, targets: int = 9, random_start: bool = True,
                  box: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape] (APGD-T over ``targets`` target classes)."""
    c = check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    check_loss("dlr", c, targeted=True)
    check_positive("apgd-t", steps=steps, restarts=restarts, targets=targets)
    x_adv = x.detach().clone()
    if eps == 0:
        return x_adv
    y = y.to(x.device)
    z = forward_batched(model, x, device=x.device)
    ranked = z.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, : min(targets, c - 1)]
    robust = z.argmax(1) == y
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for k in range(ranked.shape[1]):
        rows = robust.nonzero()[:, 0]
        if len(rows) == 0:
            break
        adv = run_engine(model, x[rows], y[rows], eps=eps, norm=norm, box=box, loss="dlr", steps=steps,
                         optimizer="apgd", lr=2.0, restarts=restarts, random_start=random_start,
                         target=ranked[rows, k], generator=gen, batch_size=batch_size)
        x_adv[rows] = adv
        robust[rows] = forward_batched(model, adv, device=x.device).argmax(1) == y[rows]
    return x_adv
