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


def test_pick_layout_runs_its_cuda_probe_with_a_warm_up_and_two_timed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe path (a CUDA device, K > 1) with training and CUDA calls replaced: per layout one warm-up epoch,
    then 1 and 2 epochs, min(K, 16) models each; the reason names the timing."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *_: None)
    monkeypatch.setattr(layout, "train_stack", lambda models, data, recipe, **kw: calls.append(
        (kw["strategy"], len(models), recipe.epochs)))
    data = load_dataset("digits").train
    best, why = layout.pick_layout("auto", k=40, model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8),
                                                                                num_classes=10),
                                   data=data, recipe=resolve_recipe("fast"), lr=0.1, device=torch.device("cuda"),
                                   augment=None)
    assert best in ("loop", "vmap") and "2 epochs minus 1" in why
    assert calls == [(s, 16, e) for s in ("loop", "vmap") for e in (1, 1, 2)]
