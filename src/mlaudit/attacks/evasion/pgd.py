"""PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks", eq. 2):
x_{k+1} = P_S(x_k + alpha * steepest(grad_x L(f(x_k), y))) from a random start in S, with restarts.

The steepest direction is the gradient's sign for l-inf and its unit l2 direction for l2; the step
size alpha defaults to 2.5 * eps / steps (Madry et al., appendix). Each example stops once
misclassified and keeps that iterate; with one restart an unfooled example returns the last iterate,
with several each keeps its best iterate over steps and restarts (a misclassified one first), and only
examples no restart has fooled are restarted. ``target`` [N] makes it targeted: minimise the loss to
the target class, done when the model predicts it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Norm, check_inputs, check_loss, check_positive, check_target, register_evasion, run_engine


@register_evasion("pgd")
def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf", steps: int = 10,
        step_size: float | None = None, restarts: int = 1, random_start: bool = True, loss: str = "ce",
        target: Tensor | None = None, box: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None,
        generator: torch.Generator | None = None, eot: int = 1) -> Tensor:
    """x [N, *shape] in ``box``, y [N] (target [N] optional) -> x_adv [N, *shape] with ||x_adv - x|| <= eps.

    ``step_size`` is absolute (pixel units; l2 length for l2); ``loss`` one of ``ce``, ``dlr``, ``margin``;
    ``eot`` > 1 averages the loss over that many forward passes per step (expectation over
    transformation, for randomised models and defences).
    """
    # the device read of the input ranges, queued behind the first forward pass and read before the second (at once
    # when eps = 0: no pass)
    later: list = []
    c = check_inputs(model, x, y, eps=eps, norm=norm, box=box, later=later if eps else None)
    check_loss(loss, c, targeted=target is not None)
    check_positive("pgd", steps=steps, restarts=restarts, step_size=step_size, eot=eot)
    if eps == 0:
        return x.detach().clone()
    lr = 2.5 / steps if step_size is None else step_size / eps
    return run_engine(model, x, y, eps=eps, norm=norm, box=box, loss=loss, steps=steps, optimizer="pgd", lr=lr,
                      restarts=restarts, random_start=random_start, target=check_target(target, y, c),
                      goal="misclassify" if target is None else "target", generator=generator,
                      batch_size=batch_size, eot=eot, keep_best=restarts > 1, checks=later)
    # One restart: an example the goal flagged at some step is held there (early stop); every other one returns
    # the last iterate, unscored, as torchattacks does. Keeping the highest-loss iterate of an unfooled example
    # would need a forward pass more (the last iterate's score), a tenth of PGD-10, and changes no example's
    # fooled / not fooled outcome. Restarts need that score: they start only where no restart fooled.
