"""The one perturbation optimiser every crafting attack uses (poisons, adversarial examples,
canaries): minimise an objective over per-sample perturbations under a threat-model constraint.

    result = craft(objective, x, constraint=LinfBall(16 / 255), steps=250, optimizer="signed-adam",
                   lr=0.1, restarts=8, augment=AugmentSpec(crop_pad=4, flip=True))

``objective(x_adv, idx)`` gets the perturbed (and, with ``augment``, differentiably augmented)
inputs of a mini-batch, ``x_adv`` [B, *shape], and their positions ``idx`` [B] in ``x``, and returns
the loss to *minimise*: a scalar for joint objectives (gradient matching couples all poisons, Geiping
et al. 2021, eq. 1.3 of seed 002), or per-sample losses [B] for separable ones (PGD, Madry et al. 2018;
adversarial poisoning, Fowl et al. 2021). A separable objective may also return ``(losses [B], done [B])``
where ``done`` (bool) says a sample has reached its goal (an evasion attack: misclassified). An attack
only defines its objective; this loop does the rest:

* optimizers: ``signed-adam`` (Adam on the sign of the gradient, the Witches' Brew default), ``pgd``
  (steepest-descent steps in the constraint's norm: the gradient's sign for l-inf, its unit l2
  direction for l2), ``adam``, and ``apgd`` (Croce & Hein 2020, Algorithm 1: momentum 0.75, a
  per-sample step size halved at checkpoints when the objective stalls, restarting from the best
  point; starts at ``lr`` and ignores ``schedule``);
* step size ``lr`` in units of the constraint's ``eps`` (absolute for :class:`Box` and :class:`Free`),
  with a ``step`` schedule (x0.1 after 3/8, 5/8 and 7/8 of the steps), ``cosine`` or ``constant``;
* random restarts, keeping the best by the objective (per sample when the objective is separable),
  optionally G at a time (``parallel_restarts``) through the objective's ``batched`` form;
* ``keep_best``: the best iterate per sample over all steps, not the last one (separable objectives);
* ``early_stop``: a sample flagged ``done`` stops moving and leaves the optimisation (no more forward
  or backward passes; on CUDA once the done samples are half of the batch, to keep the number of
  batch shapes small), later restarts run only on samples no restart has finished, and the loop ends when
  every sample is done. Done samples rank above samples that are not, whatever their losses;
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
from .constraints import Box, Constraint, Free
from .steps import UPDATES, StepInfo

Objective = Callable[[Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]


@dataclass
class CraftResult:
    """``delta`` [P, *shape] (inside the constraint), the final ``objective`` (sum over batches of the
    returned delta), ``per_sample`` [P] for separable objectives, ``done`` [P] (bool) for objectives
    that flag it, each restart's final objective, and the best restart's objective per step
    (``history``)."""

    delta: Tensor
    objective: float
    per_sample: Tensor | None
    restarts: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    done: Tensor | None = None


def craft(
    objective: Objective,
    x: Tensor,
    *,
    constraint: Constraint,
    steps: int = 250,
    optimizer: Literal["signed-adam", "pgd", "adam", "apgd"] = "signed-adam",
    lr: float = 0.1,
    schedule: Literal["step", "cosine", "constant"] = "step",
    restarts: int = 1,
    init: Literal["zero", "random"] | Tensor = "zero",
    augment: AugmentSpec | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
    parallel_restarts: int = 1,
    keep_best: bool = False,
    early_stop: bool = False,
    final_eval: bool = True,
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

    ``final_eval=False`` skips the forward pass that scores the last iterate (one pass of ``steps + 1``; FGSM
    is one step, so a third of its cost): the result is then the last iterate, and ``objective``,
    ``per_sample`` and ``done`` are those of the iterate before the last step. Only without ``keep_best``
    (which needs that score) and with one restart (restarts are ranked by it).
    """
    if steps < 0 or restarts < 1 or lr <= 0 or parallel_restarts < 1:
        raise ConfigError(f"craft needs steps >= 0, restarts >= 1, parallel_restarts >= 1 and lr > 0; got "
                          f"steps={steps}, restarts={restarts}, parallel_restarts={parallel_restarts}, lr={lr}")
    if optimizer not in UPDATES:
        raise ConfigError(f"unknown craft optimizer {optimizer!r}; valid: {', '.join(sorted(UPDATES))}")
    if not final_eval and (keep_best or restarts > 1):
        raise ConfigError("final_eval=False returns the last iterate unscored: it needs keep_best=False and restarts=1 "
                          f"(got keep_best={keep_best}, restarts={restarts})")
    if parallel_restarts > 1 and not callable(getattr(objective, "batched", None)):
        raise ConfigError(f"parallel_restarts = {parallel_restarts} needs an objective with a batched(x_adv [G, B, ...], "
                          f"idx) method; {type(objective).__name__} has none (use parallel_restarts: 1)")
    x = x.detach()
    if isinstance(init, Tensor) and init.shape != x.shape:
        raise ConfigError(f"init must be 'zero', 'random' or a perturbation shaped like x {list(x.shape)}, "
                          f"got shape {list(init.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    run = _Run(objective, x, constraint, steps, optimizer, lr, schedule, augment, batch_size, generator, on_step,
               keep_best, early_stop, final_eval)
    best: CraftResult | None = None
    finals: list[float] = []
    for r0 in range(0, restarts, parallel_restarts):
        group = range(r0, min(r0 + parallel_restarts, restarts))
        rows = torch.arange(len(x), device=x.device)
        if early_stop and best is not None and best.done is not None:
            rows = rows[~best.done.to(x.device)]
            if len(rows) == 0:
                break
        starts = []
        for r in group:
            if r == 0 and isinstance(init, Tensor):
                starts.append(constraint.project(init.detach().to(x), x))
            elif r == 0 and init == "zero":
                starts.append(torch.zeros_like(x))
            else:
                starts.append(constraint.random_init(x[rows], generator))
        for cand in run.group(starts[0].unsqueeze(0) if len(starts) == 1 else torch.stack(starts), rows):
            finals.append(cand.objective)
            best = cand if best is None else _merge(best, cand, rows)
    assert best is not None
    best.restarts = finals
    return best


class _Run:
    """One craft call's settings; :meth:`group` optimises G restarts over the rows ``rows`` of x."""

    def __init__(self, objective: Objective, x: Tensor, constraint: Constraint, steps: int, optimizer: str,
                 lr: float, schedule: str, augment: AugmentSpec | None, batch_size: int | None,
                 generator: torch.Generator, on_step: Callable[[int, float], None] | None, keep_best: bool,
                 early_stop: bool, final_eval: bool = True) -> None:
        self.objective, self.x, self.constraint, self.steps = objective, x, constraint, steps
        self.update, self.lr, self.schedule = UPDATES[optimizer], lr, _SCHEDULES[schedule]
        self.augment = None if augment is None or augment.is_identity else augment
        self.batch_size, self.generator, self.on_step = batch_size, generator, on_step
        self.keep_best, self.early_stop, self.final_eval = keep_best, early_stop, final_eval
        self.scale = 1.0 if isinstance(constraint, (Box, Free)) else float(constraint.eps)
        self.shrink_at = _shrink_at(x)

    def group(self, delta: Tensor, rows: Tensor) -> list[CraftResult]:
        """Optimise delta [G, R, *shape] (the starts of G restarts for x[rows]); one result per restart.

        All bookkeeping stays on x's device: a step makes no host synchronisation unless ``early_stop``
        (one, to count the done samples) or ``on_step`` is set; a non-finite objective is detected
        then, or else once at the end."""
        g, r = delta.shape[:2]
        dev = delta.device
        # [G, R, *shape]: each row's result so far (without keep-best every row is written before it is read)
        out_delta = delta.detach().clone() if self.keep_best else torch.empty_like(delta)
        out_obj = torch.full((g, r), math.inf, device=dev)
        out_done = torch.zeros(g, r, dtype=torch.bool, device=dev)
        separable, flagged = True, False
        work = torch.arange(r, device=dev)  # positions in rows of the samples still optimised
        frozen = torch.zeros(r, dtype=torch.bool, device=dev)  # [len(work)]: done, held until the next compaction
        n_frozen = 0
        state: dict[str, Tensor] = {}
        history: list[Tensor] = []  # [G] per step, read back once at the end
        totals = torch.zeros(g, device=dev)
        lagged = _lagged_counts(self.x)
        pending: _Counts | None = None  # lagged: the previous step's counts, copied to the host asynchronously
        # every row of x, none dropped yet: rows and work are identities, so x, y and the outputs are used whole
        # (plain slices) instead of through index kernels (gathers and scatters of the whole batch every step)
        whole = r == len(self.x)
        for step in range(self.steps + 1):
            final = step == self.steps
            sel = slice(None) if whole else work
            if final and not self.final_eval and step > 0:  # the last iterate, unscored (see craft's final_eval)
                out_delta[:, sel] = delta.detach()
                break
            delta.requires_grad_(not final)
            idx = rows if whole else rows[work]
            totals, per, done = _evaluate(self.objective, self.x if whole else self.x[idx], idx, delta,
                                          None if final else self.augment, self.batch_size, self.generator,
                                          backward=not final)
            separable, flagged = per is not None, done is not None
            if separable and self.keep_best:
                assert per is not None
                take = per < out_obj[:, sel]
                if done is not None:
                    d_old = out_done[:, sel]
                    take = (done & ~d_old) | ((done == d_old) & take)
                    out_done[:, sel] = torch.where(take, done, d_old)
                out_obj[:, sel] = torch.where(take, per, out_obj[:, sel])
                w = take.view(*take.shape, *([1] * (delta.dim() - 2)))
                out_delta[:, sel] = torch.where(w, delta.detach(), out_delta[:, sel])
            elif separable:  # without keep-best every row takes the iterate just scored
                assert per is not None
                if done is not None:
                    out_done[:, sel] = done
                out_obj[:, sel] = per
                if final:  # otherwise the iterate is copied out only where the loop drops rows or stops
                    out_delta[:, sel] = delta.detach()
            elif self.keep_best or self.early_stop:
                raise ConfigError("keep_best and early_stop need a separable objective (per-sample losses [B]); "
                                  "this one returned a scalar")
            if final:
                break
            history.append(totals)
            grad = delta.grad
            delta = delta.detach()
            if self.early_stop and done is not None:
                frozen = frozen | done.all(0)
                counts = torch.stack([frozen.sum(), (~torch.isfinite(totals)).sum()])
                if lagged:
                    # on CUDA a blocking read here would stall the queue every step (the GPU idles while the next
                    # step's first kernels are launched): read the previous step's counts instead, long finished,
                    # while this step's are copied behind its kernels. Decisions come a step late; a done sample is
                    # held fixed meanwhile, so the result is the same (an extra pass at most).
                    got, pending = pending, _Counts(counts)
                    n_seen, bad = got.read() if got is not None else (0, 0)
                else:  # the step's one host synchronisation: the done count, and the objective's finiteness
                    n_seen, bad = counts.tolist()
                if bad:
                    _non_finite(step - lagged, history[-1 - lagged])
                if n_seen == len(work):
                    if not self.keep_best:
                        out_delta[:, sel] = delta
                    break
                n_frozen = n_seen
                if n_seen and n_seen >= self.shrink_at * len(work):
                    if not self.keep_best:  # the rows dropped here keep the iterate that reached the goal
                        out_delta[:, sel] = delta
                    keep = (~frozen).nonzero().squeeze(1)  # one host sync here; each boolean-mask index is one
                    delta, grad, work, frozen = delta[:, keep], grad[:, keep], work[keep], frozen[keep]
                    state = {k: v[:, keep] for k, v in state.items()}
                    per = per[:, keep] if per is not None else None
                    n_frozen, pending, whole = 0, None, False  # the pending counts were of the rows before
                    if len(work) == 0:  # lagged: every sample was done by now, which the late count did not show
                        break
                if lagged:
                    n_frozen = max(n_frozen, 1)  # samples done at this step are not counted yet: hold them too
            xw = self.x if whole else self.x[rows[work]]
            info = StepInfo(self.constraint, xw, per, step, self.steps)
            with torch.no_grad():
                held = delta.clone() if n_frozen else None
                self.update(delta, grad, state, self.lr * self.scale * self.schedule(step, self.steps), step + 1, info)
                delta = _project(self.constraint, delta, xw)
                if held is not None:  # done samples not yet dropped keep the iterate that reached the goal
                    f = frozen.view(1, -1, *([1] * (delta.dim() - 2)))
                    delta = torch.where(f, held, delta)
            if self.on_step is not None:
                self.on_step(step, float(totals.min()))
        # one device -> host copy for everything read back (each read is a synchronisation, and the time
        # between them is time the caller waits with the GPU idle)
        n_hist = len(history) * g
        host = torch.cat([*history, totals.float(), out_obj.flatten(), out_done.flatten().float()]).cpu()
        steps_g = host[:n_hist].view(-1, g).tolist()  # [steps][G]
        last = host[n_hist:n_hist + g].tolist()
        for s, row in enumerate([*steps_g, last]):
            if not all(math.isfinite(v) for v in row):
                _non_finite(s, torch.tensor(row))
        if not separable:  # joint objective: the final iterate of every restart, ranked by its total
            return [CraftResult(delta[k].detach(), last[k], None, history=[h[k] for h in steps_g]) for k in range(g)]
        out_obj = host[n_hist + g:n_hist + g + g * r].view(g, r)
        out_done = host[n_hist + g + g * r:].view(g, r).bool()
        return [CraftResult(out_delta[k], float(out_obj[k].sum()), out_obj[k], history=[h[k] for h in steps_g],
                            done=out_done[k] if flagged else None) for k in range(g)]


class _Counts:
    """Integer counts [k] of a CUDA step copied to pinned host memory behind the step's kernels; :meth:`read`
    waits only for that step (see ``_Run.group``)."""

    def __init__(self, counts: Tensor) -> None:
        self.event = None
        if not counts.is_cuda:  # tests force the lagged path on the CPU: nothing to overlap
            self.host = counts.clone()
            return
        self.host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        self.host.copy_(counts, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return [int(v) for v in self.host.tolist()]


def _lagged_counts(x: Tensor) -> bool:
    """Whether early stopping reads its done counts a step late (CUDA: no blocking read per step; PGD-20 on
    a PGD-AT ResNet-18 was 4% behind torchattacks with one per step) or at once (CPU, nothing to overlap)."""
    return x.is_cuda


def _non_finite(step: int, totals: Tensor) -> None:
    raise ConfigError(f"objective returned a non-finite value ({totals.detach().cpu().tolist()}) at step {step}; "
                      "check the model and objective for overflow or log(0)")


def _shrink_at(x: Tensor) -> float:
    """The fraction of the batch that must be done before early_stop drops the done samples.

    On CUDA, cuDNN builds an execution plan for every new input shape, which can cost more than the
    passes a one-step drop saves; waiting until half are done bounds the shapes to log2(N) (PGD-20 on
    1000 CIFAR-10 (JPEG) images, PGD-AT ResNet-18, H200, 2026-12-03: 0.95 s with a drop at every step,
    0.56 s with halving, torchattacks 0.48 s). On the CPU a smaller batch is simply cheaper, so done
    samples leave at once."""
    return 0.5 if x.is_cuda else 0.0


def _project(constraint: Constraint, delta: Tensor, x: Tensor) -> Tensor:
    """Project each restart's delta [G, P, *shape] onto the constraint around x [P, *shape]."""
    g = delta.shape[0]
    flat = constraint.project(delta.flatten(0, 1), x.expand(g, *x.shape).flatten(0, 1))
    return flat.view_as(delta)


def _evaluate(objective: Objective, x: Tensor, idx_all: Tensor, delta: Tensor, augment: AugmentSpec | None,
              batch_size: int | None, generator: torch.Generator, *,
              backward: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Objective of each restart summed over mini-batches (gradients accumulated into delta.grad when
    ``backward``) for x [R, *shape] at positions ``idx_all`` [R]: totals [G] and, for separable
    objectives, per-sample losses [G, R] and (when the objective flags them) done flags [G, R], all
    on x's device (no host synchronisation)."""
    g, n = delta.shape[0], x.shape[0]
    bs = batch_size or n
    totals = torch.zeros(g, device=x.device)
    parts: list[Tensor] = []
    flags: list[Tensor] = []
    separable = True
    for i in range(0, n, bs):
        loc = slice(i, min(i + bs, n))
        idx, b = idx_all[loc], min(i + bs, n) - i
        with torch.set_grad_enabled(backward):
            if g == 1 and b == n and augment is None:
                # one restart, one batch: x + delta[0] through a view, so the backward pass hands delta its gradient
                # as is (slicing and selecting would each add a zero-filled copy of the batch)
                xa = (x + delta.squeeze(0)).unsqueeze(0)
            else:
                xa = x[loc].unsqueeze(0) + delta[:, loc]  # [G, B, *shape]
            if augment is not None:
                flat = apply_augment_differentiable(xa.flatten(0, 1), augment.sample(g * b, generator=generator,
                                                                                     device=x.device))
                xa = flat.view_as(xa)
            out = objective(xa[0], idx) if g == 1 else objective.batched(xa, idx)  # type: ignore[attr-defined]
            done = None
            if isinstance(out, tuple):
                out, done = out
            out = out.unsqueeze(0) if g == 1 else out
            if out.shape == (g, b):
                parts.append(out.detach().float())
                if done is not None:
                    flags.append(done.detach().view(g, b).bool())
                loss_g = out.sum(1)
            elif out.shape == (g,):
                separable = False
                loss_g = out
            else:
                want = f"a scalar or [B={b}]" if g == 1 else f"[G={g}] or [G={g}, B={b}]"
                got = list(out.shape[1:]) if g == 1 else list(out.shape)
                raise ConfigError(f"objective must return {want} losses, got {got}")
            if backward:
                loss_g.sum().backward()
        totals += loss_g.detach().float()
    per = torch.cat(parts, 1) if separable and parts else None
    done_all = torch.cat(flags, 1) if separable and flags and len(flags) == len(parts) else None
    return totals, per, done_all


def _merge(a: CraftResult, b: CraftResult, rows: Tensor) -> CraftResult:
    """Keep the better of a (over all P samples) and b (over x[rows]): the lower objective; per sample
    when both are separable, where a done sample beats one that is not."""
    if a.per_sample is None or b.per_sample is None:
        return a if a.objective <= b.objective else b
    rows_c = rows.cpu()
    pa = a.per_sample[rows_c]
    take_b = b.per_sample < pa
    done = None
    if a.done is not None and b.done is not None:
        da = a.done[rows_c]
        take_b = (b.done & ~da) | ((b.done == da) & take_b)
        done = a.done.clone()
        done[rows_c] = torch.where(take_b, b.done, da)
    shape = (-1,) + (1,) * (a.delta.dim() - 1)
    delta = a.delta.clone()
    delta[rows] = torch.where(take_b.to(delta.device).view(shape), b.delta, a.delta[rows])
    per = a.per_sample.clone()
    per[rows_c] = torch.where(take_b, b.per_sample, pa)
    b_total = float(b.per_sample.sum()) + float(a.per_sample.sum() - pa.sum())
    hist = a.history if a.objective <= b_total else b.history
    return CraftResult(delta, float(per.sum()), per, history=hist, done=done)


_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda s, n: 1.0,
    "step": lambda s, n: 0.1 ** sum(s >= round(n * f) for f in (3 / 8, 5 / 8, 7 / 8)),
    "cosine": lambda s, n: 0.5 * (1 + math.cos(math.pi * s / max(n, 1))),
}
