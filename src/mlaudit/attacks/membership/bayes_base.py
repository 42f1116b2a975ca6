"""BASE, the practical Bayes-optimal membership attack of Lassila, Östman, Ngo & Graell i Amat 2025,
"Practical Bayes-Optimal Membership Inference Attacks" (NeurIPS; arXiv 2505.24089), online and offline.

Threat model: as RMIA's (:mod:`.rmia`): black-box access to the target's logits, reference models trained
by the attacker with the same recipe (the other models of the pool, leave-one-out), no population data.

BASE approximates the Bayes-optimal decision rule of Sablayrolles et al. 2019 by comparing the target's
temperature-scaled log-likelihood of x's label with a LogSumExp over the reference models. With
``s_m(x) = log softmax(z_m(x) / T)_y`` (model m's logits z_m on x, true label y, temperature T; the mean over
the A augmented queries of ``obs``):

    online:   score(x) = s_t(x) - log( (1 / R) sum_{r in refs} exp s_r(x) )         (IN and OUT references)
    offline:  score(x) = s_t(x) - a * log( (1 / R_out) sum_{r OUT for x} exp s_r(x) ) (OUT references only)

The offline factor ``a`` rescales the threshold to make up for the missing IN models. The authors show BASE
equals RMIA with gamma -> 1 and a population-free threshold (their Sec. on the link to RMIA; Brännvall 2026,
"Exponential-Family Membership Inference", places both in one family). Defaults T = 2 and a = 0.33 are those of
LeakPro's implementation (by the paper's group); no per-dataset tuning here. The score ranks x against a
per-example threshold, so no population set is needed: the cost is O(M N A C) for the signals and O(M R N) for
the thresholds of all M targets, RMIA's pairwise comparisons (O(N log Z) per target) are gone.

Shapes: logits [M, N, A, C], labels [N], keep bool [M, N]; scores float64 [N] per target (higher = member).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .references import reference_requirements, reference_weights
from .signals import cross_entropy, warn_clipped


def tempered_log_likelihood(logits: Tensor, labels: Tensor, temperature: float, *, attack: str) -> Tensor:
    """s_m(x) = log softmax(z / T)_y, the mean over queries: logits [M, N, A, C] -> float64 [M, N] (the shared
    cross-entropy signal at temperature T: float64, chunks of models, non-finite logits clipped and counted)."""
    loss, clipped = cross_entropy(logits, labels, temperature=temperature)
    warn_clipped(clipped, loss.numel(), attack=attack)
    return -loss.mean(-1)


def _check(obs: Observations, *, temperature: float, a: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"base option temperature must be a positive finite number, got {temperature!r}")
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"base-offline option a must lie in [0, 1] (a = 1: the plain LogSumExp threshold), got {a!r}")
    if obs.num_models < 2:
        raise ConfigError("base needs at least 1 reference model: the pool has only the target (M = 1)")


def _log_mean_exp(s: Tensor, w: Tensor) -> Tensor:
    """log of the mean of exp(s) over the rows with w: s float64 [R, N], w bool [R, N] -> [N] (-inf where none)."""
    masked = torch.where(w, s, torch.full_like(s, -math.inf))
    return torch.logsumexp(masked, 0) - torch.log(w.sum(0).to(s.dtype))


def _base(obs: Observations, targets: list[int], *, online: bool, temperature: float, a: float,
          references: int | None, seed: int) -> Tensor:
    name = "base-online" if online else "base-offline"
    _check(obs, temperature=temperature, a=a)
    s = tempered_log_likelihood(obs.logits, obs.labels, temperature, attack=name)  # on the logits' device (see rmia)
    keep = obs.keep.bool().to(s.device)
    out = []
    for t in targets:
        refs, w_in, w_out = reference_weights(keep, t, references=references, online=online, seed=seed, attack=name)
        refs = refs.to(s.device)
        w = (w_in | w_out) if online else w_out
        if bool((w.sum(0) < 1).any()):
            raise ConfigError(f"{name} needs >= 1 {'' if online else 'OUT '}reference model (a model other than target "
                              f"{t}{'' if online else ' not trained on the example'}) for every example; "
                              f"{int((w.sum(0) < 1).sum())} examples have none: train more models (pool.models)")
        threshold = _log_mean_exp(s[refs], w)
        out.append(s[t] - (threshold if online else a * threshold))
    return torch.stack(out)


def base_all_targets(obs: Observations, *, online: bool, temperature: float = 2.0, a: float = 0.33,
                     references: int | None = None, seed: int = 0) -> Tensor:
    """Scores float64 [M, N] of every model as the target (row m equals the single-target call)."""
    return _base(obs, list(range(obs.num_models)), online=online, temperature=temperature, a=a, references=references,
                 seed=seed)


@register_attack("base-online", all_targets=partial(base_all_targets, online=True),
                 requirements=partial(reference_requirements, online=True))
def base_online(obs: Observations, target: int, *, temperature: float = 2.0, references: int | None = None,
                seed: int = 0) -> Tensor:
    """Online BASE: s_t(x) minus the log-mean-exp of s over IN and OUT references -> scores float64 [N]."""
    return _base(obs, [target], online=True, temperature=temperature, a=1.0, references=references, seed=seed)[0]


@register_attack("base-offline", all_targets=partial(base_all_targets, online=False),
                 requirements=partial(reference_requirements, online=False))
def base_offline(obs: Observations, target: int, *, temperature: float = 2.0, a: float = 0.33,
                 references: int | None = None, seed: int = 0) -> Tensor:
    """Offline BASE: s_t(x) minus a times the log-mean-exp of s over OUT references -> scores float64 [N]."""
    return _base(obs, [target], online=False, temperature=temperature, a=a, references=references, seed=seed)[0]
