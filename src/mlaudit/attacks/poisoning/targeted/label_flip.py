"""Targeted label flipping, a *dirty-label* baseline outside the clean-label threat model (seed 002
Table 1.2): the P training images of the target's class closest to the target in the crafting
model's penultimate feature space (:mod:`.features`; Shafahi et al. 2018) are relabelled to the
adversarial class; no pixel changes. P = the scenario's poison count.

Shapes: ``train.x`` [N, *shape], ``train.y`` [N]; target ``x`` [T, *shape] (the mean of the targets'
features is the anchor); the poison's view relabels P rows (ascending ids) to ``adv_class``.
"""

from __future__ import annotations

import torch

from ....data.view import DataView
from ....errors import ConfigError
from ..contract import Poison, PoisonTask
from ..registry import register_poisoner
from .crafting import TARGETED
from .features import penultimate_features


@register_poisoner("label-flip", family="targeted", needs=TARGETED, check_model=penultimate_features)
def targeted_label_flip(task: PoisonTask) -> Poison:
    """Dirty-label baseline: relabel the P target-class images nearest the target to the adversarial class."""
    target = task.targeted()
    p = int(task.ids().numel())
    cand = (task.train.y == target.target_class).nonzero().flatten()
    if len(cand) < p:
        raise ConfigError(f"label-flip needs {p} training images of the target class {target.target_class}, "
                          f"there are {len(cand)}")
    feats = penultimate_features(task.models[0])
    dev = target.x.device
    with torch.no_grad():
        ft = feats(target.x.to(dev)).float().mean(0, keepdim=True)
        dist = torch.cat([torch.cdist(feats(task.train.x[c].to(dev)).float(), ft).flatten() for c in cand.split(1024)])
    chosen = cand[dist.argsort()[:p].cpu()].sort().values
    view = DataView.identity(task.train).with_labels(chosen, torch.full((p,), target.adv_class, dtype=torch.long))
    return Poison(view, info={"objective": None, "restarts": [], "history": []})
