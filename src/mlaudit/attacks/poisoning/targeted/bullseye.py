"""Bullseye Polytope (Aghakhani et al. 2021) as a joint objective for :func:`mlaudit.craft.craft`.

Threat model as in Poison Frogs (clean-label, targeted, known feature extractor), but instead of
colliding every poison with the target, the *mean* of the poisons' features is placed on the
target's feature ("bullseye" of their polytope):

    B(Delta) = ||mean_i f(x_i + Delta_i) - f(x_t)||^2 / ||f(x_t)||^2.

Several targets [T, ...] give the mean of this value over targets (each against the same poison
mean; the multi-image variant of the paper averages target features over augmented views, which
:func:`craft`'s augmentation of the poisons approximates). Mini-batches: :func:`craft` sums per-batch
objectives, so with ``batch_size < P`` each batch's mean is matched separately.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ....errors import ConfigError
from ..contract import Poison, PoisonTask
from ..registry import register_poisoner
from .crafting import TARGETED, TARGETED_CRAFTING, craft_poison, mean_objective
from .features import penultimate_features


class Bullseye:
    """Objective ``(x_adv [B, ...], idx [B]) -> scalar`` (see the module docstring).

    ``features(x [N, ...]) -> [N, D]`` (flattened if not 2-D), ``target_x`` [T >= 1, ...].
    """

    def __init__(self, features: Callable[[Tensor], Tensor], target_x: Tensor) -> None:
        if target_x.dim() < 2 or target_x.shape[0] < 1:
            raise ConfigError(f"target_x must be [T>=1, ...], got shape {list(target_x.shape)}")
        self.features = features
        with torch.no_grad():
            self.target_feat = features(target_x).flatten(1).detach()
        self.target_sq = self.target_feat.pow(2).sum(1)
        if bool((self.target_sq == 0).any()):
            raise ConfigError("a target has all-zero features; Bullseye normalises by ||f(x_t)||^2, pick another target")

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        center = self.features(x_adv).flatten(1).mean(0, keepdim=True)
        return ((center - self.target_feat).pow(2).sum(1) / self.target_sq).mean()


@register_poisoner("bullseye", family="targeted", needs=TARGETED, defaults=TARGETED_CRAFTING,
                   check_model=penultimate_features)
def bullseye(task: PoisonTask) -> Poison:
    """Bullseye Polytope (Aghakhani et al. 2021): the poisons' mean feature onto the target's."""
    x_target = task.targeted().x
    return craft_poison(mean_objective([Bullseye(penultimate_features(m), x_target) for m in task.models]), task)
