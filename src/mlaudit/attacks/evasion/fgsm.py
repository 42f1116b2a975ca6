"""FGSM (Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples", eq. 3):
x_adv = clip(x + eps * sign(grad_x CE(f(x), y))); with ``norm="l2"`` the fast gradient method's
x + eps * grad / ||grad||_2. One engine step of size eps from zero, in the constraint's norm."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Norm, check_inputs, check_loss, register_evasion, run_engine


@register_evasion("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf", loss: str = "ce",
         box: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape] with ||x_adv - x|| <= eps."""
    later: list = []  # the device read of the input ranges, queued behind the forward pass (check_inputs, RangeCheck)
    check_loss(loss, check_inputs(model, x, y, eps=eps, norm=norm, box=box, later=later), targeted=False)
    return run_engine(model, x, y, eps=eps, norm=norm, box=box, loss=loss, steps=1, optimizer="pgd", lr=1.0,
                      random_start=False, batch_size=batch_size, keep_best=False, early_stop=False, checks=later)
