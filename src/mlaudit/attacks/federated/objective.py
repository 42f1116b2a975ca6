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
* ``l2+l1``: ||g(x) - g*||^2 + ``l1`` ||g(x) - g*||_1 (Deng et al. 2021, TAG, eq. 3, with one weight for
  every layer);

plus ``tv`` times the total variation of x (Geiping et al.'s image prior; 0 for vectors) and ``penalty(v)``, a
regulariser of the variable (text inversion's: LAMP's embedding-length term). With
``soft_labels`` the labels are optimised too (DLG): the variable is [n, D + C], each row a flattened
input followed by C label logits, under :class:`BoxThenFree` (the pixel box on the input part, no
constraint on the logits); :meth:`split` takes it apart. Other parametrisations give ``decode``, a
function from the variable to (inputs, labels): text inversion's (:mod:`.text_inversion`) maps embeddings
to the model's inputs and soft next-token labels. ``params`` restricts the matching to some parameters'
gradients (text inversion leaves out the token embedding, whose lookup it replaces).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...craft.constraints import Box, _rand
from ...errors import ConfigError
from ...query import ParamVector
from .base import Observation, check_observation, total_variation

Distance = Literal["cosine", "l2", "l2+l1"]
DISTANCES = ("cosine", "l2", "l2+l1")


class GradientInversion:
    """Objective ``(x [n, ...], idx) -> scalar`` (see the module docstring); ``labels`` int [n] (or [n, L] for
    a sequence model) when they are known or recovered, None with ``soft_labels`` (then ``num_classes`` is
    needed) or ``decode``; ``l1`` the l1 weight of ``l2+l1``; ``params`` the names of the parameters whose
    gradients are matched (None: all); ``penalty`` a scalar function of the variable added to the distance."""

    def __init__(self, model: nn.Module, obs: Observation, labels: Tensor | None, *, distance: Distance = "cosine",
                 tv: float = 0.0, soft_labels: bool = False, num_classes: int | None = None, l1: float = 0.0,
                 decode: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                 params: Iterable[str] | None = None, penalty: Callable[[Tensor], Tensor] | None = None) -> None:
        check_observation(model, obs)
        if distance not in DISTANCES:
            raise ConfigError(f"distance {distance!r}; allowed: {', '.join(DISTANCES)}")
        for name, value in (("tv", tv), ("l1", l1)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} = {value}; allowed {name} >= 0")
        if soft_labels and num_classes is None:
            raise ConfigError("soft_labels needs num_classes")
        if not soft_labels and decode is None and (labels is None or labels.dim() < 1 or len(labels) != obs.inputs):
            raise ConfigError(f"labels must be int [{obs.inputs}] (one per input behind the update), got "
                              f"{None if labels is None else list(labels.shape)}")
        if params is not None:
            keep = list(params)
            if not keep or any(k not in obs.grad for k in keep):
                raise ConfigError(f"params {keep[:4]}: allowed a non-empty subset of the update's parameters")
            obs = replace(obs, grad=ParamVector({k: obs.grad[k] for k in keep}))
        self.model, self.obs, self.distance, self.tv, self.l1 = model, obs, distance, tv, l1
        self.soft, self.classes, self.decode, self.penalty = soft_labels, num_classes or 0, decode, penalty
        self.dim = math.prod(obs.input_shape)
        device = next(iter(obs.grad.values())).device
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long)
        self.target = obs.grad.detach()
        self.target_norm = self.target.norm()
        if float(self.target_norm) == 0:
            raise ConfigError("the observed update is zero: nothing to invert")

    def split(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """The variable [n, *shape] (or [n, D + C] with soft labels) -> (inputs [n, *shape], labels)."""
        if self.decode is not None:
            return self.decode(v)
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
        # the second backward needs the gradient's graph only when the variable is differentiated (not when
        # text inversion scores its discrete moves, or craft its final iterate under no_grad)
        second = v.requires_grad and torch.is_grad_enabled()
        # fused attention kernels (scaled_dot_product_attention's flash / memory-efficient ones, what
        # nn.MultiheadAttention and Hugging Face models call) have no derivative of their backward; the math
        # kernel does, so the simulated update that will be differentiated again is taken through it
        with sdpa_kernel([SDPBackend.MATH]) if second else contextlib.nullcontext():
            g = self.obs.simulate(self.model, x, y, create_graph=second)
        if self.distance == "cosine":
            d = 1 - g.dot(self.target) / (g.norm() * self.target_norm).clamp_min(1e-12)
        else:
            diff = g - self.target
            d = diff.dot(diff)
            if self.distance == "l2+l1":
                d = d + self.l1 * sum(t.abs().sum() for t in diff.values())
        if self.penalty is not None:
            d = d + self.penalty(v)
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
