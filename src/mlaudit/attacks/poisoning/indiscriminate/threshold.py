"""The model-poisoning reachability threshold tau (seed 001, "Transition Threshold"; Lu, Kamath & Yu,
"Exploring the limits of model-targeted indiscriminate data poisoning attacks", ICML 2023).

A target ``w`` is eps_d-poisoning reachable when some poison distribution nu makes it stationary for
the mixed training distribution: ``g(mu; w) + eps_d g(nu; w) = 0`` (g = mean loss gradient). Taking
the inner product with ``w`` gives ``<w, g(mu)> + eps_d <w, g(nu)> = 0``; when ``<w, g(nu)> >= -c`` for
*every* nu, no attack reaches ``w`` with

    eps_d < tau = max{ <w, g(mu; w)> / c, 0 }.                                    (seed 001)

The constant c. For a model whose logits s = f(x; w) are *linear in the parameters* (logistic
regression, weights and bias; checked numerically by :func:`logits_linear_in_params`),
``<w, grad_w CE(x, y; w)> = d/dt CE(f(x; t w), y)|_{t=1} = sum_k p_k (s_k - s_y)`` with p = softmax(s).
Binary (seed 001): ``-t / (1 + e^t) >= -W(1/e) = -0.2785`` (W = Lambert W). Multiclass with K classes
(our generalisation): writing v_k = exp(s_k - s_y) for k != y, the sum is
``sum v_k log v_k / (1 + sum v_k)``, minimised at equal v_k (convexity of v log v for a fixed sum S)
and then at S + log S = log(K - 1) - 1, i.e. S = W((K - 1)/e), where it equals -S. Hence

    c_K = W((K - 1) / e)          (c_2 = 0.2785 as in seed 001; c_10 = 1.101).

Weight decay. A victim minimising ``F(chi; w) + lambda/2 ||w||^2`` on the mixture chi ~ mu + eps_d nu has
the stationarity condition ``g(mu) + eps_d g(nu) + (1 + eps_d) lambda w = 0``; with a = <w, g(mu)> +
lambda ||w||^2 and b = lambda ||w||^2 the same argument gives

    tau = 0 if a <= 0;   a / (c_K - b) if b < c_K;   +inf otherwise,

which is seed 001's formula at lambda = 0. For models that are not linear in their parameters (MLP,
CNN) the bound does not hold; seed 001's table still lists tau for them, so :func:`reachability_threshold`
computes the same number and marks it ``exact=False`` (a heuristic, not a bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.special import lambertw
from torch import Tensor, nn

from ....errors import ConfigError
from ....query import ParamVector, forward_batched
from ._functional import mean_loss_and_grad

SEED_CONSTANT = float(lambertw(1 / math.e).real)
"""W(1/e) = 0.2785: seed 001's constant (binary logistic loss)."""


def loss_bound(num_classes: int) -> float:
    """c_K = W((K - 1)/e) = -inf over (x, y) of <w, grad_w CE> for logits linear in w (K >= 2)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    return float(lambertw((num_classes - 1) / math.e).real)


def tau_from(inner: float, sq_norm: float, *, constant: float, weight_decay: float = 0.0) -> float:
    """tau from ``inner`` = <w, g(mu; w)>, ``sq_norm`` = ||w||^2, the bound ``constant`` c and
    ``weight_decay`` lambda (module docstring); +inf when no eps_d can reach the target."""
    if constant <= 0 or weight_decay < 0:
        raise ConfigError(f"need constant > 0 and weight_decay >= 0, got {constant}, {weight_decay}")
    a = inner + weight_decay * sq_norm
    b = weight_decay * sq_norm
    if a <= 0:
        return 0.0
    return a / (constant - b) if b < constant else math.inf


@torch.no_grad()
def logits_linear_in_params(model: nn.Module, x: Tensor, *, rtol: float = 1e-4) -> bool:
    """Whether f(x; t w) = t f(x; w) (t = 2, 0.5) on the inputs ``x`` [B, ...]: the property the
    bound needs (true for logistic regression with a bias, false for nets with hidden layers)."""
    w = ParamVector.from_module(model)
    base = forward_batched(model, x, device=x.device, params=w)
    for t in (2.0, 0.5):
        out = forward_batched(model, x, device=x.device, params=t * w)
        if not torch.allclose(out, t * base, rtol=rtol, atol=rtol * float(base.abs().max()) + 1e-6):
            return False
    return True


@dataclass(frozen=True)
class Threshold:
    """tau of one target (see the module docstring) and its ingredients. ``exact``: the model is
    linear in its parameters, so tau is a proven lower bound on the eps_d any attack needs;
    ``tau_seed``: seed 001's formula verbatim, max{<w, g(mu)>/0.2785, 0} (binary constant, no decay)."""

    tau: float
    inner: float
    sq_norm: float
    weight_decay: float
    constant: float
    num_classes: int
    exact: bool
    tau_seed: float

    def reachable(self, eps_d: float) -> bool:
        """The necessary condition eps_d >= tau (not sufficient: reaching also needs an attack)."""
        return eps_d >= self.tau

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"value": self.tau, "inner": self.inner, "sq_norm": self.sq_norm, "weight_decay": self.weight_decay,
                "constant": self.constant, "num_classes": self.num_classes, "exact": self.exact,
                "tau_seed": self.tau_seed}


def reachability_threshold(model: nn.Module, x: Tensor, y: Tensor, *, num_classes: int, weight_decay: float = 0.0,
                           chunk_size: int = 1024) -> Threshold:
    """tau of the target ``model`` for clean training data x [N, *shape], y [N] (cross-entropy with
    hard labels; ``weight_decay`` lambda of the victim's objective)."""
    w = ParamVector.from_module(model)
    _, g = mean_loss_and_grad(model, w, x, y, chunk_size=chunk_size)
    inner, sq = float(w.dot(g)), float(w.dot(w))
    c = loss_bound(num_classes)
    return Threshold(tau=tau_from(inner, sq, constant=c, weight_decay=weight_decay), inner=inner, sq_norm=sq,
                     weight_decay=weight_decay, constant=c, num_classes=num_classes,
                     exact=logits_linear_in_params(model, x[:64]),
                     tau_seed=max(inner / SEED_CONSTANT, 0.0))
