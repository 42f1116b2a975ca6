"""DataView: vectorised gather vs a naive loop, validation errors, immutability, composition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.data.base import TensorDataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError, DataError

SHAPE = (1, 2, 3)
CLASSES = ("a", "b", "c")


def make_base(n: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g), CLASSES)


def bounded_delta(base: TensorDataset, idx: torch.Tensor, eps: float, seed: int = 1) -> torch.Tensor:
    """A random delta with |delta| <= eps that keeps base.x[idx] + delta in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = base.x[idx]
    raw = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    return (x + raw).clamp(0, 1) - x


def naive_gather(view: DataView, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one example at a time, straight from the definitions."""
    n = len(view.base)
    xs, ys = [], []
    for i in idx.tolist():
        x = (view.base.x[i] if i < n else view.inserted_x[i - n]).clone()
        y = int(view.base.y[i]) if i < n else int(view.inserted_y[i - n])
        for k, j in enumerate(view.indices.tolist()):
            if j == i:
                x = x + view.delta[k]
        for k, j in enumerate(view.relabel_indices.tolist()):
            if j == i:
                y = int(view.relabel_to[k])
        xs.append(x)
        ys.append(y)
    return torch.stack(xs) if xs else torch.zeros(0, *view.shape), torch.tensor(ys, dtype=torch.int64)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12), n_ins=st.integers(0, 4), seed=st.integers(0, 10_000), data=st.data(),
)
def test_gather_matches_naive_reference(n: int, n_ins: int, seed: int, data: st.DataObject) -> None:
    base = make_base(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    p = data.draw(st.integers(0, n))
    idx = torch.randperm(n, generator=g)[:p]
    eps = data.draw(st.floats(0.0, 0.3))
    view = DataView.from_delta(base, idx, bounded_delta(base, idx, eps, seed), eps=eps)
    if n_ins:
        view = view.with_inserted(torch.rand(n_ins, *SHAPE, generator=g), torch.randint(0, 3, (n_ins,), generator=g))
    total = n + n_ins
    r = data.draw(st.integers(0, total))
    view = view.with_labels(torch.randperm(total, generator=g)[:r], torch.randint(0, 3, (r,), generator=g))
    batch = torch.tensor(data.draw(st.lists(st.integers(0, max(total - 1, 0)), max_size=10 if total else 0)),
                         dtype=torch.int64)
    x, y = view.gather(batch)
    rx, ry = naive_gather(view, batch)
    assert x.shape == (batch.numel(), *SHAPE) and y.dtype == torch.int64
    assert torch.equal(x, rx)
    assert torch.equal(y, ry)


def test_identity_gathers_the_base() -> None:
    base = make_base(7)
    view = DataView.identity(base)
    x, y = view.gather(torch.tensor([6, 0, 3, 3]))
    assert torch.equal(x, base.x[[6, 0, 3, 3]]) and torch.equal(y, base.y[[6, 0, 3, 3]])
    assert len(view) == view.num_total == 7
    assert view.changed_indices().numel() == 0


def test_eps_violation_names_index() -> None:
    base = TensorDataset(torch.full((6, *SHAPE), 0.5), torch.zeros(6, dtype=torch.int64), CLASSES)
    delta = torch.zeros(2, *SHAPE)
    delta[1, 0, 1, 2] = 0.1
    with pytest.raises(DataError, match=r"index 5 .*0\.1.*eps = 0\.05"):
        DataView.from_delta(base, [2, 5], delta, eps=0.05)
    DataView.from_delta(base, [2, 5], delta, eps=0.1)  # on the boundary is allowed
    DataView.from_delta(base, [2, 5], delta, eps=None)  # unbounded


def test_nan_delta_rejected() -> None:
    base = TensorDataset(torch.full((3, *SHAPE), 0.5), torch.zeros(3, dtype=torch.int64), CLASSES)
    delta = torch.zeros(1, *SHAPE)
    delta[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="index 1"):
        DataView.from_delta(base, [1], delta, eps=None)


def test_box_violation_names_index_and_value_and_is_not_clamped() -> None:
    x = torch.full((4, *SHAPE), 0.5)
    x[2, 0, 0, 0] = 0.9
    base = TensorDataset(x, torch.zeros(4, dtype=torch.int64), CLASSES)
    with pytest.raises(DataError, match=r"index 2 .*1\.1"):
        DataView.from_delta(base, [2], torch.full((1, *SHAPE), 0.2), eps=0.25)
    with pytest.raises(DataError, match=r"index 4 .*-0\.5"):
        DataView.identity(base).with_inserted(torch.full((1, *SHAPE), -0.5), [0])


def test_invalid_inputs_rejected() -> None:
    base = make_base(5)
    zero = torch.zeros(2, *SHAPE)
    with pytest.raises(DataError, match="unique"):
        DataView.from_delta(base, [1, 1], zero, eps=0.1)
    with pytest.raises(DataError, match=r"\[0, 4\]"):
        DataView.from_delta(base, [1, 5], zero, eps=0.1)
    with pytest.raises(DataError, match="shape"):
        DataView.from_delta(base, [1, 2], torch.zeros(2, 3), eps=0.1)
    with pytest.raises(ConfigError, match="eps"):
        DataView.from_delta(base, [1, 2], zero, eps=1.5)
    with pytest.raises(DataError, match="relabel_to"):
        DataView.identity(base).with_labels([0], [3])
    with pytest.raises(DataError, match="integer"):
        DataView.identity(base).with_labels(torch.tensor([0.0]), [1])
    with pytest.raises(DataError, match="inserted_y"):
        DataView.identity(base).with_inserted(torch.zeros(1, *SHAPE), [-1])
    with pytest.raises(DataError, match="gather indices"):
        DataView.identity(base).gather(torch.tensor([5]))
    with pytest.raises(DataError, match="keep mask"):
        DataView.identity(base).with_keep(torch.ones(4, dtype=torch.bool))


def test_base_never_mutated() -> None:
    base = make_base(8)
    before = base.fingerprint()
    idx = torch.tensor([1, 4, 6])
    delta = bounded_delta(base, idx, 0.2)
    view = (DataView.from_delta(base, idx, delta, eps=0.2).with_labels([0, 4], [2, 2])
            .with_inserted(torch.rand(2, *SHAPE), [1, 1]).with_keep(torch.tensor([0, 1, 4, 8])))
    view.gather(torch.arange(10))[0].add_(1.0)  # mutating a gathered batch must not reach the base
    view.materialize().x.mul_(0.0)
    view.to("cpu").summary()
    delta.add_(5.0)  # the attack keeps editing its own tensor: the view made a copy
    assert base.fingerprint() == before
    assert float(view.delta.abs().max()) <= 0.2 + 1e-6


def test_composition() -> None:
    base = make_base(6)
    a, b = bounded_delta(base, torch.tensor([1, 2]), 0.1), bounded_delta(base, torch.tensor([2, 3]), 0.2, seed=2)
    view = DataView.from_delta(base, [1, 2], a, eps=0.1, meta={"method": "test"})
    view = view.with_delta([2, 3], b, eps=0.2)  # row 2 is replaced, row 1 kept, eps widened
    assert sorted(view.indices.tolist()) == [1, 2, 3] and view.eps == pytest.approx(0.2)
    assert torch.equal(view.gather(torch.tensor([1, 2, 3]))[0], base.x[1:4] + torch.cat([a[:1], b]))
    assert DataView.identity(base).with_delta([1], a[:1], eps=None).with_delta([2], b[:1], eps=0.2).eps is None
    assert view.with_delta([1, 2, 3], torch.zeros(3, *SHAPE), eps=0.01).eps == pytest.approx(0.01)
    view = view.with_labels([0, 5], 2).with_labels([5], [1])  # the later override wins
    view = view.with_keep(torch.tensor([True, True, False, True, True, True]))
    view = view.with_inserted(torch.rand(2, *SHAPE), [0, 2])  # virtual 6, 7, kept
    view = view.with_labels([7], [1]).with_keep(torch.tensor([0, 2, 3, 5, 6, 7]))  # AND with earlier mask
    assert view.num_total == 8 and view.num_inserted == 2
    assert view.kept_indices().tolist() == [0, 3, 5, 6, 7] and len(view) == 5
    assert view.labels[[0, 5, 6, 7]].tolist() == [2, 1, 0, 1]
    assert view.meta == {"method": "test"}
    assert view.delta_slot.tolist() == [-1, 0, 1, 2, -1, -1, -1, -1]


def test_materialize_order_and_keep() -> None:
    base = make_base(6)
    view = (DataView.identity(base).with_inserted(torch.rand(2, *SHAPE), [1, 2])
            .with_keep(torch.tensor([7, 0, 4, 6])).with_labels([4], [0]))
    ds = view.materialize()
    assert len(ds) == len(view) == 4
    assert view.kept_indices().tolist() == [0, 4, 6, 7]
    assert torch.equal(ds.x, torch.cat([base.x[[0, 4]], view.inserted_x]))
    assert ds.y.tolist() == [int(base.y[0]), 0, 1, 2]
    assert ds.classes == base.classes
    assert len(DataView.identity(base).materialize()) == 6


def test_changed_indices_and_summary() -> None:
    base = make_base(6)
    delta = bounded_delta(base, torch.tensor([1, 2]), 0.1)
    delta[1] = 0.0  # an all-zero delta is not a change
    same = int(base.y[3])
    view = (DataView.from_delta(base, [1, 2], delta, eps=0.1, meta={"method": "m"})
            .with_labels([3, 4], [same, (int(base.y[4]) + 1) % 3])  # relabel of 3 keeps its label
            .with_inserted(torch.rand(1, *SHAPE), [0]))
    assert view.changed_indices().tolist() == [1, 4, 6]
    s = view.summary()
    assert (s["num_base"], s["num_inserted"], s["num_total"], s["num_kept"]) == (6, 1, 7, 7)
    assert (s["num_perturbed"], s["num_relabelled"], s["num_changed"]) == (2, 2, 3)
    assert s["eps"] == pytest.approx(0.1) and s["max_abs_delta"] == pytest.approx(float(delta.abs().max()))
    assert s["meta"] == {"method": "m"}
    assert "perturbed=2" in repr(view)


def test_to_device_keeps_content() -> None:
    base = make_base(5)
    view = DataView.from_delta(base, [0], bounded_delta(base, torch.tensor([0]), 0.1), eps=0.1).with_keep([0, 1])
    moved = view.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.gather(torch.arange(5))[0], view.gather(torch.arange(5))[0])
    assert moved.kept_indices().tolist() == [0, 1]
