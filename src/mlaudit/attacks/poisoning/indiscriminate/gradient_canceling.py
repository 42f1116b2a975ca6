"""The gradient-canceling attack (seed 001, "Definition: Gradient Canceling Attack"; Lu, Kamath & Yu,
"Exploring the limits of model-targeted indiscriminate data poisoning attacks", ICML 2023).

Threat model: indiscriminate, model-targeted, white-box. The attacker knows the clean training set
mu (N points), the victim's loss and weight decay, and picks target parameters w_t (seed 001: from
GradPC, :mod:`.param_corruption`). It *inserts* P = eps_d N points nu (inputs in the pixel box, any
labels) so that w_t becomes a stationary point of the victim's poisoned training objective; a victim
retrained from scratch on mu + nu then lands near w_t if the objective is (near) convex.

Objective (seed 001), minimised over the poison inputs x_j (and labels y_j):

    1/2 || g(mu; w_t) + eps_d g(nu; w_t) ||^2,   g(nu; w) = (1/P) sum_j grad_w l(x_j, y_j; w),

with l the victim's per-example loss (cross-entropy, with the recipe's label smoothing). Our choice:
the stationarity is that of the objective *the victim minimises*: the recipe's weight decay lambda
adds lambda w to the gradient of each term (``g(mu) + lambda w + eps_d (g(nu) + lambda w)``, i.e.
(1 + eps_d) times the gradient of mean loss + lambda/2 ||w||^2 on the union); ``weight_decay=0`` gives
seed 001's objective verbatim.

Inputs are optimised by :func:`mlaudit.craft.craft` under :class:`~mlaudit.craft.Box` (the valid pixel
range; no norm ball: the points are inserted, not perturbations of clean points), starting from
randomly drawn clean training inputs. The objective couples all poisons, so craft sees them as one
batch; :class:`GradientCanceling` evaluates it in chunks with an exact chunked backward (a custom
autograd function: the residual R is computed first, then d/dx_j 1/2||R||^2 = (1/N) d/dx_j <R,
grad_w l(x_j, y_j)> chunk by chunk), so memory stays bounded for any P.

Labels (seed 001 leaves them open): each poison gets the label whose gradient points most against
the residual to first order, ``y_j = argmin_c <R, grad_w l(x_j, c)> = argmax_c (J_w f(x_j) R)_c`` (one
forward-mode JVP for all points and classes), switched for the best line-searched share of the poisons
(:func:`improve_labels`) before crafting, every ``relabel_every`` steps (0: never in between) and after
the last step; a relabelling is kept only when it lowers the exact objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ....craft import Box, craft
from ....data.view import DataView
from ....errors import ConfigError
from ....query import ParamVector, param_grad
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from ._functional import mean_loss_and_grad, num_poisons, require_smooth, sample_rows
from .param_corruption import TargetOptions, corrupted_target, refuse_batchnorm


class GradientCanceling:
    """Objective ``(x_adv [P, *shape], idx [P]) -> scalar`` 1/2 ||R||^2 for :func:`craft` with
    ``batch_size=None`` (module docstring). ``model`` holds the target w_t; ``clean_x`` [N, *shape],
    ``clean_y`` [N]; ``labels`` [P] the poisons' current labels (settable). eps_d = P / N."""

    def __init__(self, model: nn.Module, clean_x: Tensor, clean_y: Tensor, *, labels: Tensor,
                 weight_decay: float = 0.0, label_smoothing: float = 0.0, chunk_size: int = 1024) -> None:
        require_smooth(model, "gradient canceling")
        if labels.dim() != 1 or labels.numel() < 1:
            raise ConfigError(f"labels must be [P >= 1] poison labels, got shape {list(labels.shape)}")
        if weight_decay < 0 or not 0 <= label_smoothing < 1:
            raise ConfigError(f"need weight_decay >= 0 and 0 <= label_smoothing < 1, got {weight_decay}, "
                              f"{label_smoothing}")
        self.model = model.eval()
        self.w = ParamVector.from_module(model)
        self.n = int(clean_x.shape[0])
        self.labels = labels.to(clean_x.device)
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        _, g = mean_loss_and_grad(model, self.w, clean_x, clean_y, label_smoothing=label_smoothing,
                                  chunk_size=chunk_size)
        self.clean = g + weight_decay * self.w  # g(mu; w_t) + lambda w_t

    @property
    def eps_d(self) -> float:
        return self.labels.numel() / self.n

    def residual(self, x: Tensor, labels: Tensor | None = None) -> ParamVector:
        """R = g(mu) + lambda w + eps_d (g(nu) + lambda w) for poisons x [P, ...] (no graph)."""
        y = self.labels if labels is None else labels
        _, gp = mean_loss_and_grad(self.model, self.w, x.detach(), y, label_smoothing=self.label_smoothing,
                                   chunk_size=self.chunk_size)
        e = y.numel() / self.n
        return self.clean + e * (gp + self.weight_decay * self.w)

    def value(self, x: Tensor, labels: Tensor | None = None) -> float:
        """The objective 1/2 ||R||^2 at poisons x [P, ...] (and ``labels``, default the current ones)."""
        r = self.residual(x, labels)
        return 0.5 * float(r.dot(r))

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        if idx.numel() != self.labels.numel():
            raise ConfigError(f"gradient canceling couples all {self.labels.numel()} poisons; call craft with "
                              f"batch_size=None (got a batch of {idx.numel()})")
        return _HalfSquaredResidual.apply(x_adv, self)

    def input_grad(self, x: Tensor, r: ParamVector) -> Tensor:
        """d/dx 1/2||R||^2 = (1/N) d/dx sum_j <R, grad_w l(x_j, y_j)> with R fixed, chunk by chunk."""
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], self.chunk_size):
            with torch.enable_grad():  # called from a backward pass, where grad mode is off
                xc = x[i:i + self.chunk_size].detach().requires_grad_(True)
                yc = self.labels[i:i + self.chunk_size]
                gs = param_grad(self.model, lambda f, xc=xc, yc=yc: F.cross_entropy(
                    f(xc), yc, reduction="none", label_smoothing=self.label_smoothing).sum(),
                    params=self.w, create_graph=True)
                s = r.dot(gs) / self.n
                out[i:i + self.chunk_size] = torch.autograd.grad(s, xc)[0]
        return out

    @torch.no_grad()
    def label_scores(self, x: Tensor, r: ParamVector) -> Tensor:
        """(J_w f(x_j) R)_c for every poison and class, float [P, K]: <R, grad_w l(x_j, c)> equals
        <p_j, sdot_j> - sdot_jc (hard labels), so a larger score means a label more against R."""
        out = []
        for i in range(0, x.shape[0], self.chunk_size):
            xc = x[i:i + self.chunk_size]
            _, sdot = jvp(lambda p, xc=xc: functional_call(self.model, p, (xc,)), (dict(self.w),), (dict(r),))
            out.append(sdot.float())
        return torch.cat(out)


class _HalfSquaredResidual(torch.autograd.Function):
    """1/2 ||R(x)||^2 with a chunked backward (memory O(chunk), not O(P))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, obj: GradientCanceling) -> Tensor:  # type: ignore[override]
        r = obj.residual(x)
        ctx.obj, ctx.r = obj, r
        ctx.save_for_backward(x)
        return 0.5 * r.dot(r).detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out * ctx.obj.input_grad(x, ctx.r), None


@dataclass
class CancelingResult:
    """Poisons ``x`` [P, *shape] in [0, 1] and labels ``y`` [P]; the objective 1/2||R||^2 at the start
    and end; ``clean_grad_norm`` ||g(mu; w_t) + lambda w_t|| (the target's gradient without poisons)
    and ``residual_norm`` ||R|| at the end (seed 001's quantity; ``relative`` = their ratio);
    ``history`` the objective per step; ``relabels`` how many labels were changed (kept switches)."""

    x: Tensor
    y: Tensor
    objective_init: float
    objective: float
    clean_grad_norm: float
    residual_norm: float
    relabels: int
    history: list[float] = field(default_factory=list)

    @property
    def relative(self) -> float:
        return self.residual_norm / self.clean_grad_norm if self.clean_grad_norm > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {"objective_init": self.objective_init, "objective": self.objective,
                "clean_grad_norm": self.clean_grad_norm, "residual_norm": self.residual_norm,
                "relative_residual": self.relative, "relabels": self.relabels, "poisons": int(self.y.numel())}


def improve_labels(obj: GradientCanceling, x: Tensor, *, rounds: int = 10, halvings: int = 6) -> int:
    """Relabel poisons in place (``obj.labels``) while the exact objective drops; returns how many
    labels changed in total.

    Each round: every poison's first-order best label c*_j = argmax_c (J_w f(x_j) R)_c and its gain
    ``<R, g_j(y_j) - g_j(c*_j)>``; the residual change dR of switching *all* improving poisons gives the
    exact line-search fraction gamma = -<R, dR>/||dR||^2 (the objective is quadratic in the labels'
    one-hot codes), and the ceil(gamma * S) poisons of largest gain are switched (halving the count
    until the exact objective drops; a round that finds no drop ends the search).
    """
    changed = 0
    for _ in range(rounds):
        r = obj.residual(x)
        cur = 0.5 * float(r.dot(r))
        sdot = obj.label_scores(x, r)
        best = sdot.argmax(1)
        gain = sdot.gather(1, best[:, None])[:, 0] - sdot.gather(1, obj.labels[:, None])[:, 0]
        movers = (gain > 0).nonzero()[:, 0]
        if movers.numel() == 0:
            break
        cand = obj.labels.clone()
        cand[movers] = best[movers]
        dr = obj.residual(x, cand) - r
        dd = float(dr.dot(dr))
        gamma = min(max(-float(r.dot(dr)) / dd, 0.0), 1.0) if dd > 0 else 0.0
        order = movers[gain[movers].argsort(descending=True)]
        k = max(1, math.ceil(gamma * order.numel()))
        accepted = False
        for _ in range(halvings):
            cand = obj.labels.clone()
            cand[order[:k]] = best[order[:k]]
            if obj.value(x, cand) < cur:
                obj.labels, changed, accepted = cand, changed + k, True
                break
            if k == 1:
                break
            k = max(1, k // 2)
        if not accepted:
            break
    return changed


def gradient_canceling(model: nn.Module, clean_x: Tensor, clean_y: Tensor, *, eps_d: float, steps: int = 200,
                       lr: float = 0.01, optimizer: Literal["adam", "signed-adam", "pgd"] = "adam",
                       schedule: Literal["constant", "cosine", "step"] = "cosine", relabel_every: int = 0,
                       label_rounds: int = 10, weight_decay: float = 0.0, label_smoothing: float = 0.0, chunk_size: int = 1024,
                       generator: torch.Generator | None = None,
                       on_step: Callable[[int, float], None] | None = None) -> CancelingResult:
    """Craft P = round(eps_d N) poisons making ``model``'s parameters (the target w_t) stationary for
    the poisoned training objective (module docstring). ``clean_x`` [N, *shape] in [0, 1], ``clean_y`` [N].

    ``steps`` craft steps, in segments of ``relabel_every`` steps with relabelling in between (0: one
    segment; labels are chosen before and after it), ``lr`` in pixel units (craft's Box scale),
    ``schedule`` per segment, ``label_rounds`` line-searched rounds per relabelling.
    """
    if steps < 0 or relabel_every < 0:
        raise ConfigError(f"need steps >= 0 and relabel_every >= 0, got {steps}, {relabel_every}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    p = num_poisons(eps_d, clean_x.shape[0])
    rows = sample_rows(clean_x.shape[0], p, gen).to(clean_x.device)
    x = clean_x[rows].clone()
    obj = GradientCanceling(model, clean_x, clean_y, labels=clean_y[rows].clone(), weight_decay=weight_decay,
                            label_smoothing=label_smoothing, chunk_size=chunk_size)
    init = obj.value(x)
    relabels = improve_labels(obj, x, rounds=label_rounds)
    history: list[float] = []
    seg = relabel_every or max(steps, 1)
    done = 0
    while done < steps:
        n_steps = min(seg, steps - done)
        offset = done
        res = craft(obj, x, constraint=Box(), steps=n_steps, optimizer=optimizer, lr=lr, schedule=schedule,
                    generator=gen, on_step=None if on_step is None else (lambda s, v, o=offset: on_step(o + s, v)))
        x = (x + res.delta).clamp(0, 1)
        history += res.history
        done += n_steps
        if relabel_every or done >= steps:
            relabels += improve_labels(obj, x, rounds=label_rounds)
    r = obj.residual(x)
    final = 0.5 * float(r.dot(r))
    return CancelingResult(x.detach(), obj.labels.clone(), init, final, float(obj.clean.dot(obj.clean)) ** 0.5,
                           math.sqrt(2 * final), relabels, history)


class CancelingOptions(TargetOptions):
    """The GradPC target's options, ``relabel_every`` craft steps between relabellings (0: only
    before and after), ``label_rounds`` line-searched rounds per relabelling, and ``reach_tol``: the
    target counts as reached when ||residual|| / ||g(mu; w_t) + lambda w_t|| <= reach_tol."""

    relabel_every: int = Field(0, ge=0, le=100_000)
    label_rounds: int = Field(10, ge=0, le=1000)
    reach_tol: float = Field(0.1, gt=0.0, lt=1.0)


@register_poisoner("gradient-canceling", family="indiscriminate", needs=Needs.CRAFTING_MODELS,
                   options=CancelingOptions, check_model=refuse_batchnorm, model_count=1,
                   defaults={"steps": 300, "lr": 0.01, "optimizer": "adam", "schedule": "cosine"})
def gradient_canceling_poison(task: PoisonTask) -> Poison:
    """Gradient canceling (Lu, Kamath & Yu 2023): insert eps_d N points making the GradPC target stationary."""
    opts: CancelingOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    s = task.crafting_settings
    x, y = task.train.x.to(task.device), task.train.y.to(task.device)
    decay = opts.decay(task.victim.weight_decay)
    target, tinfo = corrupted_target(task.models[0], x, y, opts, num_classes=task.num_classes, weight_decay=decay,
                                     generator=task.generator())
    res = gradient_canceling(target, x, y, eps_d=task.inserted_fraction(), steps=s.steps, lr=s.lr,
                             optimizer=s.optimizer, schedule=s.schedule, relabel_every=opts.relabel_every,
                             label_rounds=opts.label_rounds, weight_decay=decay,
                             label_smoothing=task.victim.label_smoothing, chunk_size=opts.chunk_size,
                             generator=task.generator(), on_step=task.on_step)
    view = DataView.identity(task.train).with_inserted(res.x.cpu(), res.y.cpu()).with_meta(
        method="gradient-canceling", eps_d=task.eps_d, eps_w=opts.eps_w)
    notes = (["the victim recipe uses label smoothing: gradient canceling includes it, tau is for hard labels"]
             if task.victim.label_smoothing > 0 else [])
    info = {"poisons": int(res.y.numel()), **res.summary(), "reached": bool(res.relative <= opts.reach_tol),
            "reach_tol": opts.reach_tol, "history": res.history[:: max(1, len(res.history) // 100)],
            "targets": [tinfo], "label": "Gradient canceling", "notes": notes}
    return Poison(view, [target], info)
