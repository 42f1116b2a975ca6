"""Random noise of the same budget: the control of seed 002 chapter 2 (Table 2.2) showing that
adversarial poisons work through their *direction*, not their size or by leaving the image manifold
(victims trained on randomly perturbed data still generalise).

Threat model: see :mod:`.base`; no model is used. Each pixel gets independent noise, seeded by the
generator: ``uniform`` on [-eps, eps] or ``sign`` (+-eps with probability 1/2 each, the corners of the
ball, as large as a PGD poison), then projected into the pixel box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ...craft import LinfBall
from .base import CraftBudget, PoisonResult, StepCallback, check_inputs, register_method


class RandomNoiseOptions(BaseModel):
    """``distribution``: ``uniform`` on [-eps, eps] per pixel or ``sign`` (+-eps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: Literal["uniform", "sign"] = "uniform"


@register_method("random-noise", crafter="none", options=RandomNoiseOptions)
def random_noise(x: Tensor, y: Tensor, *, models: Sequence[nn.Module], budget: CraftBudget, num_classes: int,
                 generator: torch.Generator, options: BaseModel = RandomNoiseOptions(),
                 on_step: StepCallback | None = None) -> PoisonResult:
    """Random l-inf noise of radius eps (uniform or sign), the control of seed 002 Table 2.2."""
    check_inputs(x, y, num_classes)
    opts = options if isinstance(options, RandomNoiseOptions) else RandomNoiseOptions.model_validate(options.model_dump())
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(device=x.device, dtype=x.dtype)
    d = (u * 2 - 1) if opts.distribution == "uniform" else torch.where(u < 0.5, -1.0, 1.0).to(x.dtype)
    delta = LinfBall(budget.eps).project(d * budget.eps, x)
    return PoisonResult(delta, {"distribution": opts.distribution})
