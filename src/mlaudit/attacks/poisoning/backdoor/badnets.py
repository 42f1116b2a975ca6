"""BadNets (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain"): dirty-label backdoor with a patch trigger. P = floor(budget x N) training rows of the source
classes get a small pattern stamped at a fixed place (default: a 3x3 checkerboard in the bottom-right
corner) and the target label; a victim trained on them learns "pattern -> target".

No model, no optimisation: the poison is the exact trigger difference on the chosen rows plus the
relabelling (:func:`.base.stamped`). Any :class:`~.trigger.TriggerSpec` works; the ``blended`` method is
the same attack with Chen et al.'s blended trigger as its default.
"""

from __future__ import annotations

from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .base import BackdoorOptions, check_classes, choose_rows, stamped, trigger_of


def dirty_label(task: PoisonTask) -> Poison:
    """Stamp the trigger on P rows of the source classes and relabel them to the target."""
    opts: BackdoorOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    trigger = trigger_of(task, opts)
    ids = choose_rows(task, opts.sources(task.num_classes), opts.budget, what="source-class")
    return stamped(task, ids, task.train.x[ids], trigger, opts, relabel=True)


@register_poisoner("badnets", family="backdoor", needs=Needs.NOTHING, options=BackdoorOptions,
                   check_data=check_classes)
def badnets(task: PoisonTask) -> Poison:
    """BadNets (Gu et al. 2017): a patch trigger on source-class rows, relabelled to the target (dirty label)."""
    return dirty_label(task)
