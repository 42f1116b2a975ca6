"""The one perturbation optimiser every crafting attack uses (poisons, adversarial examples,
canaries): minimise an objective over per-sample perturbations under a threat-model constraint.

    result = craft(objective, x, constraint=LinfBall(16 / 255), steps=250, optimizer="signed-adam",
                   lr=0.1, restarts=8, augment=AugmentSpec(crop_pad=4, flip=True))

``objective(x_adv, idx)`` gets the perturbed (and, with ``augment``, differentiably augmented)
inputs of a mini-batch, ``x_adv`` [B, *shape], and their positions ``idx`` [B] in ``x``, and returns
the loss to *minimise*: a scalar for joint objectives (gradient matching couples all poisons, Geiping
et al. 2021, eq. 1.3 of seed 002), or per-sample losses [B] for separable ones (PGD, Madry et al. 2018;
adversarial poisoning, Fowl et al. 2021). An attack only defines its objective; this loop does the rest:

* optimizers: ``signed-adam`` (Adam on the sign of the gradient, the Witches' Brew default), ``pgd``
  (signed gradient steps), ``adam``;
* step size ``lr`` in units of the constraint's ``eps`` (absolute for :class:`Box`), with a
  ``step`` schedule (x0.1 after 3/8, 5/8 and 7/8 of the steps), ``cosine`` or ``constant``;
* random restarts, keeping the best by the objective (per sample when the objective is separable),
  optionally G at a time (``parallel_restarts``) through the objective's ``batched`` form;
* differentiable augmentation (translate + flip through ``grid_sample``), redrawn every step, so the
  perturbation works in expectation over the victim's augmentations (seed 002, section 1.3.4);
* mini-batches of perturbations for large budgets (gradients accumulate over all batches before
  each step, so the result does not depend on the batch size for a fixed random stream);
* progress through ``on_step(step, total_objective)``.

After every step the perturbation is projected onto the constraint (ball and pixel box).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..data.augment import AugmentSpec, apply_augment_differentiable
from ..errors import ConfigError
from .constraints import Box, Constraint

Objective = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CraftResult:
    """``delta`` [P, *shape] (inside the constraint), the final ``objective`` (sum over batches of the
    returned delta), ``per_sample`` [P] for separable objectives, each restart's final objective,
    and the best restart's objective per step (``history``)."""

    delta: Tensor
    objective: float
    per_sample: Tensor | None
    restarts: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


def craft(
    objective: Objective,
    x: Tensor,
    *,
    constraint: Constraint,
    steps: int = 250,
    optimizer: Literal["signed-adam", "pgd", "adam"] = "signed-adam",
    lr: float = 0.1,
    schedule: Literal["step", "cosine", "constant"] = "step",
    restarts: int = 1,
    init: Literal["zero", "random"] | Tensor = "zero",
    augment: AugmentSpec | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
    parallel_restarts: int = 1,
) -> CraftResult:
    """Minimise ``objective`` over ``delta`` for inputs ``x`` [P, *shape]; see the module docstring.

    Restarts after the first always start from a random point of the constraint; the first starts
    from ``init``: zero, a random point, or a given perturbation [P, *shape] (projected onto the
    constraint first; e.g. to continue an earlier optimisation, as min-min noise does between rounds).
    ``generator`` drives random starts and augmentation (same generator and ``parallel_restarts``,
    same result).

    ``parallel_restarts`` G > 1 optimises G restarts at once (one batched forward/backward per
    step instead of G) when the objective has a ``batched(x_adv [G, B, *shape], idx [B])`` method
    returning [G] (joint) or [G, B] (separable) losses, e.g. :class:`GradientMatching`; it costs G
    times the memory of one restart.
    """
    if steps < 0 or restarts < 1 or lr <= 0 or parallel_restarts < 1:
        raise ConfigError(f"craft needs steps >= 0, restarts >= 1, parallel_restarts >= 1 and lr > 0; got "
                          f"steps={steps}, restarts={restarts}, parallel_restarts={parallel_restarts}, lr={lr}")
    if optimizer not in _UPDATES:
        raise ConfigError(f"unknown craft optimizer {optimizer!r}; valid: {', '.join(sorted(_UPDATES))}")
    if parallel_restarts > 1 and not callable(getattr(objective, "batched", None)):
        raise ConfigError(f"parallel_restarts = {parallel_restarts} needs an objective with a batched(x_adv [G, B, ...], "
                          f"idx) method; {type(objective).__name__} has none (use parallel_restarts: 1)")
    x = x.detach()
    if isinstance(init, Tensor) and init.shape != x.shape:
        raise ConfigError(f"init must be 'zero', 'random' or a perturbation shaped like x {list(x.shape)}, "
                          f"got shape {list(init.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    scale = 1.0 if isinstance(constraint, Box) else float(constraint.eps)
    best: CraftResult | None = None
    finals: list[float] = []
    for r0 in range(0, restarts, parallel_restarts):
        group = range(r0, min(r0 + parallel_restarts, restarts))
        starts = []
        for r in group:
            if r == 0 and isinstance(init, Tensor):
                starts.append(constraint.project(init.detach().to(x), x))
            elif r == 0 and init == "zero":
                starts.append(torch.zeros_like(x))
            else:
                starts.append(constraint.random_init(x, generator))
        delta = torch.stack(starts).requires_grad_(True)  # [G, P, *shape]
        state: dict[str, Tensor] = {}
        history: list[list[float]] = []
        for step in range(steps):
            totals, _ = _evaluate(objective, x, delta, augment, batch_size, generator, backward=True)
            history.append(totals)
            step_size = lr * scale * _SCHEDULES[schedule](step, steps)
            with torch.no_grad():
                _UPDATES[optimizer](delta, delta.grad, state, step_size, step + 1)
                delta.copy_(_project(constraint, delta, x))
            delta.grad = None
            if on_step is not None:
                on_step(step, min(totals))
        totals, per = _evaluate(objective, x, delta, None, batch_size, generator, backward=False)
        for g in range(len(group)):
            finals.append(totals[g])
            cand = CraftResult(delta[g].detach(), totals[g], None if per is None else per[g],
                               history=[h[g] for h in history])
            best = cand if best is None else _better(best, cand)
    assert best is not None
    best.restarts = finals
    return best


def _project(constraint: Constraint, delta: Tensor, x: Tensor) -> Tensor:
    """Project each restart's delta [G, P, *shape] onto the constraint around x [P, *shape]."""
    g = delta.shape[0]
    flat = constraint.project(delta.flatten(0, 1), x.expand(g, *x.shape).flatten(0, 1))
    return flat.view_as(delta)


def _evaluate(objective: Objective, x: Tensor, delta: Tensor, augment: AugmentSpec | None, batch_size: int | None,
              generator: torch.Generator, *, backward: bool) -> tuple[list[float], Tensor | None]:
    """Objective of each restart summed over mini-batches (gradients accumulated into delta.grad when
    ``backward``): totals [G] and, for separable objectives, per-sample losses [G, P]."""
    g, n = delta.shape[0], x.shape[0]
    bs = batch_size or n
    totals = torch.zeros(g)
    parts: list[Tensor] = []
    separable = True
    for i in range(0, n, bs):
        idx = torch.arange(i, min(i + bs, n), device=x.device)
        b = len(idx)
        with torch.set_grad_enabled(backward):
            xa = x[idx].unsqueeze(0) + delta[:, idx]  # [G, B, *shape]
            if augment is not None and not augment.is_identity:
                flat = apply_augment_differentiable(xa.flatten(0, 1), augment.sample(g * b, generator=generator,
                                                                                     device=x.device))
                xa = flat.view_as(xa)
            out = objective(xa[0], idx).unsqueeze(0) if g == 1 else objective.batched(xa, idx)  # type: ignore[attr-defined]
            if out.shape == (g, b):
                parts.append(out.detach())
                loss_g = out.sum(1)
            elif out.shape == (g,):
                separable = False
                loss_g = out
            else:
                want = f"a scalar or [B={b}]" if g == 1 else f"[G={g}] or [G={g}, B={b}]"
                got = list(out.shape[1:]) if g == 1 else list(out.shape)
                raise ConfigError(f"objective must return {want} losses, got {got}")
            if not bool(torch.isfinite(loss_g).all()):
                raise ConfigError(f"objective returned a non-finite value ({loss_g.detach().tolist()}) for batch "
                                  f"{i // bs}")
            if backward:
                loss_g.sum().backward()
        totals += loss_g.detach().float().cpu()
    return totals.tolist(), (torch.cat(parts, 1) if separable and parts else None)


def _better(a: CraftResult, b: CraftResult) -> CraftResult:
    """Keep the lower objective; per sample when both are separable."""
    if a.per_sample is None or b.per_sample is None:
        return a if a.objective <= b.objective else b
    take_b = b.per_sample < a.per_sample
    shape = (-1,) + (1,) * (a.delta.dim() - 1)
    delta = torch.where(take_b.view(shape), b.delta, a.delta)
    per = torch.where(take_b, b.per_sample, a.per_sample)
    hist = a.history if a.objective <= b.objective else b.history
    return CraftResult(delta, float(per.sum()), per, history=hist)


def _pgd(delta: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, t: int) -> None:
    delta.sub_(step * grad.sign())


def _adam(delta: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, t: int, *, signed: bool = False) -> None:
    g = grad.sign() if signed else grad
    m = state.setdefault("m", torch.zeros_like(delta))
    v = state.setdefault("v", torch.zeros_like(delta))
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
    denom = (v / (1 - 0.999**t)).sqrt_().add_(1e-8)
    delta.addcdiv_(m, denom, value=-step / (1 - 0.9**t))


_UPDATES: dict[str, Callable[..., None]] = {
    "pgd": _pgd,
    "adam": _adam,
    "signed-adam": lambda d, g, s, st, t: _adam(d, g, s, st, t, signed=True),
}

_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda s, n: 1.0,
    "step": lambda s, n: 0.1 ** sum(s >= round(n * f) for f in (3 / 8, 5 / 8, 7 / 8)),
    "cosine": lambda s, n: 0.5 * (1 + math.cos(math.pi * s / max(n, 1))),
}
