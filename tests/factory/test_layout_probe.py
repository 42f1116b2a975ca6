"""The layout probe's timing (factory/layout.py): per-epoch time net of what each call pays once."""

from __future__ import annotations

import pytest

from mlaudit.factory.layout import steady_epoch_time


@pytest.mark.parametrize("once,per_epoch", [(0.05, 0.01), (0.0, 0.02), (3.0, 0.5)])
def test_steady_epoch_time_drops_the_one_time_cost(once: float, per_epoch: float) -> None:
    """A run with a fixed cost per call (verification, tracing) plus a cost per epoch, on a fake clock: the
    probe sees the per-epoch part only, so a layout with a large one-time cost is not judged by it."""
    now = [0.0]
    calls: list[int] = []

    def run(epochs: int) -> None:
        calls.append(epochs)
        now[0] += once + per_epoch * epochs

    got = steady_epoch_time(run, clock=lambda: now[0])
    assert calls == [1, 2]
    assert got == pytest.approx(per_epoch, rel=1e-9)
