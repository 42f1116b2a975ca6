"""DP auditing (canaries, canary scores, the distinguishing game) and memorization.

The ``dp-audit`` experiment kind (:mod:`mlaudit.experiments.dp_audit`) is the protocol: it builds a
canary (:mod:`.canaries`), trains models with and without it, scores them (:mod:`.scores`) and plays
the distinguishing game (:mod:`.game`). The ``membership-inference`` kind estimates memorization and
influence from its pool (:mod:`.memorization`)."""

from .canaries import (
    CANARIES,
    Canary,
    coordinate_energy,
    crafted_canary,
    gradient_canary,
    mislabeled_canary,
    second_moment_quotient,
    with_canary,
)
from .game import (
    MIN_USEFUL_EPS,
    Distinguisher,
    best_possible_bound,
    distinguish,
    models_needed,
    threshold_errors,
)
from .memorization import influence, max_standard_error, mean_member_score, self_influence
from .scores import canary_loss, update_scores

__all__ = [
    "CANARIES",
    "MIN_USEFUL_EPS",
    "Canary",
    "Distinguisher",
    "best_possible_bound",
    "canary_loss",
    "coordinate_energy",
    "crafted_canary",
    "distinguish",
    "gradient_canary",
    "influence",
    "max_standard_error",
    "mean_member_score",
    "mislabeled_canary",
    "models_needed",
    "second_moment_quotient",
    "self_influence",
    "threshold_errors",
    "update_scores",
    "with_canary",
]
