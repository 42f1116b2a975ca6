"""An AutoAttack-style ensemble (Croce & Hein 2020, sec. 5): run attacks one after another, each only
on the examples every earlier attack left classified correctly, and keep the worst case per example.

The default members are AutoAttack's gradient-based pair, APGD-CE then APGD-T (targeted DLR over the
9 highest wrong classes), 100 steps each; FAB-T and Square are not implemented. An example counts as
robust only if no member fools it; for those, the returned point is the member result with the
lowest margin z_y - max_{i != y} z_i (the per-example minimum over members).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import forward_batched
from .base import EVASION_ATTACKS, EvasionAttack, Norm, check_inputs, register_evasion
from .losses import margin

Member = tuple[str, Mapping[str, Any]] | Callable[..., Tensor]
DEFAULT_MEMBERS: tuple[tuple[str, dict[str, Any]], ...] = (("apgd", {"loss": "ce"}), ("apgd-t", {}))


@dataclass(frozen=True)
class EnsembleResult:
    """``x_adv`` [N, *shape]; ``margin`` [N] at x_adv (negative = fooled); ``fooled_by`` [N]: index of
    the first member that fooled the example, -1 if it was misclassified clean, -2 if none did;
    ``names`` of the members in order."""

    x_adv: Tensor
    margin: Tensor
    fooled_by: Tensor
    names: tuple[str, ...]

    @property
    def robust(self) -> Tensor:
        return self.fooled_by == -2


def run_ensemble(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf",
                 members: Sequence[Member] = DEFAULT_MEMBERS, box: tuple[float, float] = (0.0, 1.0),
                 generator: torch.Generator | None = None) -> EnsembleResult:
    """Run ``members`` (registered names with options, or attack callables ``(model, x, y) -> x_adv``,
    which get eps/norm/box only when given by name) in order on the still-robust examples."""
    check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    if not members:
        raise ConfigError("members: must name at least one attack")
    y = y.to(x.device)
    x_adv = x.detach().clone()
    m = margin(forward_batched(model, x, device=x.device), y)
    fooled_by = torch.where(m < 0, -1, -2)
    names = []
    for k, member in enumerate(members):
        attack = _resolve(member, eps=eps, norm=norm, box=box, generator=generator)
        names.append(member[0] if isinstance(member, tuple) else getattr(member, "__name__", f"member{k}"))
        rows = (fooled_by == -2).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        adv = attack(model, x[rows], y[rows])
        m_new = margin(forward_batched(model, adv, device=x.device), y[rows])
        worse = m_new < m[rows]
        x_adv[rows[worse]] = adv[worse]
        m[rows] = torch.minimum(m[rows], m_new)
        fooled_by[rows[m_new < 0]] = k
    return EnsembleResult(x_adv, m, fooled_by, tuple(names))


def _resolve(member: Member, *, eps: float, norm: str, box: tuple[float, float],
             generator: torch.Generator | None) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    if callable(member):
        return member
    name, options = member
    fn: EvasionAttack = EVASION_ATTACKS.get(name)
    shared: dict[str, Any] = {"eps": eps, "norm": norm, "box": box}
    if generator is not None:
        shared["generator"] = generator
    return lambda model, x, y: fn(model, x, y, **{**shared, **dict(options)})


@register_evasion("autoattack")
def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf",
               members: Sequence[Member] = DEFAULT_MEMBERS, box: tuple[float, float] = (0.0, 1.0),
               generator: torch.Generator | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape]: the worst case over ``members`` per example."""
    return run_ensemble(model, x, y, eps=eps, norm=norm, members=members, box=box, generator=generator).x_adv
