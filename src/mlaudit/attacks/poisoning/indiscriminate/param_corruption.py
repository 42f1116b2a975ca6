"""Gradient-based parameter corruption, GradPC (Sun et al., "Exploring the vulnerability of deep
neural networks: a study of parameter corruption", AAAI 2021; seed 001, "Parameter Corruption vs.
Data Poisoning"):

    max_{||w - w_c||_2 <= eps_w}  F(mu; w),      F(mu; w) = (1/N) sum_i CE(f(x_i; w), y_i),

solved by projected, normalised gradient ascent from the clean parameters w_c:

    w <- Proj_{B(w_c, eps_w)}( w + lr * eps_w * grad F(mu; w) / ||grad F(mu; w)|| ),

where ``||.||`` is the l2 norm over *all* trainable parameters seen as one vector. ``steps=1,
lr=1`` is Sun et al.'s first-order corruption ``w_c + eps_w grad F / ||grad F||``; more steps follow the
loss further inside the ball. The iterate with the highest (full-batch) training loss is returned.

Threat model: white-box write access to the weights (less practical than poisoning; seed 001 uses the
corrupted model as the *target* of gradient canceling, :mod:`.gradient_canceling`). Shapes: x
[N, *shape] float32, y [N] int64. The model is used in eval mode and must not contain BatchNorm.

:func:`corrupted_target` is that target step (GradPC, then the reachability threshold tau of the
target, :mod:`.threshold`); the poisoner ``param-corruption`` returns the corrupted crafting models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ....errors import ConfigError
from ....query import ParamVector
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from ._functional import mean_loss, mean_loss_and_grad, require_smooth
from .threshold import reachability_threshold


@dataclass
class CorruptionResult:
    """``model``: a corrupted copy (eval mode, same device); ``distance`` ||w - w_c||_2 (<= eps_w);
    clean and corrupted training losses; the training loss before each step (``history``)."""

    model: nn.Module
    distance: float
    loss_clean: float
    loss_corrupted: float
    history: list[float] = field(default_factory=list)


def gradpc(model: nn.Module, x: Tensor, y: Tensor, *, eps_w: float, steps: int = 50, lr: float = 0.1,
           batch_size: int | None = None, chunk_size: int = 1024, generator: torch.Generator | None = None
           ) -> CorruptionResult:
    """Maximise the training loss within ``||w - w_c|| <= eps_w`` (see the module docstring).

    ``lr`` is the step length as a fraction of ``eps_w``. ``batch_size`` None uses the full training
    set for every gradient (exact ascent); an int draws a random mini-batch per step (``generator``).
    The returned model is the best iterate by the full training loss.
    """
    if not eps_w > 0:
        raise ConfigError(f"eps_w must be > 0 (the l2 radius of the corruption), got {eps_w}")
    if steps < 1 or not lr > 0:
        raise ConfigError(f"gradpc needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
    require_smooth(model, "parameter corruption (GradPC)")
    w_c = ParamVector.from_module(model)
    w = w_c.map(torch.clone)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = x.shape[0]
    loss_clean = mean_loss(model, w_c, x, y, chunk_size=chunk_size)
    best, best_loss, history = w, loss_clean, []
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            loss, g = mean_loss_and_grad(model, w, x, y, chunk_size=chunk_size)
        else:
            idx = torch.randperm(n, generator=gen)[:batch_size].to(x.device)
            loss, g = mean_loss_and_grad(model, w, x[idx], y[idx], chunk_size=chunk_size)
            loss = mean_loss(model, w, x, y, chunk_size=chunk_size)
        history.append(loss)
        if loss > best_loss:
            best, best_loss = w, loss
        gn = g.norm()
        if not gn > 0:
            break
        w = _project(lr * eps_w / gn * g + w, w_c, eps_w)
    final = mean_loss(model, w, x, y, chunk_size=chunk_size)
    if final > best_loss:
        best, best_loss = w, final
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        named = dict(out.named_parameters())
        for k, v in best.items():
            named[k].copy_(v)
    dist = float((best - w_c).norm())
    return CorruptionResult(out, dist, loss_clean, best_loss, history)


def _project(w: ParamVector, center: ParamVector, radius: float) -> ParamVector:
    """Euclidean projection of ``w`` onto the ball of ``radius`` around ``center`` (one flat vector)."""
    d = w - center
    r = float(d.norm())
    if r <= radius:
        return w
    return radius / r * d + center


class TargetOptions(BaseModel):
    """The GradPC target: radius ``eps_w``, ``target_steps`` ascent steps of ``target_lr`` eps_w each,
    ``target_batch_size`` (None: full batch), the victims' ``weight_decay`` lambda of tau (``auto``:
    the victim recipe's), and the ``chunk_size`` of loss and gradient passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps_w: float = Field(1.0, gt=0.0, le=1e6)
    target_steps: int = Field(50, ge=1, le=100_000)
    target_lr: float = Field(0.1, gt=0.0, le=1.0)
    target_batch_size: int | None = Field(None, ge=1)
    weight_decay: float | Literal["auto"] = "auto"
    chunk_size: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("weight_decay")
    @classmethod
    def _wd(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not (0.0 <= v <= 1.0):
            raise ValueError(f"weight_decay must be 'auto' (the victim recipe's) or a number in [0, 1], got {v}")
        return v

    def decay(self, victim_weight_decay: float) -> float:
        """lambda of the victims' objective: ``weight_decay``, or theirs for ``auto``."""
        return float(victim_weight_decay if self.weight_decay == "auto" else self.weight_decay)


def corrupted_target(model: nn.Module, x: Tensor, y: Tensor, options: TargetOptions, *, num_classes: int,
                     weight_decay: float, generator: torch.Generator) -> tuple[nn.Module, dict[str, Any]]:
    """The target step of seed 001: GradPC of ``model`` on the clean training data x [N, *shape], y [N]
    within ``options.eps_w``, and tau of the target (:func:`.threshold.reachability_threshold` with the
    victims' ``weight_decay``). Returns the target model and its facts (JSON-able)."""
    res = gradpc(model, x, y, eps_w=options.eps_w, steps=options.target_steps, lr=options.target_lr,
                 batch_size=options.target_batch_size, chunk_size=options.chunk_size, generator=generator)
    th = reachability_threshold(res.model, x, y, num_classes=num_classes, weight_decay=weight_decay,
                                chunk_size=options.chunk_size)
    info = {"eps_w": options.eps_w, "distance": res.distance, "train_loss_clean": res.loss_clean,
            "train_loss_target": res.loss_corrupted, "threshold": th.to_dict()}
    return res.model, info


def refuse_batchnorm(model: nn.Module) -> None:
    """The model requirement of GradPC and gradient canceling (:func:`._functional.require_smooth`)."""
    require_smooth(model, "model-targeted poisoning (GradPC, gradient canceling)")


@register_poisoner("param-corruption", family="indiscriminate", needs=Needs.CRAFTING_MODELS, options=TargetOptions,
                   acts_on="model", check_model=refuse_batchnorm)
def param_corruption(task: PoisonTask) -> Poison:
    """GradPC (Sun et al. 2021): maximise the training loss within ||w - w_c|| <= eps_w, per crafting model."""
    opts: TargetOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    x, y = task.train.x.to(task.device), task.train.y.to(task.device)
    targets, infos = [], []
    for m in task.models:
        t, info = corrupted_target(m, x, y, opts, num_classes=task.num_classes,
                                   weight_decay=opts.decay(task.victim.weight_decay), generator=task.generator())
        targets.append(t)
        infos.append(info)
    return Poison(None, targets, {"targets": infos, "label": f"GradPC (eps_w={opts.eps_w:g})"})
