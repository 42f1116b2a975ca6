"""Per-sample evasion losses on logits z [B, C] with true labels y [B] (and targets t [B]), each a value
the attacker *maximises*; the objective handed to the crafting engine is its negative.

* ``ce``: cross-entropy CE(z, y) (Madry et al. 2018, eq. 2); targeted: -CE(z, t).
* ``dlr``: the Difference of Logits Ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) with z_pi sorted
  decreasingly (Croce & Hein 2020, eq. 5): shift- and scale-invariant in the logits; needs C >= 3.
  Targeted (eq. 6): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2); needs C >= 4.
* ``margin``: max_{i != y} z_i - z_y, Carlini & Wagner's f_6 (2017, sec. V.A); targeted z_t - max_{i != t} z_i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from ...registry import Registry

EvasionLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
LOSSES: Registry[EvasionLoss] = Registry("evasion loss")
MIN_CLASSES = {"ce": 2, "margin": 2, "dlr": 3}
MIN_CLASSES_TARGETED = {"ce": 2, "margin": 2, "dlr": 4}


def margin(z: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{i != y} z_i [B]: negative exactly when the model misclassifies (ties count as correct)."""
    z_y = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return z_y - others.amax(1)


@LOSSES.register("ce")
def cross_entropy(z: Tensor, y: Tensor, t: Tensor | None = None) -> Tensor:
    if t is not None:
        return -F.cross_entropy(z, t, reduction="none")
    return F.cross_entropy(z, y, reduction="none")


@LOSSES.register("dlr")
def dlr(z: Tensor, y: Tensor, t: Tensor | None = None) -> Tensor:
    top = z.sort(1, descending=True).values
    if t is None:
        return -margin(z, y) / (top[:, 0] - top[:, 2] + 1e-12)
    z_y, z_t = z.gather(1, y[:, None])[:, 0], z.gather(1, t[:, None])[:, 0]
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


@LOSSES.register("margin")
def cw_margin(z: Tensor, y: Tensor, t: Tensor | None = None) -> Tensor:
    return -margin(z, y) if t is None else margin(z, t)

