"""Backdoor poisoning, family ``backdoor`` of the poisoner registry: plant a trigger so that victims
trained on the poisoned set classify triggered inputs as a target class and clean inputs correctly.

Methods (one file each, each ``fn(task) -> Poison``; shared pieces in :mod:`.base`, triggers as data
in :mod:`.trigger`):

* ``badnets`` — Gu et al. 2017: a patch trigger on source-class rows, relabelled to the target (dirty label);
* ``blended`` — Chen et al. 2017: a blended pattern, x' = (1 - alpha) x + alpha p (dirty label);
* ``label-consistent`` — Turner et al. 2019: target-class rows made hard by an adversarial perturbation
  within eps (through :func:`mlaudit.craft.craft`), then triggered; labels kept (clean label);
* ``hidden-trigger`` — Saha et al. 2020: target-class rows crafted within eps so that their penultimate
  features collide with those of *triggered* source-class images (:class:`~.hidden_trigger.HiddenTriggerCollision`,
  a :class:`~mlaudit.attacks.poisoning.targeted.FeatureCollision` re-paired by nearest features each step);
  no trigger on the poisons, labels kept;
* ``sleeper-agent`` — Souri et al. 2022: target-class rows (largest gradient norm first) crafted within
  eps so that their training gradient aligns with that of "triggered source images -> target class"
  (:class:`~mlaudit.attacks.poisoning.targeted.GradientMatching` served with that adversarial loss),
  optionally retraining the crafting models between rounds; no trigger on the poisons, labels kept.

The last two are hidden-trigger attacks: registered with ``needs=Needs.CRAFTING_MODELS`` and options
extending :class:`~.base.BackdoorOptions`, they return :func:`~.base.as_poison` views of crafted images
bounded by ``eps`` (no trigger on the poisons; it appears on test inputs only).

    from mlaudit.attacks.poisoning import POISONERS, PoisonTask
    m = POISONERS.get("badnets", family="backdoor")
    poison = m(PoisonTask(train=data.train, num_classes=10, seed=0,
                          options={"target_class": 0, "budget": 0.03, "trigger": {"size": 3}}))
    poison.view              # DataView: trigger differences on P rows (eps=None) + labels -> 0
    m = POISONERS.get("sleeper-agent", family="backdoor")
    poison = m(PoisonTask(train=data.train, num_classes=10, eps=16 / 255, models=[crafter], seed=0,
                          options={"target_class": 0, "budget": 0.01, "trigger": {"size": 3}}))
    poison.view              # DataView: crafted target-class rows, |delta| <= eps (eps=16/255), labels kept
"""

from . import badnets, blended, hidden_trigger, label_consistent, sleeper_agent  # noqa: F401  (register the methods)
from .base import (
    BackdoorOptions,
    as_poison,
    check_budget,
    check_classes,
    choose_rows,
    poison_count,
    source_rows,
    stamped,
)
from .blended import BlendedOptions
from .hidden_trigger import (
    HIDDEN_TRIGGER_CRAFTING,
    HiddenTriggerCollision,
    HiddenTriggerOptions,
    nearest_pairing,
)
from .label_consistent import LABEL_CONSISTENT_CRAFTING
from .sleeper_agent import SLEEPER_AGENT_CRAFTING, SleeperAgentOptions
from .trigger import Trigger, TriggerSpec, apply_trigger, blend_trigger, patch_trigger

__all__ = [
    "HIDDEN_TRIGGER_CRAFTING", "LABEL_CONSISTENT_CRAFTING", "SLEEPER_AGENT_CRAFTING", "BackdoorOptions", "BlendedOptions",
    "HiddenTriggerCollision", "HiddenTriggerOptions", "SleeperAgentOptions", "Trigger", "TriggerSpec", "apply_trigger",
    "as_poison", "blend_trigger", "check_budget", "check_classes", "choose_rows", "nearest_pairing", "patch_trigger",
    "poison_count", "source_rows", "stamped",
]
