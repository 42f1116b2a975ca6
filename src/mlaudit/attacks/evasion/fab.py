"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted Adversarial
Examples with a Fast Adaptive Boundary Attack", Algorithm 1), and its targeted version FAB-T as run by
AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", sec. 5). A minimal-norm attack: it looks for the smallest l-inf, l2 or l1
perturbation that changes the decision, with no step size to tune.

Per example (x_orig [D] flattened, true class y, current point x^(i), all in the pixel box C = [lo, hi]^D):

1. **Linearise** at x^(i): f_s(x) = z_s(x) - z_y(x) (negative while x is classified as y) with gradient
   w_s = grad_x f_s(x^(i)) [D]. Untargeted (``fab``) uses the class s != y whose linearised boundary is
   closest, s = argmin_s |f_s(x^(i))| / ||w_s||_q (q the dual norm: l1 for l-inf, l2 for l2, l-inf for l1;
   eq. 6);
   FAB-T uses the given target t. The hyperplane pi_s = {z: f_s(x^(i)) + <w_s, z - x^(i)> = 0}.
2. **Project** x^(i) and x_orig onto pi_s intersected with the box (eq. 4, solved exactly, see
   :func:`project_hyperplane_box`): delta = proj_p(x^(i), pi_s, C) - x^(i) and delta_orig =
   proj_p(x_orig, pi_s, C) - x_orig.
3. **Biased step** towards x_orig (eq. 8 and 9): alpha = min(||delta||_p / (||delta||_p +
   ||delta_orig||_p), ``alpha_max``), x^(i+1) = P_C((1 - alpha)(x^(i) + ``eta`` delta) + alpha (x_orig +
   ``eta`` delta_orig)) (eta > 1 overshoots the linearised boundary slightly).
4. **Backward step** once x^(i+1) is adversarial: record it if ||x^(i+1) - x_orig||_p is the smallest
   so far, then x^(i+1) <- x_orig + ``beta`` (x^(i+1) - x_orig) (sec. 3.2), to search closer to x_orig.

Restarts: the first run starts at x_orig, every further one (``restarts`` > 1) at a uniform random point of
the l_p ball of radius min(eps, ||best||_p) / 2 around x_orig (clipped to the box; sec. 3.3; for l1 a point
of the cross-polytope, :func:`_uniform_l1_ball`); without eps,
only examples with an adversarial point found are restarted (a start at x_orig would repeat the first
run). Each gradient is one backward pass of the batch sum of the per-example differences (examples are
independent for a model in eval mode, which :func:`check_inputs` enforces); the untargeted version needs
one backward pass per class, FAB-T one per step, and each step one more forward pass to check the new point.

* ``fab``: untargeted (closest boundary over all classes); with ``target`` [N] it linearises the
  boundary between that class and the class scoring highest among the others (y at the start), and an
  example counts as fooled only once it is classified as its target.
* ``fab_targeted`` (``fab-t``, AutoAttack's FAB-T): for k = 2 .. ``n_target_classes`` + 1 the boundary
  to the k-th highest-scoring class of the clean input (the highest non-true class first), each target
  run only on the examples not yet broken; the goal is misclassification, as in AutoAttack.

With ``eps`` (the AutoAttack convention) an example counts as broken when its smallest adversarial
perturbation has norm <= eps; then x_adv is that point, else x itself (so x_adv is always in the eps-ball).
Without eps (None) x_adv is the smallest adversarial point found (x where none was), as for CW.
Shapes: x [N, *shape] in ``box``, y [N], target [N]; x_adv [N, *shape].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import forward_batched
from ...query.modes import evaluating
from .base import NORMS, MinNorm, check_inputs, check_positive, check_target, register_evasion

_BIG = 1e30
"""Stands for an infinite breakpoint (a coordinate the hyperplane's normal does not touch)."""
FAB_NORMS = ("linf", "l2", "l1")
"""The norms FAB takes: the engine's two and l1 (its own projection, no engine ball needed)."""


def project_hyperplane_box(p: Tensor, w: Tensor, r: Tensor, lo: float, hi: float, norm: str) -> Tensor:
    """The exact minimal-norm step onto a hyperplane inside a box, per example (batched):

        delta* = argmin ||delta||_p  subject to  <w, delta> = r  and  lo <= p + delta <= hi

    for points p [B, D] in the box, normals w [B, D] and offsets r [B]; returns delta* [B, D]. Where the
    box makes the hyperplane unreachable, delta* is the box corner that goes furthest towards it. For
    ``norm="l1"`` see :func:`_project_l1` (a linear programme, solved greedily).

    Flip w so that r >= 0. The optimum is delta_i = sign(w_i) min(lam a_i, m_i), with m_i >= 0 the room to
    the box in the direction sign(w_i) and a_i = |w_i| (l2, the KKT conditions) or 1 for w_i != 0 (l-inf:
    lam is the common magnitude ||delta||_inf); coordinates with w_i = 0 stay 0. Then g(lam) = <w, delta>
    = sum_i |w_i| min(lam a_i, m_i) is non-decreasing and piecewise linear with breakpoints m_i / a_i:
    sort them, evaluate g at each (cumulative sums), find the segment where g crosses r and solve the
    linear piece there for lam. O(D log D) per example, no iteration."""
    dt = torch.float64
    p, w, r = p.to(dt), w.to(dt), r.to(dt)
    s = torch.where(r < 0, -1.0, 1.0).to(dt)
    w, r = w * s[:, None], r * s
    sign = w.sign()
    room = torch.where(w > 0, hi - p, p - lo).clamp_min(0)                         # m [B, D]
    aw = w.abs()
    if norm == "l1":
        return sign * _project_l1(aw, room, r)
    a = aw if norm == "l2" else (aw > 0).to(dt)                                    # a [B, D]
    brk = torch.where(a > 0, room / a.clamp_min(1e-300), torch.full_like(room, _BIG))
    brk, order = brk.sort(1)
    clip_part = (aw * room).gather(1, order).cumsum(1)                             # sum_{j<=k} |w| m
    slope = (aw * a).gather(1, order)
    tail = slope.flip(1).cumsum(1).flip(1)                                          # sum_{j>=k} |w| a
    after = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)              # sum_{j>k} |w| a
    g = clip_part + brk * after                                                     # g at each breakpoint
    k = (g < r[:, None]).sum(1)                                                     # first k with g_k >= r
    d = p.shape[1]
    kk = k.clamp(max=d - 1)[:, None]
    before = torch.where(k > 0, clip_part.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    lam = (r - before) / tail.gather(1, kk)[:, 0].clamp_min(1e-300)
    lam = torch.where(k < d, lam.clamp_min(0), torch.full_like(lam, _BIG))
    return sign * torch.minimum(lam[:, None] * a, room)


def _project_l1(aw: Tensor, room: Tensor, r: Tensor) -> Tensor:
    """The l1 case of :func:`project_hyperplane_box` (FAB paper, sec. 3.1: the projection onto the hyperplane
    and the box for p = 1), after the flip to r >= 0: the magnitudes t [B, D] of

        min sum_i t_i  subject to  sum_i |w_i| t_i = r  and  0 <= t_i <= m_i

    (delta_i = sign(w_i) t_i; moving a coordinate against sign(w_i) lowers <w, delta> and costs l1, so it
    never helps). A fractional knapsack: each unit of l1 spent on coordinate i buys |w_i| of the offset,
    so spend it where |w_i| is largest. Sort the coordinates by |w_i| descending, saturate them at their
    room m_i until the next one's gain |w_k| m_k would overshoot r, and move that one by the remainder
    (r - sum_{j<k} |w_j| m_j) / |w_k|: an optimal vertex of the LP (ties in |w_i| give other optima of the
    same l1 norm). If sum_i |w_i| m_i < r the hyperplane is out of the box's reach and every coordinate is
    saturated (the box corner furthest towards it, as for l2 and l-inf). aw = |w| [B, D], room m [B, D] >= 0,
    r [B] >= 0; O(D log D) per example."""
    aw_s, order = aw.sort(1, descending=True)
    room_s = room.gather(1, order)
    gain = (aw_s * room_s).cumsum(1)                                                # sum_{j<=k} |w_j| m_j
    k = (gain < r[:, None]).sum(1, keepdim=True)                                    # the first k with gain_k >= r
    before = torch.where(k > 0, gain.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(k, dtype=gain.dtype))
    last = ((r[:, None] - before) / aw_s.gather(1, k.clamp(max=aw.shape[1] - 1)).clamp_min(1e-300))
    last = torch.minimum(last.clamp_min(0), room_s.gather(1, k.clamp(max=aw.shape[1] - 1)))
    idx = torch.arange(aw.shape[1], device=aw.device)[None]
    t_s = torch.where(idx < k, room_s, torch.where(idx == k, last, torch.zeros_like(room_s)))
    return torch.zeros_like(t_s).scatter(1, order, t_s)


def _size(d: Tensor, norm: str) -> Tensor:
    """||d||_p per example of d [B, *shape]: [B]."""
    flat = d.flatten(1)
    if norm == "l1":
        return flat.abs().sum(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _linearise(model: nn.Module, x: Tensor, y: Tensor, t: Tensor | None, norm: str,
               goal_target: bool = False) -> tuple[Tensor, Tensor]:
    """(f [B], w [B, D]): f = z_s - z_y at x [B, *shape] and its gradient, s the target t or (untargeted) the
    class of the closest linearised boundary |f_s| / ||w_s||_q. With ``goal_target`` the rival of t is the
    class scoring highest among the others at x (y at the start), not always y: f = z_t - max_{k != t} z_k."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
        if t is not None:
            rival = z.detach().scatter(1, t[:, None], float("-inf")).argmax(1)[:, None] if goal_target else y[:, None]
            f = z.gather(1, t[:, None])[:, 0] - z.gather(1, rival)[:, 0]
            (w,) = torch.autograd.grad(f.sum(), xg)
            return f.detach(), w.flatten(1)
        c = z.shape[1]
        jac = torch.stack([torch.autograd.grad(z[:, k].sum(), xg, retain_graph=k < c - 1)[0].flatten(1)
                           for k in range(c)], 1)                                  # [B, C, D]
    rows = torch.arange(len(x), device=x.device)
    f_all = (z - z.gather(1, y[:, None])).detach()                                  # [B, C]
    w_all = jac - jac[rows, y][:, None]                                             # [B, C, D]
    dual = {"linf": lambda: w_all.abs().sum(2), "l2": lambda: w_all.norm(dim=2), "l1": lambda: w_all.abs().amax(2)}[norm]()
    dist = f_all.abs() / (dual + 1e-12)
    dist[rows, y] = float("inf")
    s = dist.argmin(1)
    return f_all[rows, s], w_all[rows, s]


def _uniform_l1_ball(x0: Tensor, gen: torch.Generator) -> Tensor:
    """A uniform point [B, *shape] of the unit l1 ball (cross-polytope) in the dimension D of x0 [B, *shape]:
    with E_1 .. E_{D+1} i.i.d. standard exponential, (E_1 .. E_D) / sum_{j<=D+1} E_j is uniform on the
    simplex {u >= 0, sum u <= 1}; independent random signs spread it over the 2^D orthants."""
    flat = x0.flatten(1)
    e = -torch.rand(len(flat), flat.shape[1] + 1, generator=gen, dtype=torch.float64).clamp_min(1e-300).log()
    u = e[:, :-1] / e.sum(1, keepdim=True)
    signs = torch.randint(0, 2, u.shape, generator=gen, dtype=torch.float64) * 2 - 1
    return (u * signs).to(x0.dtype).to(x0.device).view_as(x0)


def _random_start(x0: Tensor, radius: Tensor, norm: str, box: tuple[float, float], gen: torch.Generator) -> Tensor:
    """A uniform point of the l_p ball of per-example ``radius`` [B] around x0 [B, *shape], clipped to the box."""
    unit = (_uniform_l1_ball(x0, gen) if norm == "l1"
            else NORMS[norm](1.0, box=(-math.inf, math.inf)).random_init(x0, gen))
    return (x0 + unit * radius.view(-1, *([1] * (x0.dim() - 1)))).clamp(*box)


def _single_run(model: nn.Module, x0: Tensor, y: Tensor, t: Tensor | None, *, norm: str, box: tuple[float, float],
                steps: int, alpha_max: float, eta: float, beta: float, start: Tensor,
                goal_target: bool) -> tuple[Tensor, Tensor]:
    """One FAB run from ``start`` on x0 [B, *shape]: (smallest adversarial point [B, *shape] (x0 where
    none), its norm [B] (inf where none))."""
    lo, hi = box
    shape = x0.shape
    best_x, best_d = x0.clone(), torch.full((len(x0),), math.inf, dtype=x0.dtype, device=x0.device)
    x_cur = start.clone()
    flat0 = x0.flatten(1)
    for _ in range(steps):
        f, w = _linearise(model, x_cur, y, t, norm, goal_target)
        flat = x_cur.flatten(1)
        r_cur = -f                                                                  # <w, delta> = -f at x_cur
        r_orig = -(f + ((flat0 - flat) * w).sum(1))                                 # the same plane seen from x0
        steps_both = project_hyperplane_box(torch.cat([flat, flat0]), torch.cat([w, w]),
                                            torch.cat([r_cur, r_orig]), lo, hi, norm).to(x0.dtype)
        d_cur, d_orig = steps_both[: len(x0)], steps_both[len(x0):]
        n_cur, n_orig = _size(d_cur, norm).clamp_min(1e-8), _size(d_orig, norm).clamp_min(1e-8)
        alpha = (n_cur / (n_cur + n_orig)).clamp(0, alpha_max)[:, None]
        flat = ((1 - alpha) * (flat + eta * d_cur) + alpha * (flat0 + eta * d_orig)).clamp(lo, hi)
        x_cur = flat.view(shape)
        with torch.no_grad():
            pred = model(x_cur).argmax(1)
        adv = pred == t if goal_target and t is not None else pred != y
        if bool(adv.any()):
            size = _size(x_cur - x0, norm)
            better = adv & (size < best_d)
            best_d = torch.where(better, size, best_d)
            best_x[better] = x_cur[better]
            x_cur = torch.where(adv.view(-1, *([1] * (x0.dim() - 1))), x0 + beta * (x_cur - x0), x_cur)
    return best_x, best_d


def _attack(model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, *, eps: float | None, norm: str,
            box: tuple[float, float], steps: int, restarts: int, alpha_max: float, eta: float, beta: float,
            goal_target: bool, batch_size: int | None, generator: torch.Generator | None) -> Tensor:
    """FAB over the target columns of ``targets`` [N, K] (None: untargeted) and ``restarts`` runs each, only
    on the examples classified correctly and not yet broken within eps."""
    y = y.to(x.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = x.detach()
    n = len(x)
    with torch.no_grad():
        clean_ok = forward_batched(model, x, device=x.device).argmax(1) == y
    best_x, best_d = x.clone(), torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    limit = math.inf if eps is None else eps
    columns = [None] if targets is None else list(targets.T)
    step = n if batch_size is None else batch_size
    with evaluating(model, requires_grad=False):
        for col in columns:
            for run in range(restarts):
                todo = clean_ok & ~(best_d <= (eps if eps is not None else -1.0))
                radius = torch.minimum(best_d, torch.full_like(best_d, limit)) / 2  # of a random start
                if run > 0:  # no radius (no eps, nothing found): a random start would repeat the first run
                    todo &= radius.isfinite()
                todo = todo.nonzero()[:, 0]
                for i in range(0, len(todo), step):
                    rows = todo[i: i + step]
                    x0 = x[rows]
                    start = x0 if run == 0 else _random_start(x0, radius[rows], norm, box, gen)
                    adv, d = _single_run(model, x0, y[rows], None if col is None else col[rows], norm=norm, box=box,
                                         steps=steps, alpha_max=alpha_max, eta=eta, beta=beta, start=start,
                                         goal_target=goal_target)
                    better = d < best_d[rows]
                    best_d[rows[better]] = d[better]
                    best_x[rows[better]] = adv[better]
    keep = best_d <= limit
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), best_x, x).detach()


def _check(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, norm: str, box: tuple[float, float],
           name: str, **counts: float | None) -> int:
    c = check_inputs(model, x, y, eps=eps, norm=norm, box=box, norms=FAB_NORMS)
    check_positive(name, **counts)
    if not (counts["alpha_max"] <= 1 and counts["beta"] <= 1):  # type: ignore[operator]
        raise ConfigError(f"{name}: alpha_max={counts['alpha_max']}, beta={counts['beta']}; allowed 0 < alpha_max <= 1 "
                          "(the largest pull towards x) and 0 < beta <= 1 (the backward step's shrink factor)")
    return c


@register_evasion("fab")
def fab(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | None = None, norm: MinNorm = "linf", steps: int = 100,
        restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, target: Tensor | None = None,
        box: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None,
        generator: torch.Generator | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] (target [N] optional) -> x_adv [N, *shape]: FAB (see the module
    docstring). With ``eps``: the smallest adversarial point where its norm is <= eps, else x; without:
    the smallest adversarial point found (x where none was)."""
    c = _check(model, x, y, eps, norm, box, "fab", steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta,
               beta=beta, batch_size=batch_size)
    t = check_target(target, y.to(x.device), c)
    if eps == 0:
        return x.detach().clone()
    return _attack(model, x, y, None if t is None else t.to(x.device)[:, None], eps=eps, norm=norm, box=box,
                   steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, goal_target=t is not None,
                   batch_size=batch_size, generator=generator)


def fab_targets(z: Tensor, y: Tensor, k: int) -> Tensor:
    """AutoAttack's target classes [N, k] from clean logits z [N, C]: the 2nd, 3rd, ... (k+1)-th highest
    scoring classes, skipping y (for a correctly classified example, the highest non-true classes)."""
    return z.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :k]


@register_evasion("fab-t")
def fab_targeted(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | None = None, norm: MinNorm = "linf",
                 steps: int = 100, restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, box: tuple[float, float] = (0.0, 1.0),
                 batch_size: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape]: FAB-T over the ``n_target_classes``
    highest-scoring wrong classes (at most C - 1), each on the examples still unbroken (misclassified
    within eps, or at all without eps)."""
    c = _check(model, x, y, eps, norm, box, "fab-t", steps=steps, restarts=restarts, n_target_classes=n_target_classes,
               alpha_max=alpha_max, eta=eta, beta=beta, batch_size=batch_size)
    if eps == 0:
        return x.detach().clone()
    y = y.to(x.device)
    with torch.no_grad():
        z = forward_batched(model, x.detach(), device=x.device)
    targets = fab_targets(z, y, min(n_target_classes, c - 1))
    return _attack(model, x, y, targets, eps=eps, norm=norm, box=box, steps=steps, restarts=restarts,
                   alpha_max=alpha_max, eta=eta, beta=beta, goal_target=False, batch_size=batch_size,
                   generator=generator)
