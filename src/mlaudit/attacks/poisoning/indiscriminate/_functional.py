"""Functional helpers of the indiscriminate attacks: losses and *mean* gradients of a model over a
dataset at given parameters, through :func:`torch.func.functional_call`, in chunks (so a full
training set fits in memory).

Parameters are :class:`~mlaudit.query.ParamVector` of the model's trainable parameters
(``ParamVector.from_module``; flat-vector algebra: ``dot``, ``norm``, ``+``, ``*``); the model's own
weights and ``.grad`` are never touched. The model is used in eval mode; the attacks that need
gradients refuse BatchNorm models (:func:`require_smooth`), for which train and eval mode differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ....errors import ConfigError, UnsupportedModelError
from ....models.registry import has_batchnorm
from ....query import ParamVector, evaluating, forward_batched, loss_and_grad


def require_smooth(model: nn.Module, method: str) -> None:
    """Refuse models whose training loss is not a sum of per-example losses of the parameters.

    BatchNorm in training mode normalises each example with its mini-batch's statistics, so the
    training gradient of a set of points is not the sum of per-point gradients and a target model
    (with its running statistics) is not a stationary point of any fixed loss: gradient canceling
    (seed 001, reachability ``g(mu) + eps_d g(nu) = 0``) and the parameter corruption that makes its
    target are undefined. Piecewise-smooth nets (ReLU, max-pool) are fine: their gradients exist
    almost everywhere, as in seed 001's NN and CNN rows.
    """
    if has_batchnorm(model):
        raise UnsupportedModelError(
            f"{method} needs a model without BatchNorm (its training gradient is not a sum of per-example "
            "gradients, so model-poisoning reachability is undefined); use model norm: none or group")


def per_sample_loss(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
                    label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy per example at ``params``: x [B, *shape], y [B] -> [B] (differentiable)."""
    logits = functional_call(model, dict(params), (x,))
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)


def mean_loss_and_grad(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
                       label_smoothing: float = 0.0, chunk_size: int = 1024) -> tuple[float, ParamVector]:
    """Mean loss over (x [N, ...], y [N]) and its gradient w.r.t. ``params`` (detached), chunked."""
    n = x.shape[0]
    total = torch.zeros((), device=x.device)
    grads = ParamVector(params).zeros_like()
    with evaluating(model):
        for i in range(0, n, chunk_size):
            xc, yc = x[i:i + chunk_size], y[i:i + chunk_size]
            loss, g = loss_and_grad(model, lambda f, xc=xc, yc=yc: F.cross_entropy(
                f(xc), yc, reduction="none", label_smoothing=label_smoothing).sum() / n, params=params)
            grads = grads + g
            total += loss
    return float(total), grads


def mean_loss(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
              chunk_size: int = 1024) -> float:
    """Mean cross-entropy over (x, y) at ``params`` (no gradient)."""
    logits = forward_batched(model, x, batch_size=chunk_size, device=x.device, params=params)
    total = sum(float(F.cross_entropy(lc, yc, reduction="none").sum())  # per chunk, as the sums always were
                for lc, yc in zip(logits.split(chunk_size), y.split(chunk_size), strict=True))
    return total / max(x.shape[0], 1)


def num_poisons(eps_d: float, n_clean: int) -> int:
    """P = round(eps_d * N); a ConfigError when that is zero (eps_d too small for this N)."""
    if not eps_d > 0 or not math.isfinite(eps_d):
        raise ConfigError(f"eps_d (poison fraction |nu|/|mu|) must be a positive number, got {eps_d}")
    p = int(round(eps_d * n_clean))
    if p < 1:
        raise ConfigError(f"eps_d = {eps_d} of {n_clean} training examples rounds to 0 poison points; "
                          f"use eps_d >= 1/N = {1 / n_clean:.3g}")
    return p


def sample_rows(n: int, p: int, generator: torch.Generator) -> Tensor:
    """p row indices of [0, n): without replacement, cycling through fresh permutations when p > n."""
    perms = [torch.randperm(n, generator=generator) for _ in range(-(-p // n))]
    return torch.cat(perms)[:p]
