"""Sanity flags on the models a run trained: a model that "finished" but did not learn is a result
nobody should trust silently (issue 21: Adam at lr 1e6 ended at 28% accuracy, loss 3e11, no warning).

A model is flagged when its final training loss is non-finite or above ``LOSS_FACTOR`` x ln(C) (the
loss of a uniform guess over C classes is ln C), or when its test accuracy is within
``CHANCE_MARGIN`` of chance (1/C). The flags go into ``results.json`` (``warnings``), the report's
notes and the log; they never change a metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

LOSS_FACTOR = 10.0
CHANCE_MARGIN = 0.02


def flag_models(records: Iterable[Mapping[str, Any]], *, num_classes: int) -> list[str]:
    """One line per kind of problem (diverged loss, chance accuracy) naming up to five trials."""
    diverged, chance = [], []
    limit = LOSS_FACTOR * math.log(max(num_classes, 2))
    for r in records:
        m = r.get("metrics") or {}
        loss, acc = m.get("train_loss"), m.get("test_accuracy")
        if isinstance(loss, (int, float)) and (not math.isfinite(loss) or loss > limit):
            diverged.append(f"{r.get('trial_id')} (train loss {loss:.3g})")
        if isinstance(acc, (int, float)) and acc <= 1.0 / num_classes + CHANCE_MARGIN:
            chance.append(f"{r.get('trial_id')} ({100 * acc:.1f}%)")
    out = []
    if diverged:
        out.append(f"{len(diverged)} model(s) ended with a training loss above {limit:.3g} ({LOSS_FACTOR:g} x ln "
                   f"{num_classes}): {', '.join(diverged[:5])}; training diverged: lower the learning rate")
    if chance:
        out.append(f"{len(chance)} model(s) are at chance accuracy (1/{num_classes} = {100 / num_classes:.1f}%): "
                   f"{', '.join(chance[:5])}; results built on them are not meaningful")
    for line in out:
        log.warning(line)
    return out
