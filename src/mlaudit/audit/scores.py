"""Canary scores for the distinguishing game (low = "trained with the canary"):

``loss``      black box: the final model's cross-entropy on (canary x, canary label) (input canaries).
``gradient``  white box: the parameter update projected on the canary's direction,
              <theta_T - theta_0, u>, where theta_0 is the model's initialisation (known to the
              auditor: it is part of mlaudit's seeded training) and u = e_j for the Dirac canary,
              or u = g / ||g|| with g the gradient of the canary's loss at theta_0 for an input
              canary. For the Dirac canary this is the sum of the per-step updates along j.

A one-run audit (:mod:`mlaudit.audit.one_run`) scores many canaries of one model:
:func:`canary_losses` (black box) and :func:`input_update_scores` (white box, the same statistic as
``gradient`` for input canaries); also low = "in".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..query import ParamVector, forward_batched, param_grad
from ..train.hooks import GradientCanary
from .canaries import Canary, ModelFn, per_example_grad_chunks


def canary_loss(model: nn.Module, canary: Canary, *, device: str = "cpu") -> float:
    """Black-box score: the model's cross-entropy loss on (canary x, canary label), in eval mode."""
    logits = forward_batched(model.to(device), canary.x, device=device)
    return float(nn.functional.cross_entropy(logits.float(), torch.tensor([canary.y], device=device)))


def update_scores(model_fn: ModelFn, seeds: Sequence[int], load: Callable[[int], dict[str, Tensor]],
                  canary: Canary, *, device: str | torch.device = "cpu") -> np.ndarray:
    """White-box score of each model i: <theta_T - theta_0, u_i> (see the module docstring), with
    theta_0 the initialisation of ``seeds[i]`` (as mlaudit's training draws it) and theta_T =
    ``load(i)`` (a state_dict); u_i = e_j for the gradient canary, else the unit gradient of the
    canary's cross-entropy at theta_0. Returns float64 [M]."""
    from ..train.loop import init_models  # lazy: the training loop imports the privacy package

    dev = torch.device(device)
    out = np.empty(len(seeds))
    for i, seed in enumerate(seeds):
        m0 = init_models(model_fn, [int(seed)])[0].to(dev).eval()
        final = load(i)
        theta0 = ParamVector.from_module(m0, trainable_only=False, clone=False)
        if canary.gradient is not None:
            name, j = canary.gradient.parameter, canary.gradient.coordinate
            out[i] = float(final[name].flatten()[j].double() - theta0[name].cpu().flatten()[j].double())
            continue
        g = param_grad(m0, (canary.x.to(dev), torch.tensor([canary.y], device=dev)), params=theta0).to(torch.float64)
        step = ParamVector({n: final[n].to(dev) for n in theta0}).to(torch.float64) - theta0.to(torch.float64)
        out[i] = float(step.dot(g) / g.norm().clamp_min(1e-30))
    return out


def canary_losses(logits: Tensor, y: Tensor) -> np.ndarray:
    """Black-box scores of many canaries: per-canary cross-entropy from logits [..., m, C] and labels
    y [m] -> float64 [..., m]."""
    lg = logits.float()
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.to(lg.device).expand(*lg.shape[:-1]).reshape(-1),
                                     reduction="none")
    return ce.reshape(lg.shape[:-1]).double().cpu().numpy()


def dirac_update_scores(model_fn: ModelFn, seed: int, final: dict[str, Tensor], canaries: Sequence[GradientCanary], *,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """White-box scores of ONE model on m Dirac canaries: theta_T[j] - theta_0[j] at each canary's
    (parameter, coordinate) j, with theta_0 the initialisation of ``seed`` as mlaudit's training draws it
    and theta_T = ``final`` (a state_dict): the sum of the per-step updates along j, lower (more negative)
    when the canary's C e_j was in the steps. Returns float64 [m]."""
    from ..train.loop import init_models  # lazy: the training loop imports the privacy package

    m0 = init_models(model_fn, [int(seed)])[0]
    start = dict(m0.named_parameters())
    out = [float(final[c.parameter].detach().cpu().double().flatten()[c.coordinate])
           - float(start[c.parameter].detach().cpu().double().flatten()[c.coordinate]) for c in canaries]
    return np.asarray(out, dtype=np.float64)


def input_update_scores(model_fn: ModelFn, seed: int, final: dict[str, Tensor], x: Tensor, y: Tensor, *,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """White-box scores of ONE model on many input canaries x [m, *shape], y [m]: <theta_T - theta_0, g_i>
    / ||g_i|| per canary i, with theta_0 the initialisation of ``seed`` (as mlaudit's training draws it),
    theta_T = ``final`` (a state_dict) and g_i the per-example gradient of canary i's cross-entropy at
    theta_0 (train mode, as DP-SGD computes it). The statistic of :func:`update_scores` for input
    canaries, for m canaries at once. Returns float64 [m]."""
    from ..train.loop import init_models  # lazy: the training loop imports the privacy package

    dev = torch.device(device)
    m0 = init_models(model_fn, [int(seed)])[0].to(dev)
    step = torch.cat([(final[n].to(dev, torch.float64) - p.detach().double()).flatten()
                      for n, p in m0.named_parameters()])
    out = []
    for grads in per_example_grad_chunks(m0, x, y, device=dev):
        g = torch.cat([t.flatten(1) for t in grads], 1).double()
        out.append((g @ step) / g.norm(dim=1).clamp_min(1e-30))
    return torch.cat(out).cpu().numpy()
