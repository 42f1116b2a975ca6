"""Feature collision (Poison Frogs; Shafahi et al. 2018) as a per-sample objective for
:func:`mlaudit.craft.craft`.

Threat model: clean-label, targeted; the attacker knows the feature extractor (the network up to the
penultimate layer). Each poison x_i + Delta_i keeps its true (adversarial-class) label while its
features collide with the target's, so a victim fine-tuned (or trained) on it moves the target across
the decision boundary:

    loss_i = ||f(x_i + Delta_i) - f(x_t)||^2 + beta * ||x_i + Delta_i - b_i||^2,

with b_i the clean base image of poison i. The paper optimises this with forward-backward splitting;
here :func:`craft` minimises it (e.g. with signed Adam) under an l-inf ball, which already bounds the
distance to the base, so ``beta`` defaults to 0 (the paper's scaling is beta0 * D_feat^2 / D_in^2,
beta0 = 0.25). With augmentation in :func:`craft` the proximity term compares the augmented poison
with the un-augmented base (documented limitation; leave ``beta`` = 0 when augmenting).
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

Features = Callable[[Tensor], Tensor]


class FeatureCollision:
    """Objective ``(x_adv [B, ...], idx [B]) -> [B]`` per-sample losses (see the module docstring).

    ``features(x [N, ...]) -> [N, D]`` (e.g. the model without its head; flattened if not 2-D),
    ``target_x`` [1, ...] (one target for all poisons) or [P, ...] (target of poison i at row i),
    ``x_base`` [P, ...] the clean poison images (indexed by ``idx``), ``beta`` >= 0.
    """

    def __init__(self, features: Features, target_x: Tensor, x_base: Tensor, *, beta: float = 0.0) -> None:
        if beta < 0:
            raise ConfigError(f"beta must be >= 0, got {beta}")
        if target_x.shape[0] not in (1, x_base.shape[0]) or target_x.shape[1:] != x_base.shape[1:]:
            raise ConfigError(f"target_x must be [1, ...] or [P={x_base.shape[0]}, ...] shaped like x_base "
                              f"{list(x_base.shape)}, got {list(target_x.shape)}")
        self.features = features
        self.x_base = x_base.detach()
        self.beta = beta
        with torch.no_grad():
            self.target_feat = features(target_x).flatten(1).detach()

    def anchors(self, feat: Tensor, idx: Tensor) -> Tensor:
        """The features [B, D] each poison of the batch is pulled to, given the poisons' own features
        ``feat`` [B, D] (detached use only): the target's, or row ``idx`` of the per-poison targets.
        Subclasses pair poisons with anchors differently (Hidden Trigger Backdoor re-pairs them by
        nearest features, :mod:`mlaudit.attacks.poisoning.backdoor.hidden_trigger`)."""
        return self.target_feat.expand(feat.shape[0], -1) if self.target_feat.shape[0] == 1 else self.target_feat[idx]

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        feat = self.features(x_adv).flatten(1)
        loss = (feat - self.anchors(feat, idx)).pow(2).sum(1)
        if self.beta > 0:
            loss = loss + self.beta * (x_adv - self.x_base[idx]).flatten(1).pow(2).sum(1)
        return loss


@register_poisoner("poison-frogs", family="targeted", needs=TARGETED, defaults=TARGETED_CRAFTING,
                   check_model=penultimate_features)
def poison_frogs(task: PoisonTask) -> Poison:
    """Poison Frogs (Shafahi et al. 2018): every poison's penultimate features onto the target's."""
    # one target for all poisons (the first; in the multi-target setting its features are the anchor)
    x_poison, _ = task.poison_rows()
    x_target = task.targeted().x[:1]
    return craft_poison(mean_objective([FeatureCollision(penultimate_features(m), x_target, x_poison)
                                        for m in task.models]), task)
