"""What the availability-poisoning methods share (family ``availability`` of the poisoner registry).

Threat model (seed 002, section 2.3.1): the poisoner perturbs P training images (all of them for
secure dataset release, or a fraction) within an l-inf ball of radius ``eps`` and keeps their labels;
the victim trains a new model from scratch on the released data; success is a low victim accuracy on
clean test data. The poisoner knows neither the victim's initialisation, recipe nor architecture.

Every method is a poisoner ``fn(task) -> Poison`` (:mod:`..contract`): it perturbs the task's
``poison_ids`` rows x [P, *shape] (labels y [P]) with ``task.models`` as its entry needs (fixed
pretrained crafting models, one fresh surrogate it trains itself, or none) and returns a view with
``|delta|_inf <= eps`` and ``0 <= x + delta <= 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ....errors import ConfigError
from ..contract import pgd_lr

AVAILABILITY_CRAFTING = {"steps": 250, "lr": pgd_lr, "optimizer": "pgd", "schedule": "constant", "restarts": 1,
                         "batch_size": None, "augment": True}
"""The crafting defaults of the PGD-based methods: 250 signed-gradient steps of 2.5 eps / steps
(Madry et al. 2018; the paper's 250 steps), constant step size, one restart, the victims' augmentation."""


def ensemble_logits(models: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Logits [E, B, C] of every model on ``x`` [B, *shape] (with gradients w.r.t. ``x``)."""
    return torch.stack([m(x) for m in models])


def check_inputs(x: Tensor, y: Tensor, num_classes: int) -> None:
    """Shapes, labels and the pixel box of the clean images; ConfigError otherwise."""
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ConfigError(f"x must be [P, *shape] and y [P]; got x {list(x.shape)} and y {list(y.shape)}")
    if x.shape[0] == 0:
        raise ConfigError("nothing to poison: x holds no examples")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError(f"images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]")
