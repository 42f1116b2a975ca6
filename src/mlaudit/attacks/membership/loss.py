"""Loss-based membership inference of Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing
the Connection to Overfitting" (CSF), seed 004: models fit their training examples, so a low loss
suggests membership.

Threat model: black-box query access to the target's logits and the example's true label; the
threshold (A2) or bound (A1) comes from shadow models (the other models of the pool), standing in
for the paper's assumed knowledge of the average training loss L_S.

* ``loss`` (adversary A2, threshold): score = -loss, the cross-entropy averaged over the augmented
  queries. A2 predicts "member" when the loss is below a threshold; the ROC of ``-loss`` sweeps every
  threshold, and :func:`yeom_decision` gives the paper's single decision at the average training
  loss of the shadow models (:func:`yeom_threshold`, Yeom et al. Sec. 3.2 / Table 1 "L_S").
* ``loss-bounded`` (adversary A1, bounded loss): with a loss bounded by B, Yeom et al. (Theorem 2)
  answer "non-member" with probability loss / B, so the membership probability is
  ``1 - min(loss, B) / B`` in [0, 1]; its advantage is R_gen / B (the generalisation gap over B).
  Cross-entropy is unbounded, so B is the option ``bound`` (default: the largest shadow loss, and
  larger losses are clipped to B). The score is the probability (the expected decision); draw the
  randomised decision with ``torch.bernoulli(scores)`` if needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .signals import cross_entropy, warn_clipped


def _losses(obs: Observations, models: slice | None = None, *, attack: str) -> Tensor:
    """Cross-entropy averaged over queries, float64 [m, N], for ``obs.logits[models]`` (all if None)."""
    logits = obs.logits if models is None else obs.logits[models]
    loss, clipped = cross_entropy(logits, obs.labels)
    warn_clipped(clipped, loss.numel(), attack=attack)
    return loss.mean(-1).cpu()


def _check_target(obs: Observations, target: int) -> None:
    if not 0 <= target < obs.num_models:
        raise ConfigError(f"target must be a model index in [0, {obs.num_models - 1}], got {target}")


def _shadow_index(obs: Observations, target: int) -> Tensor:
    return torch.tensor([i for i in range(obs.num_models) if i != target], dtype=torch.long)


def _loss_all(obs: Observations) -> Tensor:
    return -_losses(obs, attack="loss")


@register_attack("loss", all_targets=_loss_all)
def loss_attack(obs: Observations, target: int) -> Tensor:
    """Yeom et al.'s LOSS attack: scores float64 [N] = -(mean cross-entropy of the target over queries).

    Uses only the target's outputs (no shadows).
    """
    _check_target(obs, target)
    return -_losses(obs, slice(target, target + 1), attack="loss")[0]



def yeom_threshold(obs: Observations, target: int) -> float:
    """Average training loss of the shadow models (all models but ``target``) on their IN examples.

    This is A2's threshold: the paper assumes the attacker knows the target's average training
    loss L_S; the shadows' average estimates it. Raises ConfigError when no shadow has IN examples.
    """
    _check_target(obs, target)
    shadows = _shadow_index(obs, target)
    keep = obs.keep[shadows].bool().cpu()
    if not bool(keep.any()):
        raise ConfigError(f"yeom_threshold needs shadow models (models other than target {target}) with "
                          "training examples in the pool; keep has none")
    loss = _losses(obs, attack="loss")[shadows]
    return float(loss[keep].mean())


def yeom_decision(obs: Observations, target: int, *, threshold: float | None = None) -> Tensor:
    """A2's decision bool [N]: member iff the target's mean loss <= ``threshold``
    (default :func:`yeom_threshold`)."""
    thr = yeom_threshold(obs, target) if threshold is None else float(threshold)
    return -loss_attack(obs, target) <= thr


def _check_bound(bound: float) -> float:
    if not bound > 0 or bound == float("inf"):
        raise ConfigError(f"loss-bounded option bound must be a positive finite loss, got {bound!r}")
    return float(bound)


def _loss_bounded_all(obs: Observations, *, bound: float | None = None) -> Tensor:
    loss = _losses(obs, attack="loss-bounded")
    if bound is None:
        if obs.num_models < 2:
            raise ConfigError("loss-bounded needs option bound when the pool has no shadow models (M = 1)")
        row_max = loss.max(1).values  # [M]
        top2 = row_max.topk(2)
        # the largest loss among the other models: the overall max unless the target holds it
        b = torch.where(torch.arange(obs.num_models) == top2.indices[0], top2.values[1], top2.values[0])
        b = b.clamp_min(1e-12).unsqueeze(1)
    else:
        b = torch.tensor(_check_bound(bound), dtype=loss.dtype)
    return 1.0 - torch.minimum(loss, b) / b


@register_attack("loss-bounded", all_targets=_loss_bounded_all)
def loss_bounded(obs: Observations, target: int, *, bound: float | None = None) -> Tensor:
    """Yeom et al.'s A1: membership probability float64 [N] = ``1 - min(loss, B) / B`` in [0, 1].

    ``bound`` B defaults to the largest mean loss of any shadow model (models other than ``target``)
    on any pool example; raises ConfigError when there is no shadow model and no ``bound``.
    """
    _check_target(obs, target)
    loss = _losses(obs, attack="loss-bounded")
    if bound is None:
        if obs.num_models < 2:
            raise ConfigError("loss-bounded needs option bound when the pool has no shadow models (M = 1)")
        b = max(float(loss[_shadow_index(obs, target)].max()), 1e-12)
    else:
        b = _check_bound(bound)
    return 1.0 - loss[target].clamp(0.0, b) / b
