"""Book-keeping clipping against the per-example path on a full-width ResNet-18-GN, in float64.

The CPU suite checks width-8 nets in float32 (tests/privacy/test_fastclip.py). At full width the float32
paths differ by up to 1% of a tensor's largest entry at initialisation (rounding amplified through the
backward of 18 layers), so the algorithm is compared in float64, where it agrees to 1.3e-7 (the 1e-6
in the clip factor's denominator). About 30 s on a 2-core CPU: marked slow."""

from __future__ import annotations

import pytest
import torch

from mlaudit.models import build_model
from mlaudit.privacy.dpsgd import clipped_sum, per_example_grads
from mlaudit.privacy.fastclip import clipped_grad_sum
from mlaudit.train.stacked import StackedModels


@pytest.mark.slow
def test_full_width_resnet18_gn_float64() -> None:
    torch.manual_seed(0)
    m = build_model({"name": "resnet18", "norm": "group"}, input_shape=(3, 32, 32), num_classes=10).double().train()
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    w = (torch.arange(8) % 5 != 0).double()
    fast, _ = clipped_grad_sum(m, x, y, w, clip=1.0)
    stack = StackedModels.from_modules([m], torch.device("cpu"), strategy="loop", channels_last=False)
    (grads, _), = per_example_grads(stack, x[None], y[None])
    ref = clipped_sum(grads, w[None], 1.0)
    for a, b in zip(fast, ref, strict=True):
        b = b.squeeze(0)
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-12
