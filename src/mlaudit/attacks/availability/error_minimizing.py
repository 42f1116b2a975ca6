"""Error-minimizing noise ("unlearnable examples"; Huang et al. 2021, sample-wise variant), the
min-min baseline that seed 002 chapter 2 compares adversarial poisoning against.

Threat model: see :mod:`.base`. Unlike adversarial poisoning, the poisoner does not use a fixed
pretrained model: it trains a surrogate f_theta *jointly* with the noise, solving

    min_theta  sum_i  min_{||delta_i||_inf <= eps}  L(f_theta(x_i + delta_i), y_i)

by alternating (one *round*): ``train_steps`` plain SGD steps on theta over mini-batches of the
noised data, then ``budget.steps`` PGD steps on all delta_i (through :func:`mlaudit.craft.craft`)
that *minimise* the loss, continuing from the previous round's noise. It stops when the surrogate
classifies ``stop_accuracy`` of the noised training data correctly (Huang et al. use 99%) or after
``rounds`` rounds. The noise becomes an easy "shortcut" feature, so victims learn it instead of the
images and fail on clean test data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ...craft import LinfBall, craft
from ...errors import ConfigError
from ...query import evaluating, forward_batched
from .base import CraftBudget, PoisonResult, StepCallback, check_inputs, register_method


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
               batch_size: int, budget: CraftBudget, generator: torch.Generator) -> float:
    """``steps`` plain SGD steps of ``model`` on random mini-batches of ``x + delta``; the last loss."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator,
                            device=generator.device).to(x.device)
        xb = x[idx] + delta[idx]
        if budget.augment is not None and not budget.augment.is_identity:
            xb = budget.augment(xb, generator=generator)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


@register_method("error-minimizing", crafter="fresh", options=ErrorMinimizingOptions)
def error_minimizing(x: Tensor, y: Tensor, *, models: Sequence[nn.Module], budget: CraftBudget, num_classes: int,
                     generator: torch.Generator, options: BaseModel = ErrorMinimizingOptions(),
                     on_step: StepCallback | None = None) -> PoisonResult:
    """Error-minimizing noise (Huang et al. 2021, sample-wise min-min with the surrogate updated between rounds)."""
    check_inputs(x, y, num_classes)
    if len(models) != 1:
        raise ConfigError(f"error-minimizing noise trains exactly one fresh surrogate model, got {len(models)}")
    opts = options if isinstance(options, ErrorMinimizingOptions) else ErrorMinimizingOptions.model_validate(
        options.model_dump())
    model = models[0]
    opt = torch.optim.SGD(model.parameters(), lr=opts.model_lr, momentum=opts.momentum, weight_decay=5e-4)
    objective = SurrogateLoss(model, y)
    delta = torch.zeros_like(x)
    history: list[dict[str, float]] = []
    acc = 0.0
    for r in range(opts.rounds):
        loss = _sgd_steps(model, opt, x, y, delta, steps=opts.train_steps, batch_size=opts.batch_size, budget=budget,
                          generator=generator)

        def step_cb(step: int, total: float, r: int = r) -> None:
            if on_step is not None:
                on_step(r * budget.steps + step, total)

        with evaluating(model, requires_grad=False):  # gradients reach the noise only
            # continue from the previous round's noise (min-min alternates model and noise updates)
            res = craft(objective, x, constraint=LinfBall(budget.eps), steps=budget.steps, optimizer="pgd",
                        lr=budget.lr, schedule="constant", restarts=1, init=delta, augment=budget.augment,
                        batch_size=budget.batch_size, generator=generator, on_step=step_cb)
        delta = res.delta
        acc = _accuracy(model, x + delta, y)
        history.append({"round": r + 1, "train_loss": loss, "noise_loss_mean": res.objective / x.shape[0],
                        "surrogate_accuracy": acc})
        if opts.stop_accuracy is not None and acc >= opts.stop_accuracy:
            break
    info = {"rounds": len(history), "stopped_early": len(history) < opts.rounds, "surrogate_accuracy": acc,
            "history": history}
    return PoisonResult(delta.detach(), info)
