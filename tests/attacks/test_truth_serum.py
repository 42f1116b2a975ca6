"""Truth Serum's poisoned view (Tramer et al. 2022): mislabelled copies of seeded pool targets."""

from __future__ import annotations

import torch

from mlaudit.attacks.membership import truth_serum_view
from mlaudit.data import load_dataset
from mlaudit.data.view import DataView


def test_truth_serum_view_inserts_mislabelled_copies() -> None:
    data = load_dataset({"name": "synthetic", "options": {"n_train": 50, "n_test": 8, "shape": [6], "num_classes": 5}})
    rows = torch.arange(10, 40)
    view, pos, wrong = truth_serum_view(data.train.x, data.train.y, DataView.identity(data.train), rows,
                                        targets=4, copies=3, num_classes=5, seed=0)
    assert view.num_inserted == 12 and pos.shape == (4,) and bool((wrong != data.train.y[rows[pos]]).all())
    x, y = view.gather(torch.arange(50, 62))
    assert torch.equal(x, data.train.x[rows[pos]].repeat_interleave(3, 0)) and torch.equal(y, wrong.repeat_interleave(3))
