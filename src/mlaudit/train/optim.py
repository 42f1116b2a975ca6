"""Functional optimizers over *stacked* parameters (leading dim K = number of models).

The batched trainer keeps K models' parameters as tensors of shape [K, *param_shape] and updates
them in place with `torch._foreach_*` ops, so one step of K models costs a handful of fused kernels.
The updates follow PyTorch's definitions exactly, elementwise, so a stack of K models gets the same
update as K separate models:

* SGD (momentum mu, dampening 0, weight decay lambda added to the gradient, optional Nesterov):
  g <- g + lambda w;  b <- mu b + g;  d = g + mu b (Nesterov) or b;  w <- w - lr d.
* Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient (torch.optim.Adam semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..registry import Registry
from .recipe import Recipe


class StackedOptimizer(Protocol):
    """Updates stacked parameters in place, given their gradients and the current learning rate."""

    def step(self, grads: list[Tensor], lr: float) -> None: ...


@dataclass
class StackedSGD:
    """SGD with momentum / Nesterov / L2 weight decay over stacked params (torch.optim.SGD semantics)."""

    params: list[Tensor]
    momentum: float
    nesterov: bool
    weight_decay: float
    buffers: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: float) -> None:
        """Update ``params`` in place from ``grads`` (same shapes) at learning rate ``lr``."""
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            if self.buffers is None:
                self.buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads)
            grads = torch._foreach_add(grads, self.buffers, alpha=self.momentum) if self.nesterov else self.buffers
        torch._foreach_add_(self.params, grads, alpha=-lr)


@dataclass
class StackedAdam:
    """Adam with L2 weight decay over stacked params (torch.optim.Adam semantics, amsgrad off)."""

    params: list[Tensor]
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    t: int = 0
    m: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: float) -> None:
        """Update ``params`` in place from ``grads`` (same shapes) at learning rate ``lr``."""
        b1, b2 = self.betas
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if not self.m:
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]
        self.t += 1
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        bc1 = 1 - b1**self.t
        bc2 = 1 - b2**self.t
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr / bc1)


OPTIMIZERS: Registry[Callable[[Recipe, list[Tensor]], StackedOptimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(recipe: Recipe, params: list[Tensor]) -> StackedSGD:
    return StackedSGD(params, recipe.momentum, recipe.nesterov, recipe.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(recipe: Recipe, params: list[Tensor]) -> StackedAdam:
    return StackedAdam(params, recipe.weight_decay)


def make_optimizer(recipe: Recipe, params: list[Tensor]) -> StackedOptimizer:
    """The stacked optimizer ``recipe.optimizer`` names, over ``params`` (each [K, *shape])."""
    return OPTIMIZERS.get(recipe.optimizer)(recipe, params)
