"""Gradient-based parameter corruption, GradPC (Sun et al., "Exploring the vulnerability of deep
neural networks: a study of parameter corruption", AAAI 2021; seed 001, "Parameter Corruption vs.
Data Poisoning"):

    max_{||w - w_c||_2 <= eps_w}  F(mu; w),      F(mu; w) = (1/N) sum_i CE(f(x_i; w), y_i),

solved by projected, normalised gradient ascent from the clean parameters w_c:

    w <- Proj_{B(w_c, eps_w)}( w + lr * eps_w * grad F(mu; w) / ||grad F(mu; w)|| ),

where ``||.||`` is the l2 norm over *all* trainable parameters seen as one vector. ``steps=1,
lr=1`` is Sun et al.'s first-order corruption ``w_c + eps_w grad F / ||grad F||``; more steps follow the
loss further inside the ball. The iterate with the highest (full-batch) training loss is returned.

Threat model: white-box write access to the weights (less practical than poisoning; seed 001 uses the
corrupted model as the *target* of gradient canceling, :mod:`.gradient_canceling`). Shapes: x
[N, *shape] float32, y [N] int64. The model is used in eval mode and must not contain BatchNorm.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import ParamVector
from ._functional import mean_loss, mean_loss_and_grad, require_smooth


@dataclass
class CorruptionResult:
    """``model``: a corrupted copy (eval mode, same device); ``distance`` ||w - w_c||_2 (<= eps_w);
    clean and corrupted training losses; the training loss before each step (``history``)."""

    model: nn.Module
    distance: float
    loss_clean: float
    loss_corrupted: float
    history: list[float] = field(default_factory=list)


def gradpc(model: nn.Module, x: Tensor, y: Tensor, *, eps_w: float, steps: int = 50, lr: float = 0.1,
           batch_size: int | None = None, chunk_size: int = 1024, generator: torch.Generator | None = None
           ) -> CorruptionResult:
    """Maximise the training loss within ``||w - w_c|| <= eps_w`` (see the module docstring).

    ``lr`` is the step length as a fraction of ``eps_w``. ``batch_size`` None uses the full training
    set for every gradient (exact ascent); an int draws a random mini-batch per step (``generator``).
    The returned model is the best iterate by the full training loss.
    """
    if not eps_w > 0:
        raise ConfigError(f"eps_w must be > 0 (the l2 radius of the corruption), got {eps_w}")
    if steps < 1 or not lr > 0:
        raise ConfigError(f"gradpc needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
    require_smooth(model, "parameter corruption (GradPC)")
    w_c = ParamVector.from_module(model)
    w = w_c.map(torch.clone)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = x.shape[0]
    loss_clean = mean_loss(model, w_c, x, y, chunk_size=chunk_size)
    best, best_loss, history = w, loss_clean, []
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            loss, g = mean_loss_and_grad(model, w, x, y, chunk_size=chunk_size)
        else:
            idx = torch.randperm(n, generator=gen)[:batch_size].to(x.device)
            loss, g = mean_loss_and_grad(model, w, x[idx], y[idx], chunk_size=chunk_size)
            loss = mean_loss(model, w, x, y, chunk_size=chunk_size)
        history.append(loss)
        if loss > best_loss:
            best, best_loss = w, loss
        gn = g.norm()
        if not gn > 0:
            break
        w = _project(lr * eps_w / gn * g + w, w_c, eps_w)
    final = mean_loss(model, w, x, y, chunk_size=chunk_size)
    if final > best_loss:
        best, best_loss = w, final
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        named = dict(out.named_parameters())
        for k, v in best.items():
            named[k].copy_(v)
    dist = float((best - w_c).norm())
    return CorruptionResult(out, dist, loss_clean, best_loss, history)


def _project(w: ParamVector, center: ParamVector, radius: float) -> ParamVector:
    """Euclidean projection of ``w`` onto the ball of ``radius`` around ``center`` (one flat vector)."""
    d = w - center
    r = float(d.norm())
    if r <= radius:
        return w
    return radius / r * d + center
