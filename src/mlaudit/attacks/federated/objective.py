"""Gradient matching for input recovery, as an objective of the one crafting engine.

    obj = GradientInversion(model, obs, labels, distance="cosine", tv=1e-4)     # Inverting Gradients
    res = craft(obj, x0, constraint=Box((0, 1)), steps=2000, optimizer="signed-adam", lr=0.1, init="random")
    x_hat = x0 + res.delta

The variable is the batch of candidate inputs x [n, *shape] behind the observed update; the objective
simulates the update they would produce (:meth:`Observation.simulate`, a parameter gradient taken with
``create_graph`` so that it can be differentiated again w.r.t. x: double backprop) and measures its
distance to the observed one:

* ``cosine``: 1 - <g(x), g*> / (||g(x)|| ||g*||) over all parameters jointly (Geiping et al. 2020, eq. 4);
* ``l2``: ||g(x) - g*||^2 (Zhu et al. 2019, DLG, eq. 2);

plus ``tv`` times the total variation of x (Geiping et al.'s image prior; 0 for vectors). With
``soft_labels`` the labels are optimised too (DLG): the variable is [n, D + C], each row a flattened
input followed by C label logits, under :class:`BoxThenFree` (the pixel box on the input part, no
constraint on the logits); :meth:`split` takes it apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ...craft.constraints import Box, _rand
from ...errors import ConfigError
from .base import Observation, check_observation, total_variation

Distance = Literal["cosine", "l2"]


class GradientInversion:
    """Objective ``(x [n, ...], idx) -> scalar`` (see the module docstring); ``labels`` int [n] when they
    are known or recovered, None with ``soft_labels`` (then ``num_classes`` is needed)."""

    def __init__(self, model: nn.Module, obs: Observation, labels: Tensor | None, *, distance: Distance = "cosine",
                 tv: float = 0.0, soft_labels: bool = False, num_classes: int | None = None) -> None:
        check_observation(model, obs)
        if distance not in ("cosine", "l2"):
            raise ConfigError(f"distance {distance!r}; allowed: cosine, l2")
        if not (math.isfinite(tv) and tv >= 0):
            raise ConfigError(f"tv = {tv}; allowed tv >= 0")
        if soft_labels and num_classes is None:
            raise ConfigError("soft_labels needs num_classes")
        if not soft_labels and (labels is None or labels.shape != (obs.inputs,)):
            raise ConfigError(f"labels must be int [{obs.inputs}] (one per input behind the update), got "
                              f"{None if labels is None else list(labels.shape)}")
        self.model, self.obs, self.distance, self.tv = model, obs, distance, tv
        self.soft, self.classes = soft_labels, num_classes or 0
        self.dim = math.prod(obs.input_shape)
        device = next(iter(obs.grad.values())).device
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long)
        self.target = obs.grad.detach()
        self.target_norm = self.target.norm()
        if float(self.target_norm) == 0:
            raise ConfigError("the observed update is zero: nothing to invert")

    def split(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """The variable [n, *shape] (or [n, D + C] with soft labels) -> (inputs [n, *shape], labels)."""
        if not self.soft:
            assert self.labels is not None
            return v, self.labels[: len(v)]
        x = v[:, : self.dim].reshape(len(v), *self.obs.input_shape)
        return x, torch.softmax(v[:, self.dim:], 1)

    def __call__(self, v: Tensor, idx: Tensor) -> Tensor:
        if len(v) != self.obs.inputs:
            raise ConfigError(f"gradient inversion optimises all {self.obs.inputs} inputs of the update jointly; "
                              f"got a batch of {len(v)} (leave craft's batch_size unset)")
        x, y = self.split(v)
        g = self.obs.simulate(self.model, x, y)
        if self.distance == "cosine":
            d = 1 - g.dot(self.target) / (g.norm() * self.target_norm).clamp_min(1e-12)
        else:
            diff = g - self.target
            d = diff.dot(diff)
        return d + self.tv * total_variation(x) if self.tv else d


@dataclass(frozen=True)
class BoxThenFree(Box):
    """The pixel ``box`` on the first ``split`` coordinates of each row of [n, D + C], nothing on the rest
    (DLG's label logits). Steps are absolute, as for :class:`~mlaudit.craft.constraints.Box`."""

    split: int = 0

    @torch.no_grad()
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        out = delta.clone()
        out[:, : self.split] = (x[:, : self.split] + delta[:, : self.split]).clamp(*self.box) - x[:, : self.split]
        return out

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = self.box
        d = _rand(torch.randn, x, generator)
        d[:, : self.split] = lo + _rand(torch.rand, x[:, : self.split], generator) * (hi - lo) - x[:, : self.split]
        return d
