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
  or backward passes; on CUDA once the passes the done samples would still cost reach two passes of the
  batch, since each new batch shape costs cuDNN about one pass to plan), later restarts run only on
  samples no restart has finished, and the loop ends when every sample is done. Done samples rank above samples that are not, whatever their losses;
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
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

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

    def check_finite(self) -> None:
        """ConfigError if the objective was not finite at some step (craft's ``defer_finite_check``); a result
        that craft checked already, or whose fields were read, returns at once."""


class _Lazy:
    """A field of :class:`_Pending` read back on first access (a data descriptor over the instance's dict)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: _Pending | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        if self.name not in d:
            obj._fill()
        return d[self.name]

    def __set__(self, obj: _Pending, value: Any) -> None:
        obj.__dict__[self.name] = value


class _Pending(CraftResult):
    """A :class:`CraftResult` whose ``delta`` is set and whose other fields (``objective``, ``per_sample``,
    ``history``, ``done``, ``restarts``) are read back from x's device on first access, in one copy shared by the
    restarts of a group. FGSM and one-restart PGD use only ``delta``: building the rest took ~20 us of host time
    per call on a CPU core (the copy, ``tolist``, a sum per restart), after the last forward pass. The objective's
    finiteness is still checked when ``craft`` returns (the same ConfigError, at the same call)."""

    objective = _Lazy()
    per_sample = _Lazy()
    restarts = _Lazy()
    history = _Lazy()
    done = _Lazy()

    def __init__(self, delta: Tensor, *fields: Any, read: Callable[[], dict[str, Any]] | None = None,
                 check: Callable[[], None] | None = None, **named: Any) -> None:
        if read is None:  # every field given (dataclasses.replace): a plain result
            CraftResult.__init__(self, delta, *fields, **named)
        else:
            self.__dict__.update(delta=delta, _read=read)
            if check is not None:
                self.__dict__["_check"] = check

    def check_finite(self) -> None:
        check = self.__dict__.pop("_check", None)
        if check is not None and "_read" in self.__dict__:  # a read-back checks every step itself
            check()

    def _fill(self) -> None:
        self.__dict__.pop("_check", None)  # the read-back below raises at the first non-finite step
        read = self.__dict__.pop("_read", None)
        if read is not None:
            for k, v in read().items():
                self.__dict__.setdefault(k, v)
        self.__dict__.setdefault("restarts", [self.__dict__["objective"]])  # one restart: its own objective

    def __getstate__(self) -> dict[str, Any]:
        self._fill()
        return dict(self.__dict__)


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
    defer_finite_check: bool = False,
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

    ``defer_finite_check=True`` leaves the check that the objective stayed finite (a ConfigError naming the first
    step that was not) to :meth:`CraftResult.check_finite`, which the caller must call, or to the first read of a
    host-side field (``objective``, ``per_sample``, ...), whichever comes first. That check reads from the device,
    so it waits for the device's queue: made last, the caller's remaining host work (restoring the model's flags,
    launching ``x + delta``) runs while the device works instead of after it. An evasion attack on a GPU uses it
    (~0.2 ms of an FGSM call on 1000 CIFAR-10 images, measured as the gap to torchattacks).
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
    augment = None if augment is None or augment.is_identity else augment
    if generator is None and (restarts > 1 or augment is not None or (not isinstance(init, Tensor) and init != "zero")):
        generator = torch.Generator().manual_seed(0)  # only where something is drawn (2 us a call otherwise)
    run = _Run(objective, x, constraint, steps, optimizer, lr, schedule, augment, batch_size, generator, on_step,
               keep_best, early_stop, final_eval, defer_finite_check)
    best: CraftResult | None = None
    first: CraftResult | None = None
    finals: list[float] = []
    for r0 in range(0, restarts, parallel_restarts):
        group = range(r0, min(r0 + parallel_restarts, restarts))
        rows = torch.arange(x.shape[0], device=x.device)
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
            if best is None:  # one restart: its objective is read only if asked for (see _Pending)
                best = first = cand
                continue
            if first is not None:
                finals.append(first.objective)
                first = None
            finals.append(cand.objective)
            best = _merge(best, cand, rows)
    assert best is not None
    if first is None:
        best.restarts = finals
    elif not isinstance(best, _Pending):
        best.restarts = [best.objective]
    return best


class _Run:
    """One craft call's settings; :meth:`group` optimises G restarts over the rows ``rows`` of x."""

    def __init__(self, objective: Objective, x: Tensor, constraint: Constraint, steps: int, optimizer: str,
                 lr: float, schedule: str, augment: AugmentSpec | None, batch_size: int | None,
                 generator: torch.Generator | None, on_step: Callable[[int, float], None] | None, keep_best: bool,
                 early_stop: bool, final_eval: bool = True, defer_finite_check: bool = False) -> None:
        self.objective, self.x, self.constraint, self.steps = objective, x, constraint, steps
        self.update, self.lr, self.schedule = UPDATES[optimizer], lr, _SCHEDULES[schedule]
        self.augment = None if augment is None or augment.is_identity else augment
        self.batch_size, self.generator, self.on_step = batch_size, generator, on_step
        self.keep_best, self.early_stop, self.final_eval = keep_best, early_stop, final_eval
        self.defer_finite_check = defer_finite_check
        self.scale = 1.0 if isinstance(constraint, (Box, Free)) else float(constraint.eps)
        self.shrink_passes = _shrink_passes(x)

    def group(self, delta: Tensor, rows: Tensor) -> list[CraftResult]:
        """Optimise delta [G, R, *shape] (the starts of G restarts for x[rows]); one result per restart.

        All bookkeeping stays on x's device: a step makes no host synchronisation unless ``early_stop``
        (one, to count the done samples) or ``on_step`` is set; a non-finite objective is detected
        then, or else once at the end."""
        g, r = delta.shape[:2]
        dev = delta.device
        keep_best, early_stop, final_eval, steps = self.keep_best, self.early_stop, self.final_eval, self.steps
        constraint, objective, update = self.constraint, self.objective, self.update
        lr = self.lr * self.scale  # (lr * scale) * schedule: the product the update always had
        # every row of x, none dropped yet: rows and work are identities, so x, y and the outputs are used whole
        # (plain slices) instead of through index kernels (gathers and scatters of the whole batch every step)
        whole = r == self.x.shape[0]
        # the results per row of rows, [G, R, ...]. With keep-best, the best so far (read every step). Without, the
        # last scored iterate of every row: rows still optimised take it from the loop's own tensors (``delta``,
        # ``per``, ``done``), which ``flush`` copies in only where rows stop or leave; while none has left
        # (``whole``), these are never allocated and the loop's own tensors are the result
        out_delta: Tensor | None = delta.detach().clone() if keep_best else None
        out_obj: Tensor | None = torch.full((g, r), math.inf, device=dev) if keep_best else None
        out_done: Tensor | None = torch.zeros(g, r, dtype=torch.bool, device=dev) if keep_best else None
        cur_per: Tensor | None = None  # without keep-best: the last scores of the rows in work, not yet copied out
        cur_done: Tensor | None = None
        separable, flagged = True, False
        work = rows if whole else torch.arange(r, device=dev)  # positions in rows of the samples still optimised
        frozen: Tensor | None = None  # [len(work)]: done, held until the next compaction (None: none is)
        n_frozen = 0
        state: dict[str, Tensor] = {}
        history: list[Tensor] = []  # [G] per step, read back once at the end
        checked = 0  # the steps of history whose finiteness was checked already (early stop, counts read at once)
        totals: Tensor  # [G], from every evaluation (step 0 is always one)
        lagged = _lagged_counts(self.x)
        pending: _Counts | None = None  # lagged: the previous step's counts, copied to the host asynchronously
        # the rows being optimised (positions in x), their inputs and their number; they change where rows leave
        idx, xw, n_work = rows, self.x if whole else self.x[rows], r

        start = delta

        def flush(d: Tensor) -> None:
            """Without keep-best: copy the rows in work's iterate ``d`` and last scores into the results."""
            nonlocal out_delta, out_obj, out_done
            if out_delta is None:
                out_delta = torch.empty_like(start)
                out_obj = torch.full((g, r), math.inf, device=dev)
                out_done = torch.zeros(g, r, dtype=torch.bool, device=dev)
            sel = slice(None) if whole else work
            out_delta[:, sel] = d
            if cur_per is not None:
                out_obj[:, sel] = cur_per  # type: ignore[index]
            if cur_done is not None:
                out_done[:, sel] = cur_done  # type: ignore[index]

        for step in range(steps + 1):
            final = step == steps
            if final and not final_eval and step > 0:  # the last iterate, unscored (see craft's final_eval)
                if separable and not whole:
                    flush(delta.detach())
                break
            delta.requires_grad_(not final)
            totals, per, done = _evaluate(objective, xw, idx, delta, None if final else self.augment,
                                          self.batch_size, self.generator, backward=not final)
            separable, flagged = per is not None, done is not None
            if separable and keep_best:
                assert per is not None and out_obj is not None and out_done is not None and out_delta is not None
                sel = slice(None) if whole else work
                take = per < out_obj[:, sel]
                if done is not None:
                    d_old = out_done[:, sel]
                    take = (done & ~d_old) | ((done == d_old) & take)
                    out_done[:, sel] = torch.where(take, done, d_old)
                out_obj[:, sel] = torch.where(take, per, out_obj[:, sel])
                w = take.view(*take.shape, *([1] * (delta.dim() - 2)))
                out_delta[:, sel] = torch.where(w, delta.detach(), out_delta[:, sel])
            elif separable:  # without keep-best every row takes the iterate just scored
                cur_per, cur_done = per, done
                if final and not whole:
                    flush(delta.detach())
            elif keep_best or early_stop:
                raise ConfigError("keep_best and early_stop need a separable objective (per-sample losses [B]); "
                                  "this one returned a scalar")
            if final:
                break
            history.append(totals)
            grad = delta.grad
            delta = delta.detach()
            if early_stop and done is not None:
                reached = done[0] if g == 1 else done.all(0)
                frozen = reached if frozen is None else frozen | reached
                if lagged:
                    # on CUDA a blocking read here would stall the queue every step (the GPU idles while the next
                    # step's first kernels are launched): read the previous step's counts instead, long finished,
                    # while this step's are copied behind its kernels. Decisions come a step late; a done sample is
                    # held fixed meanwhile, so the result is the same (an extra pass at most).
                    counts = torch.stack([frozen.sum(), (~torch.isfinite(totals)).sum()])
                    got, pending = pending, _Counts(counts)
                    n_seen, bad = got.read() if got is not None else (0, 0)
                else:  # read at once: the done count, and the objective's finiteness
                    if frozen.is_cpu:  # scalar reads wait for nothing here; any() is cheaper than a sum when none is
                        n_seen = int(frozen.sum()) if frozen.any() else 0
                        bad = not _all_finite(totals)
                    else:  # the step's one host synchronisation
                        n_seen, bad = torch.stack([frozen.sum(), (~torch.isfinite(totals)).sum()]).tolist()
                    checked = len(history)
                    if not n_seen:
                        frozen = None  # none done: nothing to hold, and the next step's flags are the frozen ones
                if bad:
                    _non_finite(step - lagged, history[-1 - lagged])
                if n_seen == n_work:
                    if not keep_best and not whole:
                        flush(delta)
                    break
                n_frozen = n_seen
                # drop the done rows once the passes they would still cost (n_seen x the steps left) pay for a
                # new batch shape (see _shrink_passes)
                if n_seen and n_seen * (steps - step) >= self.shrink_passes * n_work:
                    assert frozen is not None
                    if not keep_best:  # the rows dropped here keep the iterate that reached the goal
                        flush(delta)
                        cur_per = cur_done = None  # copied out: the rows kept have these scores in the results
                    keep = (~frozen).nonzero().squeeze(1)  # one host sync here; each boolean-mask index is one
                    delta, grad, work = delta[:, keep], grad[:, keep], work[keep]
                    state = {k: v[:, keep] for k, v in state.items()}
                    per = per[:, keep] if per is not None else None
                    frozen, n_frozen, pending, whole = None, 0, None, False  # the pending counts were of the rows before
                    n_work = keep.shape[0]
                    if n_work == 0:  # lagged: every sample was done by now, which the late count did not show
                        break
                    idx = rows[work]
                    xw = self.x[idx]
                if lagged:
                    n_frozen = max(n_frozen, 1)  # samples done at this step are not counted yet: hold them too
            info = StepInfo(constraint, xw, per, step, steps)
            with torch.no_grad():
                held = delta.clone() if n_frozen and frozen is not None else None
                update(delta, grad, state, lr * self.schedule(step, steps), step + 1, info)
                delta = _project(constraint, delta, xw)
                if held is not None:  # done samples not yet dropped keep the iterate that reached the goal
                    assert frozen is not None
                    f = frozen.view(1, -1, *([1] * (delta.dim() - 2)))
                    delta = torch.where(f, held, delta)
            if self.on_step is not None:
                self.on_step(step, float(totals.min()) + 0.0)  # + 0.0: the totals' -0.0 is 0.0 (see _evaluate)
        # the objective's finiteness where no step checked it, in one read (at once, or deferred: craft's
        # defer_finite_check); the rest is read back only if asked for
        last = totals
        unchecked = history[checked:] if history and last is history[-1] else [*history[checked:], last]

        def check() -> None:
            if unchecked and not _all_finite(unchecked[0] if len(unchecked) == 1 else torch.cat(unchecked)):
                _read_back(history, last, None, None, g, 0)  # raises, naming the first non-finite step

        deferred: Callable[[], None] | None = _Once(check) if self.defer_finite_check else None
        if deferred is None:
            check()
        if not separable:  # joint objective: the final iterate of every restart, ranked by its total
            read = _Once(lambda: _read_back(history, last, None, None, g, 0))
            return [_Pending(delta[k].detach(), read=lambda k=k: read()[k], check=deferred) for k in range(g)]
        if out_delta is None:  # no row left the loop: its own tensors are the results
            out_delta, out_obj, out_done = delta.detach(), cur_per, cur_done
        read = _Once(lambda: _read_back(history, last, out_obj, out_done if flagged else None, g, r))
        return [_Pending(out_delta[k], read=lambda k=k: read()[k], check=deferred) for k in range(g)]


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
    shown = (totals.detach().float() + 0.0).cpu().tolist()  # + 0.0: -0.0 shown as 0.0 (see _evaluate)
    raise ConfigError(f"objective returned a non-finite value ({shown}) at step {step}; "
                      "check the model and objective for overflow or log(0)")


def _shrink_passes(x: Tensor) -> float:
    """When early_stop drops the done samples: once the passes over them that the remaining steps would make,
    ``n_done * steps_left``, reach this many passes over the whole batch in work (``n_work``).

    On CUDA, cuDNN builds an execution plan for every new input shape, which costs about one pass: PGD-20 on 1000
    CIFAR-10 (JPEG) images, PGD-AT ResNet-18, H200, 2026-12-03: 0.95 s with a drop at every step and 0.56 s with
    drops at half the batch, about 20 ms per new shape against ~24 ms a step. A drop is made when it saves at least
    two passes (twice that cost); unlike a fixed fraction of the batch (half, until 2026-12-07), this drops a third
    of the batch early in a run (PGD-10 l2 on a PGD-AT model stops early on ~38% of its examples, which held every
    pass with the half rule) and never drops a few samples just before the last step. On the CPU a smaller batch is
    simply cheaper, so done samples leave at once."""
    return 2.0 if x.is_cuda else 0.0


def _project(constraint: Constraint, delta: Tensor, x: Tensor) -> Tensor:
    """Project each restart's delta [G, P, *shape] onto the constraint around x [P, *shape]."""
    g = delta.shape[0]
    if g == 1:
        return constraint.project(delta.squeeze(0), x).unsqueeze(0)
    flat = constraint.project(delta.flatten(0, 1), x.expand(g, *x.shape).flatten(0, 1))
    return flat.view_as(delta)


def _evaluate(objective: Objective, x: Tensor, idx_all: Tensor, delta: Tensor, augment: AugmentSpec | None,
              batch_size: int | None, generator: torch.Generator | None, *,
              backward: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Objective of each restart summed over mini-batches (gradients accumulated into delta.grad when
    ``backward``) for x [R, *shape] at positions ``idx_all`` [R]: totals [G] and, for separable
    objectives, per-sample losses [G, R] and (when the objective flags them) done flags [G, R], all
    on x's device (no host synchronisation).

    One restart in one batch without augmentation (FGSM, PGD) takes a shorter way to the same numbers: the
    objective gets x + delta[0] itself, its losses are not summed inside the graph (the backward pass starts from
    ones, the gradient that sum hands down), and the totals are not added to zeros: they may be -0.0 where the
    general way gives 0.0, which every reader of the totals turns into 0.0 (``+ 0.0``)."""
    g, n = delta.shape[0], x.shape[0]
    bs = batch_size or n
    if g == 1 and bs >= n and augment is None:
        with nullcontext() if torch.is_grad_enabled() == backward else torch.set_grad_enabled(backward):
            # x + delta[0] through a view, so the backward pass hands delta its gradient as is (slicing and
            # selecting would each add a zero-filled copy of the batch)
            out = objective(x + delta.squeeze(0), idx_all)
            done = None
            if isinstance(out, tuple):
                out, done = out
            separable = out.shape == (n,)
            if not separable and out.dim() != 0:
                _separable(out.unsqueeze(0), 1, n)  # raises
            if backward:
                if separable:
                    out.backward(torch.ones_like(out))
                else:
                    out.backward()
        scored = out.detach().unsqueeze(0)  # [1, n] or [1]
        if not separable:
            return scored.float(), None, None
        return (scored.sum(1).float(), scored.float(),
                None if done is None else done.detach().view(1, n).bool())
    totals = torch.zeros(g, device=x.device)
    parts: list[Tensor] = []
    flags: list[Tensor] = []
    separable = True
    for i in range(0, n, bs):
        loc = slice(i, min(i + bs, n))
        idx, b = idx_all[loc], min(i + bs, n) - i
        with torch.set_grad_enabled(backward):
            xa = x[loc].unsqueeze(0) + delta[:, loc]  # [G, B, *shape]
            if augment is not None:
                assert generator is not None
                flat = apply_augment_differentiable(xa.flatten(0, 1), augment.sample(g * b, generator=generator,
                                                                                     device=x.device))
                xa = flat.view_as(xa)
            out = objective(xa[0], idx) if g == 1 else objective.batched(xa, idx)  # type: ignore[attr-defined]
            done = None
            if isinstance(out, tuple):
                out, done = out
            out = out.unsqueeze(0) if g == 1 else out
            if _separable(out, g, b):
                parts.append(out.detach().float())
                if done is not None:
                    flags.append(done.detach().view(g, b).bool())
                loss_g = out.sum(1)
            else:
                separable = False
                loss_g = out
            if backward:
                loss_g.sum().backward()
        totals += loss_g.detach().float()
    per = torch.cat(parts, 1) if separable and parts else None
    done_all = torch.cat(flags, 1) if separable and flags and len(flags) == len(parts) else None
    return totals, per, done_all


def _separable(out: Tensor, g: int, b: int) -> bool:
    """Whether an objective's output ``out`` ([G, B] per sample, or [G] joint; for one restart with the restart
    axis added) is per sample; ConfigError if it is neither."""
    if out.shape == (g, b):
        return True
    if out.shape == (g,):
        return False
    want = f"a scalar or [B={b}]" if g == 1 else f"[G={g}] or [G={g}, B={b}]"
    got = list(out.shape[1:]) if g == 1 else list(out.shape)
    raise ConfigError(f"objective must return {want} losses, got {got}")


def _all_finite(t: Tensor) -> bool:
    """Whether every value of t is finite, in one host read: a finite sum has finite terms (an overflowing sum
    of finite terms is checked value by value)."""
    if t.numel() == 1:
        return math.isfinite(t.item())
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class _Once:
    """``fn()``, computed at the first call and kept."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.value, self.done = fn, None, False

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


def _read_back(history: list[Tensor], last: Tensor, out_obj: Tensor | None, out_done: Tensor | None, g: int,
               r: int) -> list[dict[str, Any]]:
    """The host-side fields of each restart's result, in one device -> host copy (each read is a synchronisation,
    and the time between them is time the caller waits with the GPU idle): ``objective``, ``history`` and, with
    ``out_obj`` [G, R] (separable), ``per_sample`` and ``done`` (from ``out_done`` [G, R], if flagged). ConfigError
    at the first step whose objective is not finite."""
    n_hist = len(history) * g
    parts = [*history, last.float()]
    if out_obj is not None:
        parts.append(out_obj.flatten())
        if out_done is not None:
            parts.append(out_done.flatten().float())
    host = torch.cat(parts).cpu()
    host[:n_hist + g].add_(0.0)  # -0.0 -> 0.0, as totals accumulated onto zeros have it (see _evaluate)
    steps_g = host[:n_hist].view(-1, g).tolist()  # [steps][G]
    last_g = host[n_hist:n_hist + g].tolist()
    for s, row in enumerate([*steps_g, last_g]):
        if not all(math.isfinite(v) for v in row):
            _non_finite(s, torch.tensor(row))
    if out_obj is None:  # joint objective: the final iterate of every restart, ranked by its total
        return [{"objective": last_g[k], "per_sample": None, "history": [h[k] for h in steps_g], "done": None}
                for k in range(g)]
    obj = host[n_hist + g:n_hist + g + g * r].view(g, r)
    done = host[n_hist + g + g * r:].view(g, r).bool() if out_done is not None else None
    return [{"objective": float(obj[k].sum()), "per_sample": obj[k], "history": [h[k] for h in steps_g],
             "done": None if done is None else done[k]} for k in range(g)]


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
