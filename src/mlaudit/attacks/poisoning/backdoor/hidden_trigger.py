"""Hidden Trigger Backdoor (Saha, Subramanya & Pirsiavash, AAAI 2020, "Hidden Trigger Backdoor
Attacks"): a clean-label backdoor whose trigger never appears in the training set.

Threat model: the attacker perturbs P = floor(budget x N) training images of the *target* class
within an l-inf ball of radius eps and keeps their labels; the trigger is shown only at test time, on
inputs of the source classes. It knows a crafting model f (the network up to its penultimate layer)
but not the victims' initialisation or data order.

Objective (the paper's eq. 1, one pair per poison): for target-class images t_i [C, H, W] and
triggered source images s~_j = apply_trigger(s_j) (training rows of the source classes, the trigger
stamped where the test inputs get it),

    min_{delta}  sum_i ||f(t_i + delta_i) - f(s~_pi(i))||_2^2    s.t.  ||delta_i||_inf <= eps,
                                                                       0 <= t_i + delta_i <= 1,

with f(.) [B, D] the penultimate features. Each poison ends near a triggered source image in feature
space while its pixels stay those of a correctly labelled target image, so a victim that fits the
poisons as the target class also sends the triggered source features there.

Pairing pi (``pairing``): each poison has one triggered source image of a pool of P (drawn once,
seeded). ``nearest`` (default) re-pairs them at every step: in each poison mini-batch, a one-to-one
assignment by greedy nearest features (repeatedly the closest remaining (poison, source) pair, both
then removed), as the paper does ("closest pair without replacement", re-done every iteration). The
authors' released code marks only the chosen (poison, source) entry as used, so a source may end up
with several poisons; here the assignment is one-to-one. ``random`` keeps the pool's random pairing
fixed (poison i with pool image i). Nearest is the default because it is the paper's method and
because it spends the eps budget on closing the smallest gaps: each poison is pulled to the triggered
image already closest to it instead of one drawn at random, so the collision gets tighter for the
same eps, and re-pairing as the features move keeps every source image in use.

The objective is :class:`~mlaudit.attacks.poisoning.targeted.FeatureCollision` (Poison Frogs'
per-sample loss, beta 0) with a per-poison anchor and this pairing, minimised by the one crafting
engine (:func:`mlaudit.craft.craft` through :func:`~mlaudit.attacks.poisoning.targeted.crafting.craft_delta`;
defaults: 250 signed-Adam steps, lr 0.1 eps, step schedule, one restart, no augmentation while
crafting, as in the paper, whose poisons are crafted on un-augmented images); an ensemble averages
the per-model losses. The poison is the crafted image itself: no trigger on it, |delta|_inf <= eps.

Setting: the paper attacks transfer learning (a fixed pretrained AlexNet feature extractor whose last
layer is retrained on the poisoned set). mlaudit's ``backdoor`` kind retrains its victims from
scratch and has no fine-tuning victim, so that setting is not covered here (Souri et al. 2022 report
that the attack does not carry over to training from scratch; Sleeper Agent, :mod:`.sleeper_agent`,
is built for it). The paper also pastes the trigger at random locations; here it sits where the
``trigger`` block puts it, on the crafting images and the test inputs alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ....query import evaluating
from ....query.features import penultimate_features
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from ..targeted.crafting import TARGETED_CRAFTING, craft_delta, mean_objective
from ..targeted.feature_collision import FeatureCollision, Features
from .base import BackdoorOptions, as_poison, check_classes, choose_rows, source_rows, trigger_of
from .trigger import apply_trigger

HIDDEN_TRIGGER_CRAFTING = {**TARGETED_CRAFTING, "restarts": 1, "augment": False}
"""The crafting defaults: 250 signed-Adam steps of lr 0.1 eps with the step schedule, one restart, no
augmentation while crafting (the paper crafts on plain images)."""


class HiddenTriggerOptions(BackdoorOptions):
    """:class:`~.base.BackdoorOptions` and ``pairing``: ``nearest`` (default; the paper's re-pairing by
    nearest features at every step) or ``random`` (a fixed random pairing); module docstring."""

    pairing: Literal["nearest", "random"] = "nearest"


def nearest_pairing(dist: Tensor) -> Tensor:
    """One-to-one greedy assignment on ``dist`` [B, B] (poison i, source j): repeatedly the smallest
    remaining entry, whose row and column are then removed. Returns int64 [B]: the source of each poison.
    B steps of one argmin each, on ``dist``'s device without host synchronisation."""
    b = dist.shape[0]
    if dist.shape != (b, b):
        raise ValueError(f"nearest_pairing needs a square [B, B] distance matrix, got {list(dist.shape)}")
    d = dist.detach().float().clone()
    out = torch.empty(b, dtype=torch.long, device=d.device)
    for _ in range(b):
        k = torch.argmin(d).view(1)  # 1-d index tensors: no device-to-host copy per step
        r, c = k // b, k % b
        out.index_copy_(0, r, c)
        d.index_fill_(0, r, float("inf"))
        d.index_fill_(1, c, float("inf"))
    return out


class HiddenTriggerCollision(FeatureCollision):
    """Objective ``(x_adv [B, C, H, W], idx [B]) -> [B]``: ||f(x_adv_i) - f(s~_pi(i))||^2 (module
    docstring), ``idx`` positions in the poisons.

    ``features(x [N, ...]) -> [N, D]``; ``x_source`` [P, C, H, W] the triggered source pool (row i is
    poison i's partner under random pairing; its features are computed once); ``x_base`` [P, C, H, W]
    the clean poisons; ``pairing`` ``nearest`` (re-paired within each call's mini-batch: the poisons
    ``idx`` with the pool rows ``idx``) or ``random``. ``last_pairing`` [B] holds the latest call's
    assignment (pool rows)."""

    def __init__(self, features: Features, x_source: Tensor, x_base: Tensor, *,
                 pairing: Literal["nearest", "random"] = "nearest") -> None:
        if x_source.shape != x_base.shape:
            raise ValueError(f"x_source must hold one triggered source image per poison, shaped like x_base "
                             f"{list(x_base.shape)}; got {list(x_source.shape)}")
        super().__init__(features, x_source, x_base)
        self.pairing = pairing
        self.last_pairing: Tensor | None = None

    def anchors(self, feat: Tensor, idx: Tensor) -> Tensor:
        pool_rows = idx.to(self.target_feat.device)
        if self.pairing == "nearest":
            pool = self.target_feat[pool_rows]
            pool_rows = pool_rows[nearest_pairing(torch.cdist(feat.detach().float(), pool.float()))]
        self.last_pairing = pool_rows
        return self.target_feat[pool_rows]


@register_poisoner("hidden-trigger", family="backdoor", needs=Needs.CRAFTING_MODELS, options=HiddenTriggerOptions,
                   defaults=HIDDEN_TRIGGER_CRAFTING, check_model=penultimate_features, check_data=check_classes)
def hidden_trigger(task: PoisonTask) -> Poison:
    """Hidden Trigger Backdoor (Saha et al. 2020): target-class rows whose features collide with triggered sources; no trigger on them."""
    opts: HiddenTriggerOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    eps, dev = task.linf_eps(), task.device
    trigger = trigger_of(task, opts)
    ids = choose_rows(task, [opts.target_class], opts.budget, what="target-class")
    src = source_rows(task, opts, len(ids), salt=1)
    x = task.train.x[ids].to(dev)
    x_src = apply_trigger(task.train.x[src].to(dev), trigger)
    models = list(task.models)
    with evaluating(*models, requires_grad=False):  # gradients reach the perturbations only
        objs = [HiddenTriggerCollision(penultimate_features(m), x_src, x, pairing=opts.pairing) for m in models]
        objective = mean_objective(objs)
        start = float(objective(x, torch.arange(len(x), device=x.device)).detach().sum())  # at delta = 0
        res = craft_delta(objective, task, x)
    p = max(len(ids), 1)
    delta = res.delta.detach()
    info = {"eps": eps, "pairing": opts.pairing, "source_rows": int(len(src)), "feature_distance_start": start / p,
            "feature_distance_end": res.objective / p, "restarts": res.restarts, "history": res.history,
            "max_abs_perturbation": float(delta.abs().max()) if delta.numel() else 0.0}
    return as_poison(task, ids, (x + delta).to(task.train.device), opts, relabel=False, eps=eps, info=info)
