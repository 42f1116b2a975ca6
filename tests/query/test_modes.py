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


# ---- the cached module tree (issue 16): a model changed between blocks is walked again ----

def _guarded_state(m: nn.Module, *, requires_grad: bool | None = False) -> tuple[list[bool], list[bool]]:
    """The modes and requires_grad flags of m's current modules / parameters seen inside a guard block."""
    with evaluating(m, requires_grad=requires_grad):
        return state(m)


def test_the_tree_is_cached_while_the_model_is_unchanged() -> None:
    from mlaudit.query import modes

    m = net()
    with evaluating(m, requires_grad=False):
        pass
    tree = modes._TREES[m]
    with evaluating(m, requires_grad=False):
        pass
    assert modes._TREES[m] is tree and tree.current()


@pytest.mark.parametrize("change", ["setattr", "container", "direct", "delete", "dict", "param", "tied", "new param"])
def test_a_changed_model_is_walked_again(change: str) -> None:
    """Every way of changing the module tree between two blocks: the second block sees the new tree (every current
    module in eval mode, every current parameter frozen) and restores it; what left the tree is not touched."""
    from mlaudit.query import modes

    m = net()
    with evaluating(m, requires_grad=False):  # caches m's tree
        pass
    gone: nn.Module | nn.Parameter | None = None
    if change == "setattr":
        gone, m[3] = m[3], nn.Linear(4, 2).train()
    elif change == "container":
        m.append(nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 2)).train())
    elif change == "direct":  # as torch.ao.quantization's convert swaps modules: no registration hook runs
        gone, m._modules["2"] = m._modules["2"], nn.Dropout(0.3).train()
    elif change == "delete":
        gone = m[2]
        del m[2]
    elif change == "dict":  # the dict itself replaced, same keys, one value new
        mods = dict(m._modules)
        gone, mods["0"] = mods["0"], nn.Linear(4, 4).train()
        m._modules = mods  # type: ignore[assignment]
    elif change == "param":
        gone, m[0].weight = m[0].weight, nn.Parameter(torch.randn(4, 4))
    elif change == "tied":
        gone, m[0].bias = m[0].bias, m[3].bias
    elif change == "new param":
        m[2].register_parameter("scale", nn.Parameter(torch.ones(1)))
    before = state(m)
    gone_flags = None if gone is None else (gone.training if isinstance(gone, nn.Module) else gone.requires_grad)
    modes_in, grads_in = _guarded_state(m)
    assert not any(modes_in) and not any(grads_in)  # the new tree: all in eval mode, all frozen
    assert state(m) == before  # and restored
    assert modes._TREES[m].current() and modes._TREES[m].mods == list(m.modules())
    assert [id(p) for p in modes._TREES[m].params] == [id(p) for p in m.parameters()]
    if gone is not None:  # what left the tree kept its flag throughout
        assert gone_flags == (gone.training if isinstance(gone, nn.Module) else gone.requires_grad)


def test_flags_changed_between_blocks_are_read_again() -> None:
    m = net()
    with evaluating(m, requires_grad=False):
        pass
    m.eval()  # every module now in eval mode
    m[0].weight.requires_grad_(False)
    m[3].weight.requires_grad_(True)
    before = state(m)
    with evaluating(m, requires_grad=False):
        assert not any(state(m)[0]) and not any(state(m)[1])
    assert state(m) == before
    m.train()
    with training(m, requires_grad=True):
        assert all(state(m)[0]) and all(state(m)[1])
    assert state(m)[0] == [True] * len(before[0]) and state(m)[1] == before[1]


def test_changes_inside_the_block_are_restored_and_the_next_block_is_right() -> None:
    m = net()
    before = state(m)
    with evaluating(m, requires_grad=False):
        m[1].train()  # the block itself flips a flag: restored on exit like any other
        m[3].weight.requires_grad_(True)
    assert state(m) == before
    extra = nn.Linear(2, 2).train()
    with evaluating(m, requires_grad=False):
        m.append(extra)  # a module added inside the block: the entry did not see it, the next entry does
    assert extra.training and extra.weight.requires_grad
    assert not any(_guarded_state(m)[0])


def test_a_guard_of_several_models_sharing_a_parameter() -> None:
    shared = nn.Linear(3, 3)
    a, b = nn.Sequential(shared, nn.ReLU()).train(), nn.Sequential(nn.Linear(3, 3), shared).train()
    before = (state(a), state(b))
    for _ in range(2):  # the second time from the cache
        with evaluating(a, b, requires_grad=False):
            assert not any(state(a)[0] + state(b)[0]) and not any(state(a)[1] + state(b)[1])
        assert (state(a), state(b)) == before
