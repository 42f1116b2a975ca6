"""Truth Serum's poisoning (Tramer, Shokri, San Joaquin, Le, Jagielski, Hong, Carlini 2022, "Truth
Serum: Poisoning Machine Learning Models to Reveal Their Secrets"; seed 000).

Threat model: the adversary may add examples to the training set before training, then gets
black-box access to the trained model and wants to tell whether a target example z was in it. The
poison is ``copies`` copies of z with a wrong label: a model that trains on them but not on z is
confidently wrong on z, one that also holds z is pulled back towards the right label, so the IN and
OUT confidences on z separate. Any membership attack then scores the poisoned models.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...data.view import DataView


def truth_serum_view(train_x: Tensor, train_y: Tensor, base: DataView, pool_rows: Tensor, *, targets: int,
                     copies: int, num_classes: int, seed: int) -> tuple[DataView, Tensor, Tensor]:
    """The poisoned view and its targets.

    Picks ``targets`` positions of the pool (seeded, ascending) and inserts ``copies`` copies of each
    target's x [*shape] with one wrong label per target ((y + U{1..K-1}) mod K). Returns
    ``(view, target positions in the pool int64 [T], wrong labels int64 [T])``; the inserted
    examples have virtual indices N_train .. N_train + T * copies - 1.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5345_5255]))
    pos = torch.from_numpy(np.sort(rng.choice(pool_rows.numel(), size=targets, replace=False)))
    y = train_y[pool_rows[pos]]
    wrong = (y + torch.from_numpy(rng.integers(1, num_classes, size=targets))) % num_classes
    x = train_x[pool_rows[pos]].repeat_interleave(copies, 0)
    view = base.with_inserted(x, wrong.repeat_interleave(copies)).with_meta(method="truth-serum", copies=copies)
    return view, pos, wrong
