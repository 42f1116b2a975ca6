"""Indiscriminate attacks of seed 001, family ``indiscriminate`` of the poisoner registry: degrade a
victim's clean test accuracy.

* ``label-flip`` (:mod:`.label_flip`) — insert mislabelled copies of clean points (``random`` or
  ``loss-max``);
* ``param-corruption`` (:mod:`.param_corruption`) — GradPC: maximise the training loss within
  ||w - w_c|| <= eps_w (Sun et al. 2021); acts on weights, and is the *target* step of gradient canceling;
* ``gradient-canceling`` (:mod:`.gradient_canceling`) — insert eps_d N points making the target w_t
  stationary for the poisoned training objective, min 1/2 ||g(mu; w_t) + eps_d g(nu; w_t)||^2 (Lu,
  Kamath & Yu, ICML 2023);
* :func:`reachability_threshold` (:mod:`.threshold`) — tau, below which no eps_d poisoning can reach
  a target.
"""

from ._functional import num_poisons, require_smooth
from .gradient_canceling import (
    CancelingOptions,
    CancelingResult,
    GradientCanceling,
    gradient_canceling,
    improve_labels,
)
from .label_flip import FlipOptions, FlipResult, flipped_losses, label_flip
from .param_corruption import CorruptionResult, TargetOptions, corrupted_target, gradpc
from .threshold import (
    SEED_CONSTANT,
    Threshold,
    logits_linear_in_params,
    loss_bound,
    reachability_threshold,
    tau_from,
)

__all__ = [
    "SEED_CONSTANT", "CancelingOptions", "CancelingResult", "CorruptionResult", "FlipOptions", "FlipResult",
    "GradientCanceling", "TargetOptions", "Threshold", "corrupted_target", "flipped_losses", "gradient_canceling",
    "gradpc", "improve_labels", "label_flip", "logits_linear_in_params", "loss_bound", "num_poisons",
    "reachability_threshold", "require_smooth", "tau_from",
]
