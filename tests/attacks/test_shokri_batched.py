"""Shokri's attack models of all classes are trained as one batch (issue 23): a classifier's result
must not depend on which others share its batch, and zero-padded evaluation rows are cut off."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.membership.shokri import fit_predict


@pytest.mark.parametrize("hidden", [None, 8])
def test_fit_predict_batched_equals_one_at_a_time(hidden: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 60, 4, generator=g)
    y = (x[..., 0] + 0.3 * torch.rand(5, 60, generator=g) > 0.6).long()
    xe = torch.rand(5, 17, 4, generator=g)
    seeds = [11, 12, 13, 14, 15]
    together = fit_predict(x, y, xe, hidden=hidden, steps=40, seeds=seeds)
    for t in range(5):
        alone = fit_predict(x[t:t + 1], y[t:t + 1], xe[t:t + 1], hidden=hidden, steps=40, seeds=seeds[t:t + 1])
        torch.testing.assert_close(together[t:t + 1], alone, rtol=0, atol=1e-6)
    padded = fit_predict(x, y, torch.nn.functional.pad(xe, (0, 0, 0, 3)), hidden=hidden, steps=40, seeds=seeds)
    # batched matmuls of another shape round differently (float32): equal to rounding, as the alone check
    torch.testing.assert_close(padded[:, :17], together, rtol=0, atol=1e-6)
