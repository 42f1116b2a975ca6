"""Inverting Gradients (Geiping, Bauermeister, Droege & Moeller, "Inverting Gradients - How easy is it to
break privacy in federated learning?", NeurIPS 2020): an honest-but-curious server recovers the inputs
behind an update by minimising

    1 - cos(grad_theta L(x, y), g*) + tv * TV(x)

over x in the data's pixel box, with Adam on the sign of the gradient and a step-decayed learning rate
(at 3/8, 5/8 and 7/8 of the steps), from random starts, keeping the restart with the lowest objective
(the paper's choices; it runs thousands of steps, with restarts). The
optimisation is :func:`mlaudit.craft.craft` on the :class:`GradientInversion` objective; labels are
given, or recovered from the last layer (:mod:`.labels`: iDLG for one input, counts for a batch).

    rec = inverting_gradients(model, obs, steps=2000, tv=1e-4, box=(0, 1))
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ...craft import Box, craft
from .base import Observation, Reconstruction, check_observation, register_federated
from .labels import label_counts, labels_from_counts
from .objective import GradientInversion


def recover_labels(model: nn.Module, obs: Observation, labels: Tensor | None,
                   mean_probs: Tensor | None) -> tuple[Tensor, bool]:
    """(labels [n] on the update's device, whether they were recovered rather than given); checks first
    that the update fits the model."""
    check_observation(model, obs)
    device = next(iter(obs.grad.values())).device
    if labels is not None:
        return labels.to(device=device, dtype=torch.long), False
    return labels_from_counts(label_counts(model, obs, mean_probs=mean_probs)).to(device), True


@register_federated("inverting-gradients")
def inverting_gradients(model: nn.Module, obs: Observation, *, labels: Tensor | None = None, steps: int = 2000,
                        lr: float = 0.1, tv: float = 1e-4, restarts: int = 1, box: tuple[float, float] = (0.0, 1.0),
                        optimizer: Literal["signed-adam", "adam"] = "signed-adam",
                        mean_probs: Tensor | None = None, generator: torch.Generator | None = None) -> Reconstruction:
    """Candidates [obs.inputs, *shape] for the inputs behind ``obs`` (cosine matching + TV prior).

    ``labels`` [n]: known labels (else recovered from the last layer, with ``mean_probs`` the model's mean
    softmax on public data for the batch counts); ``lr`` in pixel units of ``box``. ``tv``: the default 1e-4
    suits small inputs (8x8 digits: a stronger prior blurs them, the tests fail with 0.1); for 32x32 natural
    images use about 0.1: next to breaching's invertinggradients on the same CIFAR-10 (JPEG) updates (ConvNet,
    2000 steps, CPU, 2026-12-03, benchmarks/results/federated_breaching_*.md) a user batch of 4 came back at
    9.6 dB with 1e-4, 12.1 dB with 0.1 and 12.2 dB with breaching; one image at 11.3 dB either way (breaching
    11.0)."""
    y, recovered = recover_labels(model, obs, labels, mean_probs)
    objective = GradientInversion(model, obs, y, distance="cosine", tv=tv)
    x0 = torch.full((obs.inputs, *obs.input_shape), float(box[0]), device=y.device)
    res = craft(objective, x0, constraint=Box(box), steps=steps, optimizer=optimizer, lr=lr, schedule="step",
                restarts=restarts, init="random", generator=generator)
    return Reconstruction((x0 + res.delta).detach(), y, {
        "objective": res.objective, "restarts": res.restarts, "labels_recovered": recovered, "steps": steps,
        "tv": tv, "lr": lr, "optimizer": optimizer})
