"""Evasion attacks: find x_adv in an eps-ball around x (and the pixel box) that the model misclassifies.

    from mlaudit.attacks.evasion import EVASION_ATTACKS, pgd
    x_adv = pgd(model, x, y, eps=8 / 255, norm="linf", steps=10, restarts=2)   # torchattacks-style call
    x_adv = EVASION_ATTACKS.get("autoattack")(model, x, y, eps=8 / 255)
    robust_accuracy = (model(x_adv).argmax(1) == y).float().mean()

Registered (:data:`EVASION_ATTACKS`, one call ``attack(model, x, y, **options) -> x_adv``): ``fgsm``,
``pgd`` (l-inf / l2, random start, restarts, targeted), ``apgd`` (APGD-CE / APGD-DLR), ``apgd-t``,
``cw`` (Carlini-Wagner l2), ``fab`` (the Fast Adaptive Boundary attack: minimal l-inf / l2 / l1
perturbation by projections onto the linearised decision boundary; l1 is FAB's alone), ``fab-t`` (FAB-T, AutoAttack's
targeted version), ``square`` (the Square Attack: score-based black box, forward passes only) and
``autoattack`` (the worst case over APGD-CE, APGD-T, FAB-T and Square). Every gradient-based
optimisation with a loss runs through the one crafting engine, :func:`mlaudit.craft.craft`; FAB runs its
own projection steps, Square is a random search on the model's logits. (The functions share their modules' names:
``mlaudit.attacks.evasion.pgd`` is the function.)
"""

from __future__ import annotations

from .apgd import apgd, apgd_targeted
from .base import (
    EVASION_ATTACKS,
    EvasionAttack,
    EvasionObjective,
    StochasticModelWarning,
    check_inputs,
    register_evasion,
)
from .cw import cw_l2
from .ensemble import DEFAULT_MEMBERS, EnsembleResult, NoBlackBoxMemberWarning, autoattack, run_ensemble
from .fab import fab, fab_targeted
from .fgsm import fgsm
from .losses import LOSSES, margin
from .pgd import pgd
from .square import SquareResult, run_square, square

__all__ = [
    "DEFAULT_MEMBERS", "EVASION_ATTACKS", "LOSSES", "EnsembleResult", "EvasionAttack", "EvasionObjective",
    "NoBlackBoxMemberWarning", "SquareResult", "StochasticModelWarning", "apgd", "apgd_targeted", "autoattack", "check_inputs", "cw_l2", "fab",
    "fab_targeted", "fgsm",
    "margin", "pgd", "register_evasion", "run_ensemble", "run_square", "square",
]
