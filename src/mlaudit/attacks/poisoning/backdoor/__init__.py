"""Backdoor poisoning, family ``backdoor`` of the poisoner registry: plant a trigger so that victims
trained on the poisoned set classify triggered inputs as a target class and clean inputs correctly.

Methods (one file each, each ``fn(task) -> Poison``; shared pieces in :mod:`.base`, triggers as data
in :mod:`.trigger`):

* ``badnets`` — Gu et al. 2017: a patch trigger on source-class rows, relabelled to the target (dirty label);
* ``blended`` — Chen et al. 2017: a blended pattern, x' = (1 - alpha) x + alpha p (dirty label);
* ``label-consistent`` — Turner et al. 2019: target-class rows made hard by an adversarial perturbation
  within eps (through :func:`mlaudit.craft.craft`), then triggered; labels kept (clean label).

Not built yet: Hidden Trigger Backdoor (Saha et al. 2020) and Sleeper Agent (Souri et al. 2022). Both
are crafting-engine objectives over target-class rows within eps (feature collision with triggered
source images; gradient matching towards the triggered-source loss), so each will be one more file
here registering ``needs=Needs.CRAFTING_MODELS`` with :class:`~.base.BackdoorOptions` and returning
:func:`~.base.as_poison` views (crafted images, no trigger on the poisons, ``eps`` bounded).

    from mlaudit.attacks.poisoning import POISONERS, PoisonTask
    m = POISONERS.get("badnets", family="backdoor")
    poison = m(PoisonTask(train=data.train, num_classes=10, seed=0,
                          options={"target_class": 0, "budget": 0.03, "trigger": {"size": 3}}))
    poison.view              # DataView: trigger differences on P rows (eps=None) + labels -> 0
"""

from . import badnets, blended, label_consistent  # noqa: F401  (register the methods)
from .base import BackdoorOptions, as_poison, check_budget, check_classes, choose_rows, poison_count, stamped
from .blended import BlendedOptions
from .label_consistent import LABEL_CONSISTENT_CRAFTING
from .trigger import Trigger, TriggerSpec, apply_trigger, blend_trigger, patch_trigger

__all__ = [
    "LABEL_CONSISTENT_CRAFTING", "BackdoorOptions", "BlendedOptions", "Trigger", "TriggerSpec", "apply_trigger", "as_poison",
    "blend_trigger", "check_budget", "check_classes", "choose_rows", "patch_trigger", "poison_count", "stamped",
]
