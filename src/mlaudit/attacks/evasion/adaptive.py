"""Non-adaptive against adaptive evaluation of an input-transformation defence, side by side (seed 003;
Athalye, Carlini & Wagner 2018; Tramèr et al. 2020, "On Adaptive Attacks to Adversarial Example Defenses").

:func:`evaluate_defence` runs, on the same examples and budget:

* ``undefended``: PGD against the bare model (the reference robustness);
* ``transfer`` (non-adaptive): PGD examples crafted on the bare model, fed to the defended one;
* ``naive`` (non-adaptive): PGD through the defended model with autograd's gradients and one draw;
* ``adaptive``: PGD through the defended model with BPDA for a non-differentiable transform and EOT
  over ``eot`` draws for a randomised one.

Accuracies of a randomised defence are means over ``draws`` forward passes (the expected accuracy).
The lesson to expect: a defence whose robustness comes from masked gradients looks strong under
``naive`` and falls under ``adaptive``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import evaluating, forward_batched
from .defended import NON_DIFFERENTIABLE, RANDOMISED, Defended, Transform
from .pgd import pgd


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, draws: int = 1, batch_size: int = 1024) -> float:
    """Accuracy of ``model`` on x [N, ...], y [N], averaged over ``draws`` forward passes (randomised models)."""
    hits = sum(float((forward_batched(model, x, batch_size=batch_size).argmax(1) == y.to(x.device)).sum())
               for _ in range(draws))
    return hits / (draws * len(x))


def evaluate_defence(model: nn.Module, x: Tensor, y: Tensor, *, transform: Transform, eps: float,
                     norm: str = "linf", steps: int = 50, eot: int = 8, draws: int = 8, seed: int = 0,
                     box: tuple[float, float] = (0.0, 1.0), **options: Any) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` behind ``transform`` (options: see :class:`Defended`)
    under the four evaluations of the module docstring; PGD with ``steps`` steps in the ``norm`` ball
    of radius ``eps``. Returns accuracies in [0, 1] and the settings used."""
    if eot < 1 or draws < 1 or steps < 1:
        raise ConfigError(f"eot = {eot}, draws = {draws}, steps = {steps}; allowed: each >= 1")
    defended = Defended(model, transform, **options)
    randomised = transform in RANDOMISED
    d = draws if randomised else 1

    def attack(m: nn.Module, k: int) -> Tensor:
        return pgd(m, x, y, eps=eps, norm=norm, steps=steps, box=box, eot=k,  # type: ignore[arg-type]
                   generator=torch.Generator().manual_seed(seed))

    with evaluating(model, requires_grad=False):
        x_base = attack(model, 1)
        x_naive = attack(defended.with_gradient("true"), 1)
        adaptive_model = defended.with_gradient("bpda" if transform in NON_DIFFERENTIABLE else "true")
        x_adapt = attack(adaptive_model, eot if randomised else 1)
    return {
        "transform": transform, "options": dict(options), "eps": eps, "norm": norm, "steps": steps,
        "eot": eot if randomised else 1, "bpda": transform in NON_DIFFERENTIABLE, "draws": d,
        "clean_undefended": accuracy(model, x, y),
        "clean_defended": accuracy(defended, x, y, draws=d),
        "robust_undefended": accuracy(model, x_base, y),
        "robust_transfer": accuracy(defended, x_base, y, draws=d),
        "robust_naive": accuracy(defended, x_naive, y, draws=d),
        "robust_adaptive": accuracy(defended, x_adapt, y, draws=d),
    }
