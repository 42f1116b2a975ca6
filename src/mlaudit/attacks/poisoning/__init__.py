"""Poisoning attacks behind one contract (:mod:`.contract`) and one registry (:mod:`.registry`).

    from mlaudit.attacks.poisoning import POISONERS, PoisonTask, Target
    entry = POISONERS.get("gradient-matching", family="targeted")
    poison = entry(PoisonTask(train=data.train, num_classes=10, eps=16 / 255, poison_ids=ids,
                              target=Target(x_target, target_class=3, adv_class=5), models=[crafter],
                              settings={"steps": 250, "restarts": 8}))
    poison.view          # DataView over data.train: the poisoned training set

Families (one subpackage each, one method per file):

* :mod:`.targeted` — clean-label targeted poisoning (Witches' Brew, Poison Frogs, Bullseye
  Polytope, watermark, label flip; seed 002 chapter 1);
* :mod:`.availability` — availability poisons (adversarial poisoning, error-minimizing noise, random
  noise; seed 002 chapter 2);
* :mod:`.indiscriminate` — indiscriminate attacks (label flip, GradPC parameter corruption, gradient
  canceling; seed 001);
* :mod:`.backdoor` — backdoors (BadNets, blended injection, label-consistent, Hidden Trigger Backdoor,
  Sleeper Agent; issue 18).
"""

from . import availability, backdoor, indiscriminate, targeted  # noqa: F401  (register the poisoners)
from .contract import (
    CraftingSettings,
    Family,
    Needs,
    NoOptions,
    Poison,
    Poisoner,
    PoisonTask,
    Target,
    VictimObjective,
    pgd_lr,
)
from .registry import POISONERS, PoisonerEntry, PoisonerRegistry, register_poisoner

__all__ = [
    "POISONERS", "CraftingSettings", "Family", "Needs", "NoOptions", "Poison", "PoisonTask", "Poisoner",
    "PoisonerEntry", "PoisonerRegistry", "Target", "VictimObjective", "pgd_lr", "register_poisoner",
]
