"""DP auditing (canaries, canary scores, the distinguishing game) and memorization.

The ``dp-audit`` experiment kind (:mod:`mlaudit.experiments.dp_audit`) is the protocol: it builds a
canary (:mod:`.canaries`), trains models with and without it, scores them (:mod:`.scores`) and plays
the distinguishing game (:mod:`.game`), or, with ``design: one-run``, inserts many canaries
(:data:`.canaries.CANARY_SETS`) each with probability 1/2 into a few runs and bounds epsilon from the
guesses (:mod:`.one_run`, Steinke, Nasr & Jagielski 2023); :mod:`.gdp` turns the game's error
rates into Gaussian-DP estimates (Nasr et al. 2023). The ``membership-inference`` kind estimates memorization and
influence from its pool (:mod:`.memorization`)."""

from .canaries import (
    CANARIES,
    CANARY_SETS,
    Canary,
    CanarySet,
    coordinate_energy,
    crafted_canary,
    gradient_canary,
    mislabeled_canaries,
    mislabeled_canary,
    per_example_grad_chunks,
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
from .gdp import (
    GDPEstimate,
    delta_from_mu,
    dpsgd_mu_clt,
    eps_from_mu,
    gdp_estimate,
    mu_from_rates,
    mu_lower_bound,
)
from .memorization import influence, max_standard_error, mean_member_score, self_influence
from .one_run import OneRunAudit, best_reachable_bound, default_choices, draw_inclusion
from .one_run import epsilon_lower_bound as one_run_lower_bound
from .one_run import p_value as one_run_p_value
from .scores import canary_loss, canary_losses, input_update_scores, update_scores

__all__ = [
    "CANARIES",
    "CANARY_SETS",
    "MIN_USEFUL_EPS",
    "Canary",
    "CanarySet",
    "Distinguisher",
    "GDPEstimate",
    "OneRunAudit",
    "best_possible_bound",
    "best_reachable_bound",
    "canary_loss",
    "canary_losses",
    "coordinate_energy",
    "crafted_canary",
    "default_choices",
    "delta_from_mu",
    "distinguish",
    "dpsgd_mu_clt",
    "draw_inclusion",
    "eps_from_mu",
    "gdp_estimate",
    "gradient_canary",
    "influence",
    "input_update_scores",
    "max_standard_error",
    "mean_member_score",
    "mislabeled_canaries",
    "mislabeled_canary",
    "models_needed",
    "mu_from_rates",
    "mu_lower_bound",
    "one_run_lower_bound",
    "one_run_p_value",
    "per_example_grad_chunks",
    "second_moment_quotient",
    "self_influence",
    "threshold_errors",
    "update_scores",
    "with_canary",
]
