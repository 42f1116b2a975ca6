"""Parameter gradients (mlaudit.query.grads): equal to autograd on the module, at given parameters,
through any loss, differentiable with create_graph, and never touching the model's .grad."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlaudit.query import ParamVector, loss_and_grad, param_grad


def problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return m, torch.randn(9, 5), torch.randint(0, 3, (9,))


def test_param_grad_equals_backward_on_the_module() -> None:
    m, x, y = problem()
    F.cross_entropy(m(x), y).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    g = param_grad(m, (x, y))
    assert isinstance(g, ParamVector) and list(g) == list(ref)
    for n in ref:
        torch.testing.assert_close(g[n], ref[n])
    assert all(p.grad is None for p in m.parameters())  # the model's .grad untouched


def test_a_loss_function_frozen_parameters_and_the_value() -> None:
    m, x, y = problem()
    m[0].bias.requires_grad_(False)
    value, g = loss_and_grad(m, lambda f: F.cross_entropy(f(x), y, reduction="sum"))
    assert "0.bias" not in g and list(g) == ["0.weight", "2.weight", "2.bias"]
    torch.testing.assert_close(value, F.cross_entropy(m(x), y, reduction="sum").detach())
    assert not value.requires_grad and not any(t.requires_grad for t in g.values())


def test_at_given_parameters_the_module_is_unchanged() -> None:
    m, x, y = problem()
    other, _, _ = problem(seed=1)
    w = ParamVector.from_module(other)
    before = ParamVector.from_module(m)
    g = param_grad(m, (x, y), params=w)
    torch.testing.assert_close(g.dot(g), param_grad(other, (x, y)).dot(param_grad(other, (x, y))))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_create_graph_differentiates_through_the_gradient() -> None:
    m, x, y = problem()
    xr = x.clone().requires_grad_(True)
    g = param_grad(m, lambda f: F.cross_entropy(f(xr), y), create_graph=True)
    (gx,) = torch.autograd.grad(g.norm() ** 2, xr)  # d/dx ||grad_w L(x)||^2, the shape of gradient matching
    params = list(m.parameters())
    ref_g = torch.autograd.grad(F.cross_entropy(m(xr), y), params, create_graph=True)
    (ref,) = torch.autograd.grad(sum((t * t).sum() for t in ref_g), xr)
    torch.testing.assert_close(gx, ref)


def test_works_under_no_grad() -> None:
    m, x, y = problem()
    with torch.no_grad():
        g = param_grad(m, (x, y))
    assert float(g.norm()) > 0
