"""Functional optimizers over *stacked* parameters (leading dim K = number of models).

The batched trainer keeps K models' parameters as tensors of shape [K, *param_shape] and updates
them in place with `torch._foreach_*` ops, so one step of K models costs a handful of fused kernels.
The updates follow PyTorch's definitions exactly, elementwise, so a stack of K models gets the same
update as K separate models:

* SGD (momentum mu, dampening 0, weight decay lambda added to the gradient, optional Nesterov):
  g <- g + lambda w;  b <- mu b + g;  d = g + mu b (Nesterov) or b;  w <- w - lr d.
* Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient (torch.optim.Adam semantics).
* Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; used by airbench94): Nesterov
  momentum on the gradient, then the update matrix (a conv filter bank reshaped to
  [out, in * kh * kw]) replaced by an approximation of its orthogonal factor ``U V^T`` from a few
  quintic Newton-Schulz steps; weights are renormalised to Frobenius norm ``sqrt(out)`` before each
  step. All same-shaped matrices (of every model in the stack) go through one batched iteration.

A recipe's ``param_groups`` give parameters (by name) their own optimizer, lr, momentum, weight decay
and training length (:class:`GroupedOptimizer`); ``optimizer: muon`` sends 4-D conv filters to Muon and
the rest to SGD unless a group says otherwise.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from .recipe import ParamGroup, Recipe, lr_at

Rate = float | Tensor
"""A learning rate: a Python float, or a 0-dim tensor on the parameters' device (read when the kernels run,
so a step captured in a CUDA graph follows the schedule on replay; :mod:`mlaudit.train.graphed`)."""


class StackedOptimizer(Protocol):
    """Updates stacked parameters in place, given their gradients and the current learning rate."""

    def step(self, grads: list[Tensor], lr: Rate, *, progress: float = 0.0) -> None: ...


def _descend_(params: list[Tensor], updates: list[Tensor], lr: Rate) -> None:
    """``w <- w - lr * u`` for every pair, lr a float or a 0-dim device tensor."""
    if isinstance(lr, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


@dataclass
class StackedSGD:
    """SGD with momentum / Nesterov / L2 weight decay over stacked params (torch.optim.SGD semantics)."""

    params: list[Tensor]
    momentum: float
    nesterov: bool
    weight_decay: float
    buffers: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: Rate, *, progress: float = 0.0) -> None:
        """Update ``params`` in place from ``grads`` (same shapes) at learning rate ``lr``."""
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            self.buffers, grads = _momentum(self.buffers, grads, self.momentum, self.nesterov)
        _descend_(self.params, grads, lr)


def _momentum(buffers: list[Tensor] | None, grads: list[Tensor], momentum: float, nesterov: bool
              ) -> tuple[list[Tensor], list[Tensor]]:
    """Heavy-ball buffers ``b <- mu b + g`` (``b = g`` on the first step) and the step direction
    (Nesterov ``g + mu b``, else ``b``); the one momentum rule of SGD and Muon."""
    if buffers is None:
        buffers = [g.detach().clone() for g in grads]
    else:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
    return buffers, (torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers)


@dataclass
class StackedAdam:
    """Adam with L2 weight decay over stacked params (torch.optim.Adam semantics, amsgrad off)."""

    params: list[Tensor]
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    t: int = 0
    m: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)

    graph_safe = False
    """Its bias correction depends on a host step counter, so a captured step would freeze it."""

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: Rate, *, progress: float = 0.0) -> None:
        """Update ``params`` in place from ``grads`` (same shapes) at learning rate ``lr``."""
        if isinstance(lr, Tensor):
            raise TypeError("StackedAdam takes a float lr: its bias correction is host state that a CUDA graph "
                            "would freeze")
        b1, b2 = self.betas
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if not self.m:
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]
        self.t += 1
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        bc1 = 1 - b1**self.t
        bc2 = 1 - b2**self.t
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr / bc1)


NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (a, b, c) of Muon: chosen for a steep slope at zero, so a few
steps push every singular value into roughly [0.5, 1.5] rather than converging exactly to 1."""


def orthogonalize(g: Tensor, *, steps: int = 3, eps: float = 1e-7) -> Tensor:
    """Approximate ``U V^T`` of each matrix of ``g`` [..., m, n] (``g = U S V^T``) by ``steps``
    quintic Newton-Schulz iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` on
    ``X = g / ||g||_F`` (run on the wide orientation; bf16 on CUDA, float32 elsewhere)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        am = x @ x.transpose(-2, -1)
        x = a * x + (b * am + c * am @ am) @ x
    return (x.transpose(-2, -1) if tall else x).to(g.dtype)


@dataclass
class StackedMuon:
    """Muon over conv filter banks, stacked or not (``leading_k``: params are [K, out, in, kh, kw])."""

    params: list[Tensor]
    momentum: float
    nesterov: bool
    leading_k: bool
    buffers: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: Rate, *, progress: float = 0.0) -> None:
        """Momentum, weight renormalisation to ``sqrt(out)`` and the orthogonalised step of size ``lr``."""
        self.buffers, upd = _momentum(self.buffers, grads, self.momentum, self.nesterov)
        lead = 1 if self.leading_k else 0
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(self.params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, idx in by_shape.items():
            out = shape[lead]
            w = torch.stack([self.params[i] for i in idx])  # [G, (K,) out, ...]
            flat = w.flatten(lead + 2) if w.dim() > lead + 2 else w
            norm = torch.linalg.vector_norm(flat.flatten(lead + 1), dim=-1)  # [G, (K,)]
            scale = (math.sqrt(out) / norm.clamp_min(1e-12)).view(*norm.shape, *([1] * (w.dim() - norm.dim())))
            u = torch.stack([upd[i] for i in idx]).flatten(lead + 2)  # [G, (K,) out, in*kh*kw]
            o = orthogonalize(u).view_as(w)
            for j, i in enumerate(idx):
                self.params[i].mul_(scale[j])
            _descend_([self.params[i] for i in idx], list(o.unbind(0)), lr)


@dataclass
class GroupedOptimizer:
    """Sub-optimizers over disjoint parameter groups, each with its own base lr and schedule length.

    ``step(grads, lr, progress=)``: group g steps at ``lr_at(schedule_g, lr_g, progress)``, where
    ``schedule_g`` is the recipe, stretched to the group's ``epochs`` when it has them (the group is
    then left alone from ``progress >= epochs`` on); ``lr`` (the recipe's scheduled lr) is not used.
    """

    groups: list[tuple[StackedOptimizer, list[int], float, Recipe, float | None]]
    """(optimizer, parameter indices, base lr, schedule, last epoch or None)."""

    def step(self, grads: list[Tensor], lr: float, *, progress: float = 0.0) -> None:
        rates = self.rates(progress)
        self.apply(grads, rates, [r > 0 for r in rates], progress=progress)

    def rates(self, progress: float) -> list[float]:
        """Each group's learning rate at ``progress`` (0 once a group's ``epochs`` are done)."""
        return [lr_at(schedule, base, progress) if until is None or progress < until else 0.0
                for _, _, base, schedule, until in self.groups]

    def apply(self, grads: list[Tensor], rates: Sequence[Rate], active: Sequence[bool], *,
              progress: float = 0.0) -> None:
        """Step the groups marked ``active`` at ``rates``; an inactive group (zero rate: warm-up start, a finished
        group) is skipped, so its buffers stay as they are."""
        for (opt, idx, *_), rate, on in zip(self.groups, rates, active, strict=True):
            if on:
                opt.step([grads[i] for i in idx], rate, progress=progress)


def graph_safe(opt: StackedOptimizer) -> bool:
    """Whether ``opt.step`` keeps no host state a captured CUDA graph would freeze (all but Adam)."""
    subs = [g[0] for g in opt.groups] if isinstance(opt, GroupedOptimizer) else [opt]
    return all(getattr(o, "graph_safe", True) for o in subs)


def slot_rates(opt: StackedOptimizer, recipe: Recipe, base_lr: float, progress: float) -> list[float]:
    """The learning rates of one step: each group's for a :class:`GroupedOptimizer`, else the recipe's one."""
    return opt.rates(progress) if isinstance(opt, GroupedOptimizer) else [lr_at(recipe, base_lr, progress)]


def slot_active(opt: StackedOptimizer, rates: Sequence[float]) -> tuple[bool, ...]:
    """Which slots step: a :class:`GroupedOptimizer` skips a group at rate 0; a plain optimizer always steps."""
    return tuple(r > 0 for r in rates) if isinstance(opt, GroupedOptimizer) else (True,)


def apply_rates(opt: StackedOptimizer, grads: list[Tensor], rates: Sequence[Rate], active: Sequence[bool], *,
                progress: float = 0.0) -> None:
    """One optimizer step at per-slot ``rates`` (floats, or 0-dim device tensors inside a CUDA graph)."""
    if isinstance(opt, GroupedOptimizer):
        opt.apply(grads, rates, active, progress=progress)
    else:
        opt.step(grads, rates[0], progress=progress)


OptimizerFactory = Callable[..., StackedOptimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(recipe: Recipe, params: list[Tensor], **_: object) -> StackedSGD:
    return StackedSGD(params, recipe.momentum, recipe.nesterov, recipe.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(recipe: Recipe, params: list[Tensor], **_: object) -> StackedAdam:
    return StackedAdam(params, recipe.weight_decay)


@OPTIMIZERS.register("muon")
def _muon(recipe: Recipe, params: list[Tensor], *, leading_k: bool = True, **_: object) -> StackedMuon:
    return StackedMuon(params, recipe.momentum, recipe.nesterov, leading_k)


def make_optimizer(recipe: Recipe, params: list[Tensor], *, names: Sequence[str] | None = None,
                   leading_k: bool = True, base_lr: float | None = None) -> StackedOptimizer:
    """The stacked optimizer for ``params`` (each [K, *shape] when ``leading_k``, else one model's).

    Without ``param_groups`` and with ``optimizer`` sgd or adam: that optimizer over all params. Else
    (``names`` [len(params)] required) a :class:`GroupedOptimizer`: each parameter goes to its first
    matching group, or to the default group (Muon for 4-D filters when ``optimizer: muon``, else SGD,
    at ``base_lr``). A group pattern that matches no parameter is a ConfigError naming it.
    """
    if not recipe.param_groups and recipe.optimizer != "muon":
        return OPTIMIZERS.get(recipe.optimizer)(recipe, params)
    if names is None or len(names) != len(params):
        raise ConfigError("param_groups and the muon optimizer need the parameters' names")
    base = recipe.resolved_lr(residual=False) if base_lr is None else base_lr
    lead = 1 if leading_k else 0
    default = ParamGroup(match="*")
    buckets: dict[tuple[int, str], list[int]] = {}
    used: set[int] = set()
    for i, (name, p) in enumerate(zip(names, params)):
        gi = next((j for j, g in enumerate(recipe.param_groups) if fnmatch.fnmatchcase(name, g.match)), -1)
        g = recipe.param_groups[gi] if gi >= 0 else default
        kind = g.optimizer or ("muon" if recipe.optimizer == "muon" and p.dim() - lead == 4 else "sgd")
        if kind == "muon" and p.dim() - lead < 2:
            raise ConfigError(f"parameter {name!r} {list(p.shape[lead:])} cannot use Muon (it needs a matrix or a "
                              "filter bank); give it optimizer: sgd in recipe.param_groups")
        buckets.setdefault((gi, kind), []).append(i)
        used.add(gi)
    unused = [g.match for j, g in enumerate(recipe.param_groups) if j not in used]
    if unused:
        raise ConfigError(f"recipe.param_groups pattern(s) {unused} match no trainable parameter; the model's are: "
                          f"{', '.join(sorted(set(names)))}")
    groups = []
    for (gi, kind), idx in buckets.items():
        g = recipe.param_groups[gi] if gi >= 0 else default
        sub = recipe.model_copy(update={k: v for k, v in (("momentum", g.momentum), ("weight_decay", g.weight_decay))
                                        if v is not None})
        opt = OPTIMIZERS.get(kind)(sub, [params[i] for i in idx], leading_k=leading_k)
        schedule = recipe if g.epochs is None else recipe.model_copy(update={"epochs": g.epochs})  # built once
        groups.append((opt, idx, g.lr if g.lr is not None else base, schedule, g.epochs))
    return GroupedOptimizer(groups)
