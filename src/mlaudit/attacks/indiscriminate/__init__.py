"""Indiscriminate (availability) attacks of seed 001: degrade a victim's clean test accuracy.

* :func:`label_flip` — insert mislabelled copies of clean points (``random`` or ``loss-max``);
* :func:`gradpc` — parameter corruption: maximise the training loss within ||w - w_c|| <= eps_w
  (Sun et al. 2021); the *target* of gradient canceling;
* :func:`gradient_canceling` — insert eps_d N points making a target w_t stationary for the poisoned
  training objective, min 1/2 ||g(mu; w_t) + eps_d g(nu; w_t)||^2 (Lu, Kamath & Yu, ICML 2023);
* :func:`reachability_threshold` — tau, below which no eps_d poisoning can reach a target.

:data:`ATTACKS` lists the methods by name with what they act on (``data``: inserted poisons, judged
by victims retrained from scratch; ``model``: overwritten weights, judged directly) and whether they
need a model without BatchNorm (``smooth_only``).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ...registry import Registry
from ._functional import num_poisons
from .gradient_canceling import CancelingResult, GradientCanceling, gradient_canceling, improve_labels
from .label_flip import FlipResult, flipped_losses, label_flip
from .param_corruption import CorruptionResult, gradpc
from .threshold import (
    SEED_CONSTANT,
    Threshold,
    logits_linear_in_params,
    loss_bound,
    reachability_threshold,
    tau_from,
)


@dataclass(frozen=True)
class IndiscriminateAttack:
    """A registered method: its library function, what it acts on, whether it refuses BatchNorm
    models, whether it produces target parameters (then tau is reported), and a one-line summary."""

    name: str
    fn: Callable[..., Any]
    acts_on: Literal["data", "model"]
    smooth_only: bool
    has_target: bool
    description: str


ATTACKS: Registry[IndiscriminateAttack] = Registry("indiscriminate attack")
for _entry in (
    IndiscriminateAttack("label-flip", label_flip, "data", False, False,
                         "insert eps_d N mislabelled copies of clean points (random or loss-max labels)"),
    IndiscriminateAttack("param-corruption", gradpc, "model", True, True,
                         "GradPC: maximise the training loss within ||w - w_c|| <= eps_w"),
    IndiscriminateAttack("gradient-canceling", gradient_canceling, "data", True, True,
                         "insert eps_d N points making the GradPC target stationary for the poisoned loss"),
):
    ATTACKS.register(_entry.name)(_entry)

__all__ = [
    "ATTACKS", "SEED_CONSTANT", "CancelingResult", "CorruptionResult", "FlipResult", "GradientCanceling",
    "IndiscriminateAttack", "Threshold", "flipped_losses", "gradient_canceling", "gradpc", "improve_labels",
    "label_flip", "logits_linear_in_params", "loss_bound", "num_poisons",
    "reachability_threshold", "tau_from",
]
