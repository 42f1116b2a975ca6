"""An AutoAttack-style ensemble (Croce & Hein 2020, sec. 5): run attacks one after another, each only
on the examples every earlier attack left classified correctly, and keep the worst case per example.

The default members are AutoAttack's standard version: the gradient-based APGD-CE then APGD-T
(targeted DLR over the 9 highest wrong classes), 100 steps each, then FAB-T (:mod:`.fab`: the
boundary to each of the 9 highest wrong classes in turn, 100 steps, 1 restart; an example counts as
broken when the smallest perturbation it finds has norm <= eps), then the Square Attack
(Andriushchenko et al. 2020, :mod:`.square`; margin loss, p_init 0.8, ``square_queries`` queries per
example, 5000 by default as in AutoAttack's standard version), a score-based black-box attack that
needs no gradient: it catches gradient masking (rounding, JPEG, detached or shattered gradients) that
leaves the gradient-based members powerless. The Square Attack needs images [N, C, H, W] (H, W >= 2);
on other inputs the default ensemble runs without it and warns (:class:`NoBlackBoxMemberWarning`).
An example counts as robust only if no member fools it; for those, the returned point is the member
result with the lowest margin z_y - max_{i != y} z_i (the per-example minimum over members).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import forward_batched
from .base import EVASION_ATTACKS, EvasionAttack, Norm, check_inputs, check_positive, register_evasion
from .losses import margin

Member = tuple[str, Mapping[str, Any]] | Callable[..., Tensor]
DEFAULT_MEMBERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("apgd", {"loss": "ce"}), ("apgd-t", {}), ("fab-t", {}), ("square", {}))
"""AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square (each with its defaults)."""


class NoBlackBoxMemberWarning(RuntimeWarning):
    """The default ensemble ran without its Square member (the inputs are not images [N, C, H, W]): no
    member of it can catch gradient masking."""


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
                 square_queries: int = 5000, generator: torch.Generator | None = None) -> EnsembleResult:
    """Run ``members`` (registered names with options, or attack callables ``(model, x, y) -> x_adv``,
    which get eps/norm/box only when given by name) in order on the still-robust examples of x
    [N, *shape] with labels y [N]. ``square_queries``: the query budget per example of every member named
    ``square`` whose options do not set ``n_queries``."""
    check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    check_positive("autoattack", square_queries=square_queries)
    if not members:
        raise ConfigError("members: must name at least one attack")
    if members is DEFAULT_MEMBERS and (x.dim() != 4 or min(x.shape[2:]) < 2):
        warnings.warn(f"autoattack: inputs of shape {list(x.shape[1:])} are not images [C, H, W]; the ensemble runs "
                      "without its Square member (the black-box attack that catches gradient masking)",
                      NoBlackBoxMemberWarning, stacklevel=2)
        members = tuple(m for m in members if m[0] != "square")
    y = y.to(x.device)
    x_adv = x.detach().clone()
    m = margin(forward_batched(model, x, device=x.device), y)
    fooled_by = torch.where(m < 0, -1, -2)
    names = []
    for k, member in enumerate(members):
        attack = _resolve(member, eps=eps, norm=norm, box=box, generator=generator, square_queries=square_queries)
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


def _resolve(member: Member, *, eps: float, norm: str, box: tuple[float, float], generator: torch.Generator | None,
             square_queries: int) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    if callable(member):
        return member
    name, options = member
    fn: EvasionAttack = EVASION_ATTACKS.get(name)
    shared: dict[str, Any] = {"eps": eps, "norm": norm, "box": box}
    if name == "square":
        shared["n_queries"] = square_queries
    if generator is not None:
        shared["generator"] = generator
    return lambda model, x, y: fn(model, x, y, **{**shared, **dict(options)})


@register_evasion("autoattack")
def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, norm: Norm = "linf",
               members: Sequence[Member] = DEFAULT_MEMBERS, box: tuple[float, float] = (0.0, 1.0),
               square_queries: int = 5000, generator: torch.Generator | None = None) -> Tensor:
    """x [N, *shape] in ``box``, y [N] -> x_adv [N, *shape]: the worst case over ``members`` per example
    (default APGD-CE, APGD-T, FAB-T, then Square with ``square_queries`` queries per example)."""
    return run_ensemble(model, x, y, eps=eps, norm=norm, members=members, box=box, square_queries=square_queries,
                        generator=generator).x_adv
