"""Blended injection (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning"): dirty-label backdoor whose trigger is a whole-image pattern blended in,
x' = (1 - alpha) x + alpha p (default: seeded uniform noise, alpha 0.2, the paper's random-pattern
key), stamped on P = floor(budget x N) source-class rows that are relabelled to the target.

The attack is BadNets' (:func:`.badnets.dirty_label`) with a blended trigger by default; any
:class:`~.trigger.TriggerSpec` may be given.
"""

from __future__ import annotations

from pydantic import Field

from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .badnets import dirty_label
from .base import BackdoorOptions, check_classes
from .trigger import TriggerSpec


class BlendedOptions(BackdoorOptions):
    """:class:`~.base.BackdoorOptions` with a blended noise trigger (alpha 0.2) by default."""

    trigger: TriggerSpec = Field(default_factory=lambda: TriggerSpec(type="blend"))


@register_poisoner("blended", family="backdoor", needs=Needs.NOTHING, options=BlendedOptions,
                   check_data=check_classes)
def blended(task: PoisonTask) -> Poison:
    """Blended injection (Chen et al. 2017): a pattern blended into source-class rows, relabelled to the target."""
    return dirty_label(task)
