"""Label-flip poisoning, the baseline of seed 001's comparison tables (Lu et al., "Indiscriminate data
poisoning attacks on neural networks", TMLR 2022, "Label Flip" column).

Threat model: indiscriminate; the attacker *inserts* P = round(eps_d N) copies of clean training
points with wrong labels (no input is changed), so the victim trains on mu + eps_d nu as in seed 001's
mixture. Strategies:

* ``random``: P points drawn uniformly (without replacement; cycling when P > N), each with a label
  drawn uniformly from the K - 1 wrong classes;
* ``loss-max``: every clean point gets its wrong label of highest cross-entropy under the attacker's
  clean model(s) (the averaged loss over an ensemble), i.e. the least likely class; the P points
  with the highest such loss are inserted (cycling through that order when P > N).

Shapes: x [N, *shape], y [N] int64 -> poisons x [P, *shape], y [P] and the source ``rows`` [P].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ....data.view import DataView
from ....errors import ConfigError
from ....query import forward_batched
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from ._functional import num_poisons, sample_rows

Strategy = Literal["random", "loss-max"]


@dataclass
class FlipResult:
    """Inserted poisons ``x`` [P, *shape], wrong labels ``y`` [P], the clean ``rows`` [P] they copy,
    and their mean cross-entropy under the attacker's model(s) (``loss``; None without models)."""

    x: Tensor
    y: Tensor
    rows: Tensor
    loss: float | None


def flipped_losses(models: Sequence[nn.Module], x: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Mean over ``models`` of the cross-entropy of every (point, class): float32 [N, K] (eval mode)."""
    if not models:
        raise ConfigError("loss-max label flipping needs at least one attacker model")
    return torch.stack([-F.log_softmax(forward_batched(m, x, batch_size=chunk_size, device=x.device).float(), dim=1)
                        for m in models]).mean(0)


def label_flip(x: Tensor, y: Tensor, *, eps_d: float, num_classes: int, strategy: Strategy = "random",
               models: Sequence[nn.Module] = (), generator: torch.Generator | None = None,
               chunk_size: int = 1024) -> FlipResult:
    """Label-flip poisons (module docstring); ``models`` are needed for ``loss-max`` only."""
    if num_classes < 2:
        raise ConfigError(f"label flipping needs >= 2 classes, got {num_classes}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = x.shape[0]
    p = num_poisons(eps_d, n)
    if strategy == "random":
        rows = sample_rows(n, p, gen).to(x.device)
        shift = torch.randint(1, num_classes, (p,), generator=gen).to(x.device)
        labels = (y[rows] + shift) % num_classes
        loss = None
        if models:
            loss = float(flipped_losses(models, x[rows], chunk_size=chunk_size).gather(1, labels[:, None]).mean())
    elif strategy == "loss-max":
        losses = flipped_losses(models, x, chunk_size=chunk_size)
        losses.scatter_(1, y[:, None].to(losses.device), float("-inf"))  # never the true label
        best, cls = losses.max(1)
        order = best.argsort(descending=True)
        rows = order.repeat(-(-p // n))[:p].to(x.device)
        labels = cls[rows].to(y.dtype)
        loss = float(best[rows].mean())
    else:
        raise ConfigError(f"unknown label-flip strategy {strategy!r}; valid: loss-max, random")
    return FlipResult(x[rows].clone(), labels, rows, loss)


class FlipOptions(BaseModel):
    """``flip``: the strategy (``random`` or ``loss-max``); ``chunk_size`` of the loss passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip: Strategy = "random"
    chunk_size: int = Field(1024, ge=1, le=1_000_000)


@register_poisoner("label-flip", family="indiscriminate", needs=Needs.CRAFTING_MODELS, options=FlipOptions)
def label_flip_poison(task: PoisonTask) -> Poison:
    """Insert eps_d N mislabelled copies of clean points (random or loss-max labels; Lu et al. 2022)."""
    opts: FlipOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    x, y = task.train.x.to(task.device), task.train.y.to(task.device)
    res = label_flip(x, y, eps_d=task.inserted_fraction(), num_classes=task.num_classes, strategy=opts.flip,
                     models=task.models, generator=task.generator(), chunk_size=opts.chunk_size)
    view = DataView.identity(task.train).with_inserted(res.x.cpu(), res.y.cpu()).with_meta(
        method="label-flip", strategy=opts.flip, eps_d=task.eps_d)
    return Poison(view, info={"poisons": int(res.y.numel()), "strategy": opts.flip,
                              "crafting_loss_of_poisons": res.loss, "label": f"Label flip ({opts.flip})"})
