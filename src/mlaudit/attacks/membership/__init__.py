"""Membership-inference attacks on a pool of models (leave-one-out: every model is a target once).

    from mlaudit.query import collect_logits
    obs = Observations(logits=collect_logits(stack, pool.x, queries=("identity", "flip")),
                       labels=pool.y, keep=keep)          # logits [M, N, A, C], keep bool [M, N]
    scores = score_all_targets("lira-online", obs)        # [M, N], higher = member
    roc_metrics(scores.flatten(), keep.flatten())

Registered attacks (:data:`ATTACKS`): ``loss`` and ``loss-bounded`` (Yeom et al. 2018, A2 / A1),
``shokri`` (Shokri et al. 2017), ``lira-online`` and ``lira-offline`` (Carlini et al. 2022),
``rmia-online`` and ``rmia-offline`` (Zarifzadeh et al. 2024; population in
``Observations.population_logits``), ``base-online`` and ``base-offline`` (Lassila et al. 2025, no population), ``label-augment`` and ``label-boundary`` (Choquette-Choo et al.
2021; label-only, through ``Observations.oracle``, a :class:`LabelOracle`).
Around them: the pool's inclusion design (:mod:`.design`) and Truth Serum's poisoning
(:mod:`.truth_serum`, Tramer et al. 2022), which any of the attacks then scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import bayes_base, label_augment, label_boundary, lira, loss, rmia, shokri  # noqa: F401  (register the attacks)
from .base import ATTACKS, AllTargetsFn, AttackFn, MembershipAttack, Observations, register_attack
from .design import inclusion_matrix, models_needed_exact, models_needed_random, shadow_coverage
from .lira import lira_all_targets, lira_requirements
from .loss import yeom_decision, yeom_threshold
from .oracle import LabelOracle
from .references import reference_weights
from .rmia import rmia_all_targets
from .signals import clip_nonfinite, cross_entropy, rank_nonfinite, scaled_confidence, softmax_probs
from .truth_serum import truth_serum_view


def score_all_targets(attack: str | MembershipAttack | AttackFn, obs: Observations, **options: Any) -> Tensor:
    """Scores [M, N] of every model as the target (row m = ``attack(obs, m, **options)``).

    Uses the registered attack's ``all_targets`` form when it has one (``loss``, ``loss-bounded``,
    ``shokri`` and both LiRA variants; LOSS and LiRA in O(M * N * A) in all, against O(M^2 * N * A * C)
    for M separate calls; equal up to float64 rounding), else calls the attack once per target.
    ``attack`` is a registered name, a registered entry or an attack function.
    """
    entry = ATTACKS.get(attack) if isinstance(attack, str) else attack
    if isinstance(entry, MembershipAttack):
        return entry.score_all(obs, **options)
    return torch.stack([entry(obs, m, **options) for m in range(obs.num_models)])


__all__ = [
    "ATTACKS", "AllTargetsFn", "AttackFn", "LabelOracle", "MembershipAttack", "Observations", "clip_nonfinite", "cross_entropy", "inclusion_matrix",
    "lira_all_targets", "lira_requirements", "models_needed_exact", "models_needed_random", "rank_nonfinite",
    "reference_weights", "register_attack", "rmia_all_targets", "scaled_confidence", "score_all_targets", "shadow_coverage", "softmax_probs",
    "truth_serum_view", "yeom_decision", "yeom_threshold",
]
