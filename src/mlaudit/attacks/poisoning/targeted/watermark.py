"""Watermarking baseline (Shafahi et al. 2018; seed 002 Table 1.2): blend the target image into the
poisons. Not an optimisation; returns the perturbation so it plugs in wherever a crafted ``delta`` does.

    x_poison + delta = (1 - a_i) * x_i + a_i * x_t,     a_i = min(opacity, eps / max|x_t - x_i|),

i.e. each poison gets the largest opacity a_i <= ``opacity`` whose perturbation a_i * (x_t - x_i)
respects ||delta_i||_inf <= eps. A convex blend of two images in [0, 1] stays in [0, 1], so the box
holds automatically; the result is finally projected onto both (float rounding only).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ....errors import ConfigError
from ..contract import Needs, Poison, PoisonTask
from ..registry import register_poisoner


def watermark(x_poison: Tensor, x_target: Tensor, *, eps: float, opacity: float = 1.0) -> Tensor:
    """``x_poison`` [P, ...] in [0, 1], ``x_target`` [1, ...] or [P, ...] -> ``delta`` [P, ...] with
    ||delta_i||_inf <= ``eps`` (pixel units, 16/255 for eps = 16) and x_poison + delta in [0, 1].

    ``opacity`` in [0, 1] caps the blend weight (1 = as strong as eps allows).
    """
    if not 0 <= eps <= 1:
        raise ConfigError(f"eps must lie in [0, 1] pixel units (16/255 = {16 / 255:.4f}), got {eps}")
    if not 0 <= opacity <= 1:
        raise ConfigError(f"opacity must lie in [0, 1], got {opacity}")
    if x_target.shape[0] not in (1, x_poison.shape[0]) or x_target.shape[1:] != x_poison.shape[1:]:
        raise ConfigError(f"x_target must be [1, ...] or [P={x_poison.shape[0]}, ...] shaped like x_poison "
                          f"{list(x_poison.shape)}, got {list(x_target.shape)}")
    diff = x_target.to(x_poison) - x_poison
    gap = diff.flatten(1).abs().amax(1)
    alpha = (eps / gap.clamp_min(1e-12)).clamp(max=opacity)
    delta = alpha.view(-1, *([1] * (diff.dim() - 1))) * diff
    delta = delta.clamp(-eps, eps)
    return ((x_poison + delta).clamp(0, 1) - x_poison).detach()


class WatermarkOptions(BaseModel):
    """``opacity`` in [0, 1]: the cap on the blend weight (1 = as strong as eps allows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    opacity: float = Field(1.0, ge=0.0, le=1.0)


@register_poisoner("watermark", family="targeted", needs=Needs.TARGET, options=WatermarkOptions)
def watermark_poison(task: PoisonTask) -> Poison:
    """Watermarking (Shafahi et al. 2018): the target blended into every poison; no model, no optimisation."""
    opts: WatermarkOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    x_poison, _ = task.poison_rows()
    delta = watermark(x_poison, task.targeted().x[:1].to(x_poison.device), eps=task.linf_eps(), opacity=opts.opacity)
    return task.perturbed(delta.cpu(), {"objective": None, "restarts": [], "history": []})
