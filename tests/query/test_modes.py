"""The eval-mode guard (mlaudit.query.modes): modes and requires_grad inside the block, every
submodule's own flag and every parameter's requires_grad restored after, also on an exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.query import evaluating, in_mode, training


def net() -> nn.Sequential:
    """Train mode, except a BatchNorm kept in eval mode (frozen statistics) and one frozen weight."""
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    m[1].eval()
    m[3].weight.requires_grad_(False)
    return m


def state(m: nn.Module) -> tuple[list[bool], list[bool]]:
    return [s.training for s in m.modules()], [p.requires_grad for p in m.parameters()]


def test_evaluating_sets_eval_and_restores_each_submodule() -> None:
    a, b = net(), net()
    before = state(a)
    with evaluating(a, b):
        assert not any(s.training for s in a.modules()) and not any(s.training for s in b.modules())
        assert state(a)[1] == before[1]  # requires_grad unchanged unless asked
    assert state(a) == before and state(b) == before
    assert not a[1].training  # the frozen BatchNorm stays in eval mode (a whole-model train(prev) would not)


def test_requires_grad_is_set_and_restored_when_asked() -> None:
    m = net()
    before = state(m)
    with evaluating(m, requires_grad=False):
        assert not any(p.requires_grad for p in m.parameters())
    assert state(m) == before
    with training(m, requires_grad=True):
        assert all(s.training for s in m.modules()) and all(p.requires_grad for p in m.parameters())
    assert state(m) == before


@pytest.mark.parametrize("train", [False, True])
def test_flags_are_restored_on_an_exception(train: bool) -> None:
    m = net()
    before = state(m)
    with pytest.raises(RuntimeError, match="boom"):
        with in_mode(m, train=train, requires_grad=False):
            raise RuntimeError("boom")
    assert state(m) == before


def test_eval_mode_is_what_the_forward_sees() -> None:
    m = net()
    x = torch.randn(8, 4)
    with torch.no_grad(), evaluating(m):
        a, b = m(x), m(x)  # dropout off, BatchNorm running statistics: deterministic
    torch.testing.assert_close(a, b)


def test_walk_matches_modules_and_parameters_with_sharing() -> None:
    """The guard's own traversal visits what ``modules()`` / ``parameters()`` do, in the same order, each
    module and parameter once (a shared layer, a tied weight, a nested container)."""
    from mlaudit.models import build_model
    from mlaudit.query.modes import _modules, _parameters

    shared = nn.Linear(3, 3)
    tied = nn.Linear(3, 3)
    tied.weight = shared.weight
    models = [build_model("resnet18", input_shape=(3, 32, 32), num_classes=10),
              nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, tied), tied), net()]
    for m in models:
        assert _modules(m) == list(m.modules())
        assert [id(p) for p in _parameters([_modules(m)])] == [id(p) for p in m.parameters()]
    a, b = models[1], models[2]  # two models: parameters of both, each once
    assert [id(p) for p in _parameters([_modules(a), _modules(b)])] == \
        [id(p) for p in dict.fromkeys([*a.parameters(), *b.parameters()])]
