"""Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019): an honest-but-curious server recovers
inputs and labels by minimising the squared l2 distance between the update that dummy inputs with
dummy soft labels would produce and the observed one, optimising both jointly (their Algorithm 1).

Differences from the paper: the optimiser is the crafting engine's Adam with a step-decayed rate and
the inputs are kept in the pixel box (the paper runs L-BFGS without a box); with ``soft_labels=False``
the labels are given or recovered from the last layer first (iDLG, Zhao et al. 2020).

    rec = dlg(model, obs, steps=1000, box=(0, 1))           # rec.labels: argmax of the soft labels
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ...craft import Box, craft
from .base import Observation, Reconstruction, register_federated
from .inverting_gradients import recover_labels
from .labels import last_linear
from .objective import BoxThenFree, GradientInversion


@register_federated("dlg")
def dlg(model: nn.Module, obs: Observation, *, labels: Tensor | None = None, soft_labels: bool = True,
        steps: int = 1000, lr: float = 0.1, restarts: int = 1, box: tuple[float, float] = (0.0, 1.0),
        optimizer: Literal["adam", "signed-adam"] = "adam", mean_probs: Tensor | None = None,
        generator: torch.Generator | None = None) -> Reconstruction:
    """Candidates [obs.inputs, *shape] and labels for the inputs behind ``obs`` (l2 gradient matching).

    ``soft_labels`` (default, as DLG): labels optimised jointly as logits; otherwise ``labels`` [n] or,
    when None, labels recovered from the last layer."""
    device = next(iter(obs.grad.values())).device
    n, dim = obs.inputs, math.prod(obs.input_shape)
    if soft_labels and labels is None:
        w, _ = last_linear(model)
        classes = int(dict(model.named_parameters())[w].shape[0])
        objective = GradientInversion(model, obs, None, distance="l2", soft_labels=True, num_classes=classes)
        v0 = torch.zeros(n, dim + classes, device=device)
        v0[:, :dim] = float(box[0])
        constraint: Box = BoxThenFree(box, split=dim)
    else:
        y, _ = recover_labels(model, obs, labels, mean_probs)
        objective = GradientInversion(model, obs, y, distance="l2")
        v0 = torch.full((n, *obs.input_shape), float(box[0]), device=device)
        constraint = Box(box)
    res = craft(objective, v0, constraint=constraint, steps=steps, optimizer=optimizer, lr=lr, schedule="step",
                restarts=restarts, init="random", generator=generator)
    x, y_out = objective.split((v0 + res.delta).detach())
    y_hat = y_out.argmax(1) if y_out.dim() == 2 else y_out
    return Reconstruction(x.detach(), y_hat.detach(), {
        "objective": res.objective, "restarts": res.restarts, "soft_labels": soft_labels and labels is None,
        "steps": steps, "lr": lr, "optimizer": optimizer})
