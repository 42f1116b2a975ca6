"""Canary scores for the distinguishing game (low = "trained with the canary"):

``loss``      black box: the final model's cross-entropy on (canary x, canary label) (input canaries).
``gradient``  white box: the parameter update projected on the canary's direction,
              <theta_T - theta_0, u>, where theta_0 is the model's initialisation (known to the
              auditor: it is part of mlaudit's seeded training) and u = e_j for the Dirac canary,
              or u = g / ||g|| with g the gradient of the canary's loss at theta_0 for an input
              canary. For the Dirac canary this is the sum of the per-step updates along j.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..query import ParamVector, forward_batched, param_grad
from .canaries import Canary, ModelFn


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
