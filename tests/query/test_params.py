"""ParamVector (mlaudit.query.params): vector-space algebra over named parameters, dot / norm / cos,
from_module and zeros_like, and key checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.errors import ConfigError
from mlaudit.query import ParamVector

SHAPES = {"w": (3, 2), "b": (2,), "s": ()}


def vec(seed: int, scale: float = 1.0) -> ParamVector:
    g = torch.Generator().manual_seed(seed)
    return ParamVector({k: scale * torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()})


def flat(v: ParamVector) -> torch.Tensor:
    return torch.cat([t.flatten() for t in v.values()])


seeds = st.integers(0, 2**31 - 1)
scalars = st.floats(-10, 10, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(seeds, seeds, scalars)
def test_algebra_is_the_flat_vector_algebra(sa: int, sb: int, alpha: float) -> None:
    a, b = vec(sa), vec(sb)
    fa, fb = flat(a), flat(b)
    torch.testing.assert_close(flat(a + b), fa + fb)
    torch.testing.assert_close(flat(a - b), fa - fb)
    torch.testing.assert_close(flat(-a), -fa)
    torch.testing.assert_close(flat(a * alpha), fa * alpha)
    torch.testing.assert_close(flat(alpha * a), alpha * fa)
    torch.testing.assert_close(flat(a / 2.0), fa / 2)
    torch.testing.assert_close(a.dot(b), fa @ fb)
    torch.testing.assert_close(a.norm(), fa.norm())
    torch.testing.assert_close(a.cos(b), torch.nn.functional.cosine_similarity(fa, fb, dim=0))


@settings(max_examples=50, deadline=None)
@given(seeds, seeds, seeds, scalars, scalars)
def test_vector_space_laws(sa: int, sb: int, sc: int, alpha: float, beta: float) -> None:
    a, b, c = vec(sa), vec(sb), vec(sc)
    torch.testing.assert_close(flat((a + b) + c), flat(a + (b + c)))
    torch.testing.assert_close(flat(a + b), flat(b + a))
    torch.testing.assert_close(flat(alpha * (a + b)), flat(alpha * a + alpha * b))
    torch.testing.assert_close(a.dot(b), b.dot(a))
    torch.testing.assert_close((alpha * a + beta * b).dot(c), alpha * a.dot(c) + beta * b.dot(c))
    assert float(a.norm()) >= 0
    assert float((a + b).norm()) <= float(a.norm()) + float(b.norm()) + 1e-9  # triangle inequality
    assert -1 - 1e-12 <= float(a.cos(b)) <= 1 + 1e-12  # Cauchy-Schwarz
    torch.testing.assert_close((a * 3.0).cos(a), torch.tensor(1.0, dtype=torch.float64))
    assert float(a.zeros_like().norm()) == 0 and float(a.cos(a.zeros_like())) == 0  # eps keeps 0/0 at 0


def test_results_keep_the_left_operand_order_and_scalar_tensors_work() -> None:
    a = vec(0)
    b = ParamVector({k: a[k] for k in reversed(list(a))})  # same names, other order
    assert list(a + b) == list(a) and list(b + a) == list(b)
    s = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(flat(s * a), flat(a * 2.0))  # Tensor * ParamVector goes to __rmul__
    assert isinstance(s * a, ParamVector) and isinstance(a.to(torch.float32), ParamVector)
    assert a.to(torch.float32)["w"].dtype == torch.float32


def test_mismatched_names_are_refused_with_the_names() -> None:
    a = vec(0)
    b = ParamVector({**a, "extra": torch.zeros(1, dtype=torch.float64)})
    del b["s"]
    with pytest.raises(ConfigError, match=r"only left \['s'\], only right \['extra'\]"):
        a + b
    with pytest.raises(ConfigError, match="differ in names"):
        a.dot(b)
    with pytest.raises(ConfigError, match="dot"):
        a * a  # type: ignore[operator]


def test_from_module_copies_trainable_parameters_in_order() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    m[2].bias.requires_grad_(False)
    v = ParamVector.from_module(m)
    assert list(v) == ["0.weight", "0.bias", "2.weight"]
    assert all(not t.requires_grad for t in v.values())
    v["0.weight"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(v["0.weight"], m[0].weight)
    alias = ParamVector.from_module(m, trainable_only=False, clone=False)
    assert list(alias) == [n for n, _ in m.named_parameters()]
    assert alias["0.weight"].data_ptr() == m[0].weight.data_ptr()
    z = v.zeros_like()
    assert list(z) == list(v) and all(float(t.abs().sum()) == 0 and t.shape == v[k].shape for k, t in z.items())
    assert math.isclose(float(ParamVector().norm()), 0.0)  # the empty vector


def test_dot_gradients_match_the_per_name_sum_and_mixed_dtypes_fall_back() -> None:
    torch.manual_seed(0)
    a = ParamVector({"w": torch.randn(3, 4, requires_grad=True), "b": torch.randn(4, requires_grad=True)})
    b = ParamVector({"w": torch.randn(3, 4), "b": torch.randn(4)})
    flat_grads = torch.autograd.grad(a.dot(b) / a.norm(), list(a.values()))
    ref = sum((a[k] * b[k]).sum() for k in a) / torch.sqrt(sum((a[k] * a[k]).sum() for k in a))
    for got, want in zip(flat_grads, torch.autograd.grad(ref, list(a.values())), strict=True):
        torch.testing.assert_close(got, want)
    mixed = ParamVector({"w": b["w"].double(), "b": b["b"]})  # a float64 entry: entry by entry, promoted
    torch.testing.assert_close(a.dot(mixed), sum((a[k].double() * mixed[k].double()).sum() for k in a))
