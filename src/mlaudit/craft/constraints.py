"""Threat-model constraints on a perturbation ``delta`` of inputs ``x`` in the pixel box [0, 1].

``eps`` is in [0, 1] units (a budget of 16/255 is ``eps=16/255``; configs give it in /255 units and
convert). Every constraint projects onto the intersection of its ball and the box
``0 <= x + delta <= 1`` (the l-inf case exactly; the l2 case by the usual projection onto the ball
followed by clipping to the box, which keeps both constraints satisfied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry


@dataclass(frozen=True)
class LinfBall:
    """||delta||_inf <= eps and x + delta in [0, 1]."""

    eps: float

    def __post_init__(self) -> None:
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"LinfBall eps must lie in [0, 1] (pixel units; 16/255 = {16 / 255:.4f}), got {self.eps}")

    @torch.no_grad()
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        """delta, x [P, *shape] -> the projected delta (same shape)."""
        d = delta.clamp(-self.eps, self.eps)
        return (x + d).clamp(0, 1) - x

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        d = (_rand(torch.rand, x, generator) * 2 - 1) * self.eps
        return self.project(d, x)


@dataclass(frozen=True)
class L2Ball:
    """||delta_i||_2 <= eps per sample and x + delta in [0, 1]."""

    eps: float

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ConfigError(f"L2Ball eps must be >= 0, got {self.eps}")

    @torch.no_grad()
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta * scale).clamp(0, 1) - x

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        d = _rand(torch.randn, x, generator)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        r = _rand(torch.rand, x[:, :1].flatten(1)[:, 0], generator)
        return self.project(d * (self.eps * r).view(-1, *([1] * (x.dim() - 1))), x)


@dataclass(frozen=True)
class Box:
    """Only the pixel box: x + delta in [0, 1] (no norm bound)."""

    @torch.no_grad()
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        return (x + delta).clamp(0, 1) - x

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return _rand(torch.rand, x, generator) - x


def _rand(fn: Callable[..., Tensor], like: Tensor, generator: torch.Generator) -> Tensor:
    """Random numbers shaped like ``like``, drawn on the generator's device (same stream whatever
    device ``like`` is on), then moved next to it."""
    return fn(like.shape, generator=generator, device=generator.device).to(device=like.device, dtype=like.dtype)


Constraint = LinfBall | L2Ball | Box
CONSTRAINTS: Registry[Callable[..., Constraint]] = Registry("constraint")
CONSTRAINTS.register("linf")(LinfBall)
CONSTRAINTS.register("l2")(L2Ball)
CONSTRAINTS.register("box")(lambda eps=None: Box())
