"""Signs of gradient masking (Athalye et al. 2018, sec. 3.1; Carlini et al. 2019, "On Evaluating
Adversarial Robustness", sec. 5): a robustness number is suspect when

* an attack with the whole pixel box as budget does not bring robust accuracy to about 0 (any input
  can then be turned into any other: a gradient that does not lead there is broken);
* PGD's loss does not increase over its steps (the gradient carries no signal);
* one FGSM step is stronger than many PGD steps (iterating should never hurt);
* a black-box attack (the Square Attack: forward passes only) or a transfer attack (PGD crafted on
  another model) is stronger than the white-box attacks (Carlini et al. 2019, sec. 5.3 and 5.4: an
  attack with less information can only win when the gradient misleads).

:func:`pgd_loss_curve` measures the second through the one crafting engine; :func:`masking_flags`
turns measured numbers into flags, as pure functions of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ...craft import craft
from ...query.modes import evaluating
from .base import EvasionObjective, Norm, check_inputs, check_positive, make_constraint

UNBOUNDED_ROBUST_MAX = 0.01
"""Robust accuracy above this under a whole-box budget is flagged."""


def pgd_loss_curve(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf", steps: int = 20,
                   step_size: float | None = None, box: tuple[float, float] = (0.0, 1.0),
                   batch_size: int | None = None) -> list[float]:
    """Mean cross-entropy over x [N, *shape] at PGD's iterates 0 (x itself), 1, ..., ``steps`` - 1: PGD
    from x without random start, early stop or best-iterate tracking (the raw trajectory)."""
    check_inputs(model, x, y, eps=eps, norm=norm, box=box)
    check_positive("pgd_loss_curve", steps=steps, step_size=step_size, eps=eps)
    lr = 2.5 / steps if step_size is None else step_size / eps
    objective = EvasionObjective(model, y.to(x.device), loss="ce")
    with evaluating(model, requires_grad=False):
        res = craft(objective, x, constraint=make_constraint(norm, eps, box), steps=steps, optimizer="pgd", lr=lr,
                    schedule="constant", init="zero", batch_size=batch_size)
    return [-total / len(x) for total in res.history]


def _tolerance(n: int) -> int:
    """Examples one attack may leave robust beyond another before a flag: 1% of n, at least 1."""
    return max(1, round(0.01 * n))


def masking_flags(*, unbounded_robust: float, unbounded_eps: float, loss_curve: Sequence[float],
                  fgsm_vs_pgd: Sequence[tuple[float, int, int, int]],
                  weaker_attacks: Sequence[tuple[str, float, int, int, int]] = ()) -> list[dict[str, Any]]:
    """One entry per check: ``{"check", "flagged", "detail"}``.

    Args:
        unbounded_robust: robust accuracy under PGD with budget ``unbounded_eps`` (the whole box).
        loss_curve: :func:`pgd_loss_curve`'s mean losses.
        fgsm_vs_pgd: per eps ``(eps, robust count under FGSM, robust count under PGD, examples)``.
        weaker_attacks: attacks with less access than the white-box ones, one check each:
            ``(label, eps, robust count under it, robust count under the white-box worst case, examples)``;
            flagged when the weaker attack leaves fewer examples robust (beyond 1%, at least 1 example).
    """
    out = [{
        "check": "whole-box attack reaches ~0 robust accuracy",
        "flagged": unbounded_robust > UNBOUNDED_ROBUST_MAX,
        "detail": f"PGD at eps {unbounded_eps:.4g} (the whole pixel range): robust accuracy {100 * unbounded_robust:.1f}% "
                  f"(flagged above {100 * UNBOUNDED_ROBUST_MAX:g}%)",
    }]
    if loss_curve:
        first, last = loss_curve[0], loss_curve[-1]
        ups = sum(b > a for a, b in zip(loss_curve, loss_curve[1:], strict=False))
        out.append({
            "check": "PGD loss increases over its steps",
            "flagged": not last > first,
            "detail": f"mean CE {first:.4g} at x -> {last:.4g} after {len(loss_curve) - 1} steps; rose in {ups} of "
                      f"{len(loss_curve) - 1} steps",
        })
    worse = [(e, f, p, n) for e, f, p, n in fgsm_vs_pgd if f < p - _tolerance(n)]
    shown = "; ".join(f"eps {e:.4g}: FGSM {100 * f / n:.1f}% vs PGD {100 * p / n:.1f}%" for e, f, p, n in worse)
    out.append({
        "check": "PGD at least as strong as FGSM",
        "flagged": bool(worse),
        "detail": f"FGSM leaves fewer examples robust than PGD at {shown}" if worse else
                  f"PGD robust accuracy <= FGSM's (+1% tolerance) at all {len(fgsm_vs_pgd)} eps",
    })
    for label, e, weak, white, n in weaker_attacks:
        out.append({
            "check": f"{label} no stronger than white box",
            "flagged": weak < white - _tolerance(n),
            "detail": f"eps {e:.4g}: {label} {100 * weak / n:.1f}% robust vs white-box worst case {100 * white / n:.1f}% "
                      f"(flagged when lower by more than {_tolerance(n)} of {n} examples)",
        })
    return out
