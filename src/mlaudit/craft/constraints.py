"""Threat-model constraints on a perturbation ``delta`` of inputs ``x`` in a pixel box (default [0, 1]).

``eps`` is in pixel units (a budget of 16/255 on [0, 1] images is ``eps=16/255``; configs give it in
/255 units and convert). Every constraint projects onto the intersection of its ball and the box
``lo <= x + delta <= hi`` (the l-inf case exactly; the l2 case by the usual projection onto the ball
followed by clipping to the box, which keeps both constraints satisfied), and names its steepest
ascent direction (the dual-norm direction of a gradient, used by the engine's ``pgd`` and ``apgd``
steps: sign for l-inf, the unit l2 direction for l2; Madry et al. 2018, eq. 2 and its l2 analogue).
``Free`` has no set at all: the engine steps in absolute units, for attacks that change variables
themselves (Carlini-Wagner's tanh box).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

PixelBox = tuple[float, float]


def box_width(box: PixelBox, *, where: str) -> float:
    """hi - lo of a pixel box given in a config; ConfigError naming ``where`` unless lo < hi, both finite."""
    lo, hi = box
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"{where} must be [lo, hi] with finite lo < hi, got {list(box)}")
    return hi - lo


def _check_box(name: str, box: PixelBox) -> None:
    if not box[0] < box[1]:
        raise ConfigError(f"{name} box must be (lo, hi) with lo < hi, got {box}")


_F = TypeVar("_F", bound=Callable[..., Tensor])


def _no_grad(fn: _F) -> _F:
    """``torch.no_grad()`` around fn, entered only when gradients are on: the engine projects inside its own
    no-grad block, where the decorator's context cost ~2 us a call on a CPU core for nothing."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> Tensor:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample value v [P] shaped to broadcast against like [P, *shape]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _row_norms(v: Tensor) -> Tensor:
    """The l2 norm of each row of v [P, *shape]: ``v.flatten(1).norm(dim=1)``, calling the kernel that
    ``Tensor.norm`` reaches for strided CPU / CUDA tensors directly (1 us less per call on a CPU core; the same
    numbers), and ``Tensor.norm`` elsewhere."""
    flat = v.flatten(1)
    if flat.layout == torch.strided and flat.device.type in ("cpu", "cuda"):
        return torch.linalg.vector_norm(flat, 2, [1])
    return flat.norm(dim=1)


def _unit_l2(g: Tensor) -> Tensor:
    """g [P, *shape] divided by its per-sample l2 norm (zero rows stay zero)."""
    return g / _per_sample(_row_norms(g).clamp_min_(1e-12), g)


@dataclass(frozen=True)
class LinfBall:
    """||delta||_inf <= eps and x + delta in ``box`` (default [0, 1])."""

    eps: float
    box: PixelBox = (0.0, 1.0)

    def __post_init__(self) -> None:
        _check_box("LinfBall", self.box)
        width = self.box[1] - self.box[0]
        if not 0 <= self.eps <= width:
            raise ConfigError(f"LinfBall eps must lie in [0, {width:g}] (the pixel range {self.box}; 16/255 = "
                              f"{16 / 255:.4f}), got {self.eps}")

    @_no_grad
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        """delta, x [P, *shape] -> the projected delta (same shape)."""
        d = delta.clamp(-self.eps, self.eps)
        if d.shape == x.shape and d.dtype == x.dtype and d.is_contiguous() and x.is_contiguous():
            return d.add_(x).clamp_(*self.box).sub_(x)  # (x + d).clamp(*box) - x in d's memory: the same numbers
        return (x + d).clamp(*self.box) - x

    def steepest(self, grad: Tensor) -> Tensor:
        """The l-inf steepest direction of grad [P, *shape]: its sign."""
        return grad.sign()

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        d = (_rand(torch.rand, x, generator) * 2 - 1) * self.eps
        return self.project(d, x)


@dataclass(frozen=True)
class L2Ball:
    """||delta_i||_2 <= eps per sample and x + delta in ``box`` (default [0, 1])."""

    eps: float
    box: PixelBox = (0.0, 1.0)

    def __post_init__(self) -> None:
        _check_box("L2Ball", self.box)
        if self.eps < 0:
            raise ConfigError(f"L2Ball eps must be >= 0, got {self.eps}")

    @_no_grad
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        norms = _row_norms(delta).clamp_min_(1e-12)
        if isinstance(self.eps, (int, float)):
            # (eps / norms).clamp(max=1) in place: a number divided by a tensor is reciprocal() * eps (Tensor.__rdiv__)
            scale = _per_sample(norms.reciprocal_().mul_(self.eps).clamp_(max=1.0), delta)
        else:
            scale = _per_sample((self.eps / norms).clamp(max=1.0), delta)
        return torch.addcmul(x, delta, scale).clamp_(*self.box).sub_(x)  # one pass fewer than x + delta * scale

    def steepest(self, grad: Tensor) -> Tensor:
        """The l2 steepest direction of grad [P, *shape]: grad / ||grad||_2 per sample."""
        return _unit_l2(grad)

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A uniform direction times eps * r, r ~ U[0, 1], then projected (the box may shorten it)."""
        d = _unit_l2(_rand(torch.randn, x, generator))
        r = _rand(torch.rand, x, generator, shape=(len(x),))
        return self.project(d * _per_sample(self.eps * r, x), x)


@dataclass(frozen=True)
class Box:
    """Only the pixel box: x + delta in ``box`` (default [0, 1]; no norm bound)."""

    box: PixelBox = (0.0, 1.0)

    def __post_init__(self) -> None:
        _check_box("Box", self.box)

    @_no_grad
    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        return (x + delta).clamp(*self.box) - x

    def steepest(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = self.box
        return lo + _rand(torch.rand, x, generator) * (hi - lo) - x


@dataclass(frozen=True)
class Free:
    """No constraint (the identity projection): for attacks that optimise a change of variables whose
    image already lies in the box, e.g. Carlini-Wagner's x_adv = (tanh(w) + 1) / 2 (2017, sec. V.A).
    ``random_init`` draws N(0, 1) offsets."""

    def project(self, delta: Tensor, x: Tensor) -> Tensor:
        return delta

    def steepest(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def random_init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return _rand(torch.randn, x, generator)


def _rand(fn: Callable[..., Tensor], like: Tensor, generator: torch.Generator,
          shape: tuple[int, ...] | None = None) -> Tensor:
    """Random numbers shaped like ``like`` (or ``shape``) on its device and in its dtype, driven by ``generator``.

    When the generator is on the CPU and ``like`` on an accelerator, one 63-bit seed is drawn from
    the generator and the numbers come from a generator on ``like``'s device: drawing a batch of
    images' worth on one CPU thread and copying it over took 18 ms per PGD call on an H200 host
    (benchmarks/results/pgd_profile_h200.txt), about a quarter of that PGD-10 call. Same generator state and
    device, same numbers; a CPU and a GPU run start from different random points."""
    if generator.device.type == "cpu" and like.device.type != "cpu":
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        local = torch.Generator(device=like.device).manual_seed(seed)
        return fn(like.shape if shape is None else shape, generator=local, device=like.device, dtype=like.dtype)
    out = fn(like.shape if shape is None else shape, generator=generator, device=generator.device)
    return out.to(device=like.device, dtype=like.dtype)


Constraint = LinfBall | L2Ball | Box | Free
CONSTRAINTS: Registry[Callable[..., Constraint]] = Registry("constraint")
CONSTRAINTS.register("linf")(LinfBall)
CONSTRAINTS.register("l2")(L2Ball)
CONSTRAINTS.register("box")(lambda eps=None: Box())
CONSTRAINTS.register("free")(lambda eps=None: Free())
