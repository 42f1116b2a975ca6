"""Random noise of the same budget: the control of seed 002 chapter 2 (Table 2.2) showing that
adversarial poisons work through their *direction*, not their size or by leaving the image manifold
(victims trained on randomly perturbed data still generalise).

Threat model: see :mod:`.base`; no model is used. Each pixel gets independent noise, seeded by the
generator: ``uniform`` on [-eps, eps] or ``sign`` (+-eps with probability 1/2 each, the corners of the
ball, as large as a PGD poison), then projected into the pixel box.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from ....craft import LinfBall
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner
from .base import check_inputs


class RandomNoiseOptions(BaseModel):
    """``distribution``: ``uniform`` on [-eps, eps] per pixel or ``sign`` (+-eps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: Literal["uniform", "sign"] = "uniform"


@register_poisoner("random-noise", family="availability", needs=Needs.NOTHING, options=RandomNoiseOptions)
def random_noise(task: PoisonTask) -> Poison:
    """Random l-inf noise of radius eps (uniform or sign), the control of seed 002 Table 2.2."""
    opts: RandomNoiseOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    x, y = task.poison_rows()
    check_inputs(x, y, task.num_classes)
    eps, generator = task.linf_eps(), task.generator()
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(device=x.device, dtype=x.dtype)
    d = (u * 2 - 1) if opts.distribution == "uniform" else torch.where(u < 0.5, -1.0, 1.0).to(x.dtype)
    delta = LinfBall(eps).project(d * eps, x)
    return task.perturbed(delta.to(task.train.device), {"distribution": opts.distribution})
