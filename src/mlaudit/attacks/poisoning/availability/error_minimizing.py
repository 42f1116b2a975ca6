"""Error-minimizing noise ("unlearnable examples"; Huang et al. 2021, sample-wise variant), the
min-min baseline that seed 002 chapter 2 compares adversarial poisoning against.

Threat model: see :mod:`.base`. Unlike adversarial poisoning, the poisoner does not use a fixed
pretrained model: it trains a surrogate f_theta *jointly* with the noise, solving

    min_theta  sum_i  min_{||delta_i||_inf <= eps}  L(f_theta(x_i + delta_i), y_i)

by alternating (one *round*): ``train_steps`` plain SGD steps on theta over mini-batches of the
noised data, then ``steps`` PGD steps on all delta_i (through :func:`mlaudit.craft.craft`)
that *minimise* the loss, continuing from the previous round's noise. It stops when the surrogate
classifies ``stop_accuracy`` of the noised training data correctly (Huang et al. use 99%) or after
``rounds`` rounds. The noise becomes an easy "shortcut" feature, so victims learn it instead of the
images and fail on clean test data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ....craft import LinfBall, craft
from ....data.augment import AugmentSpec
from ....query import evaluating, forward_batched
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .base import AVAILABILITY_CRAFTING, check_inputs


class ErrorMinimizingOptions(BaseModel):
    """Min-min schedule: at most ``rounds`` rounds of ``train_steps`` SGD steps (lr ``model_lr``,
    momentum ``momentum``, mini-batch ``batch_size``) then ``steps`` noise steps; stop at
    ``stop_accuracy`` training accuracy of the surrogate on the noised data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(20, ge=1, le=100_000)
    train_steps: int = Field(10, ge=1, le=1_000_000)
    model_lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(128, ge=1, le=65_536)
    stop_accuracy: float | None = Field(0.99, gt=0.0, le=1.0)


class SurrogateLoss:
    """Objective ``(x_adv [B, *shape], idx [B]) -> [B]``: CE(f(x_adv), y[idx]), to minimise."""

    def __init__(self, model: nn.Module, labels: Tensor) -> None:
        self.model, self.labels = model, labels

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        return F.cross_entropy(self.model(x_adv), self.labels[idx], reduction="none")


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    return int((forward_batched(model, x, batch_size=batch_size, device=x.device).argmax(1) == y).sum()) / x.shape[0]


def _sgd_steps(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, delta: Tensor, *, steps: int,
               batch_size: int, augment: AugmentSpec | None, generator: torch.Generator) -> float:
    """``steps`` plain SGD steps of ``model`` on random mini-batches of ``x + delta``; the last loss."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator,
                            device=generator.device).to(x.device)
        xb = x[idx] + delta[idx]
        if augment is not None and not augment.is_identity:
            xb = augment(xb, generator=generator)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


@register_poisoner("error-minimizing", family="availability", needs=Needs.FRESH_MODEL, options=ErrorMinimizingOptions,
                   defaults={k: v for k, v in AVAILABILITY_CRAFTING.items() if k != "restarts"},
                   progress=lambda s, o: s.steps * o.rounds)
def error_minimizing(task: PoisonTask) -> Poison:
    """Error-minimizing noise (Huang et al. 2021, sample-wise min-min with the surrogate updated between rounds)."""
    opts: ErrorMinimizingOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    s = task.crafting_settings
    x, y = task.poison_rows()
    check_inputs(x, y, task.num_classes)
    model, augment, generator, eps = task.models[0], task.crafting_augment, task.generator(), task.linf_eps()
    opt = torch.optim.SGD(model.parameters(), lr=opts.model_lr, momentum=opts.momentum, weight_decay=5e-4)
    objective = SurrogateLoss(model, y)
    delta = torch.zeros_like(x)
    history: list[dict[str, float]] = []
    acc = 0.0
    for r in range(opts.rounds):
        loss = _sgd_steps(model, opt, x, y, delta, steps=opts.train_steps, batch_size=opts.batch_size, augment=augment,
                          generator=generator)

        def step_cb(step: int, total: float, r: int = r) -> None:
            if task.on_step is not None:
                task.on_step(r * s.steps + step, total)

        with evaluating(model, requires_grad=False):  # gradients reach the noise only
            # continue from the previous round's noise (min-min alternates model and noise updates)
            res = craft(objective, x, constraint=LinfBall(eps), steps=s.steps, optimizer=s.optimizer, lr=s.lr,
                        schedule=s.schedule, restarts=1, init=delta, augment=augment, batch_size=s.batch_size,
                        generator=generator, on_step=step_cb)
        delta = res.delta
        acc = _accuracy(model, x + delta, y)
        history.append({"round": r + 1, "train_loss": loss, "noise_loss_mean": res.objective / x.shape[0],
                        "surrogate_accuracy": acc})
        if opts.stop_accuracy is not None and acc >= opts.stop_accuracy:
            break
    info = {"rounds": len(history), "stopped_early": len(history) < opts.rounds, "surrogate_accuracy": acc,
            "history": history}
    return task.perturbed(delta.to(task.train.device), info)
