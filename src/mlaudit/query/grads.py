"""Gradients of a loss with respect to a model's parameters, as :class:`~mlaudit.query.params.ParamVector`.

    g = param_grad(model, (x, y))                                   # grad of mean CE(model(x), y)
    g = param_grad(model, lambda f: loss(f(x), y).sum(), create_graph=True)  # any loss; differentiable
    value, g = loss_and_grad(model, (x, y), params=w)               # at parameter values w, not the model's

The gradient is taken at detached copies-by-alias of the parameters (``functional_call``), so the
model's own ``.grad`` are never touched and its weights never change. The model's mode is the
caller's: wrap a call in :func:`~mlaudit.query.modes.evaluating` for eval-mode gradients (BatchNorm
with its running statistics).

Per-example gradients of many models at once, for DP-SGD, are
:func:`mlaudit.privacy.dpsgd.per_example_grads` (stacked over models with a double ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .params import ParamVector

Forward = Callable[[Tensor], Tensor]
"""The model's forward at the differentiated parameters: x [B, *shape] -> logits [B, C]."""
LossFn = Callable[[Forward], Tensor]
"""``loss(forward) -> scalar``: computes the loss with ``forward`` (so the gradient reaches the parameters)."""
Loss = LossFn | tuple[Tensor, Tensor]


def loss_and_grad(model: nn.Module, loss: Loss, *, params: Mapping[str, Tensor] | None = None,
                  create_graph: bool = False) -> tuple[Tensor, ParamVector]:
    """The loss (a 0-dim tensor) and its gradient w.r.t. parameters.

    Args:
        model: the network; its parameters not in ``params`` (and its buffers) are used as they are.
        loss: ``(x [B, *shape], y [B] int64)`` for the mean cross-entropy
            ``F.cross_entropy(model(x).float(), y)``, or a function ``loss(forward) -> scalar`` that
            computes any loss through ``forward`` (the model at the differentiated parameters).
        params: {name: tensor} values to differentiate at (e.g. a ParamVector); None: the model's
            trainable parameters (``requires_grad=True``). The gradient has the same names.
        create_graph: keep the graph of the gradient, so that a function of it can be differentiated
            again (w.r.t. inputs the loss used: Witches' Brew, gradient canceling). Without it the
            loss and the gradient are detached.

    Returns:
        ``(loss value [], gradient ParamVector {name: [*shape]})``.
    """
    base = params if params is not None else ParamVector.from_module(model, clone=False)
    leaves = {k: v.detach().requires_grad_(True) for k, v in base.items()}

    def forward(x: Tensor) -> Tensor:
        return functional_call(model, leaves, (x,))

    with torch.enable_grad():  # callers may query under no_grad (craft evaluates its final objective so)
        if callable(loss):
            value = loss(forward)
        else:
            x, y = loss
            value = F.cross_entropy(forward(x).float(), y)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=create_graph)
    if not create_graph:
        value = value.detach()
    return value, ParamVector(zip(leaves, grads, strict=True))


def param_grad(model: nn.Module, loss: Loss, *, params: Mapping[str, Tensor] | None = None,
               create_graph: bool = False) -> ParamVector:
    """The gradient of ``loss`` w.r.t. the parameters: {name: [*shape]} (see :func:`loss_and_grad`)."""
    return loss_and_grad(model, loss, params=params, create_graph=create_graph)[1]
