"""The Likelihood Ratio Attack (LiRA) of Carlini et al. 2022, "Membership Inference Attacks From
First Principles" (IEEE S&P), Algorithm 1 (online) and Eq. (4) (offline); seed 004.

Threat model: black-box access to the target's logits on the example and its augmented copies,
plus shadow models trained by the attacker with the same recipe on random halves of a data pool
from the same distribution, whose memberships (``keep``) the attacker knows.

For target model m and example n, the shadows are the other M - 1 models; their scaled confidences
``phi`` (:func:`~.signals.scaled_confidence`, one per augmented query a) split into IN (``keep``)
and OUT sets, each fitted by a Gaussian per query:

* ``lira-online``  score = sum_a [log N(phi_a; mu_in,a, var_in,a) - log N(phi_a; mu_out,a, var_out,a)]
  (Algorithm 1 line 15, with the A queries a Gaussian of diagonal covariance, Sec. IV-C; the sum
  ranks examples exactly as the mean over queries of the reference code).
* ``lira-offline`` score = sum_a log Phi((phi_a - mu_out,a) / sd_out,a): the log of the one-sided
  probability ``1 - Pr[Z > phi]``, Z ~ N(mu_out, var_out), of Eq. (4) (a single-tailed test: only
  a confidence *higher* than the OUT models' counts as evidence of membership). Needs no IN models.

Options: ``variance="per-example"`` (sample variance, ddof 1, of each example's IN/OUT sets; needs
>= 2 IN and >= 2 OUT shadows per example), ``"fixed"`` (one variance per query and side, pooled
over all examples from the *within-example* squared deviations; needs >= 1 per example and some
example with >= 2) or ``"global"`` (one variance per side: the population variance, ddof 0, of all
IN (OUT) confidences of all examples, shadows and queries around their grand mean, as the reference
code's ``fix_variance=True`` does with ``np.std`` over the whole IN array; it includes the spread
*between* examples' means, so it is larger than ``fixed``; needs >= 1 per example). The paper's
fixed-variance results (Sec. VI-A, "with few shadow models we use a global variance") were made
with the released reference code, i.e. the ``global`` form; ``fixed`` is mlaudit's earlier pooled
estimate, kept for comparison. (To our reading the released ``plot.py`` also takes the OUT standard
deviation from the IN array; we do not copy that: ``global`` uses each side's own values.)
``var_eps`` (added to every variance, default 1e-6); ``references`` caps the shadow models per
example (:mod:`.references`; None: all other models). Means are sample means (Algorithm 1 lines
10-11; the reference code uses medians). Statistics are float64.

Cost: :func:`lira_all_targets` scores all M targets in O(M * N * A) after one pass of
:func:`scaled_confidence`: per example it sums over all models once and subtracts each target's
own term (leave-one-out), on values centred per example so the subtraction stays accurate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .design import models_needed_random
from .references import reference_split, reference_weights
from .signals import scaled_confidence, warn_clipped

Variance = Literal["per-example", "fixed", "global"]
VAR_EPS = 1e-6


@dataclass(frozen=True)
class _Moments:
    """Sums over shadow models of centred phi: s1, s2 [..., N, A]; counts n [..., N] (float64)."""

    s1: Tensor
    s2: Tensor
    n: Tensor

    def __sub__(self, other: _Moments) -> _Moments:
        return _Moments(self.s1 - other.s1, self.s2 - other.s2, self.n - other.n)


def _moments(d: Tensor, w: Tensor) -> _Moments:
    """Per-model terms of d [M, N, A] weighted by w bool [M, N] (not summed)."""
    wf = w.to(d.dtype)
    wd = wf.unsqueeze(-1) * d
    return _Moments(wd, wd * d, wf)


def _total(mom: _Moments) -> _Moments:
    return _Moments(mom.s1.sum(0), mom.s2.sum(0), mom.n.sum(0))


def _per_example_var(ssd: Tensor, n: Tensor) -> Tensor:
    return ssd / (n - 1).clamp_min(1)


def _pooled_var(ssd: Tensor, n: Tensor) -> Tensor:
    dof = (n - 1).clamp_min(0).sum(-2, keepdim=True)  # [..., 1, 1]
    if bool((dof <= 0).any()):
        raise ConfigError("lira with variance='fixed' needs at least one example with >= 2 IN (or OUT) shadow "
                          "models to pool a variance; train more shadow models")
    return ssd.sum(-2, keepdim=True) / dof  # [..., 1, A], broadcast over examples


def _global_var(mom: _Moments, centre: Tensor) -> Tensor:
    """Variance (ddof 0) of all values phi = d + centre over examples, shadows and queries [..., 1, 1]."""
    n = mom.n.unsqueeze(-1).expand_as(mom.s1)
    tot = n.sum((-2, -1), keepdim=True)
    if bool((tot < 1).any()):
        raise ConfigError("lira with variance='global' needs at least one IN (OUT) shadow value; train more models")
    s1 = (mom.s1 + n * centre).sum((-2, -1), keepdim=True) / tot
    s2 = (mom.s2 + 2 * centre * mom.s1 + n * centre ** 2).sum((-2, -1), keepdim=True) / tot
    return (s2 - s1 ** 2).clamp_min(0.0)


_VARIANCE = {"per-example": _per_example_var, "fixed": _pooled_var, "global": _global_var}
_MIN_SHADOWS = {"per-example": 2, "fixed": 1, "global": 1}


def _gaussian(mom: _Moments, variance: str, var_eps: float, centre: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance (+ var_eps) per example and query from the moments of d = phi - centre."""
    n = mom.n.unsqueeze(-1)
    mu = mom.s1 / n.clamp_min(1)
    if variance == "global":
        return mu, _global_var(mom, centre) + var_eps
    ssd = (mom.s2 - mom.s1 * mu).clamp_min(0.0)  # sum of squared deviations from the mean
    return mu, _VARIANCE[variance](ssd, n) + var_eps


def _log_normal(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mu) ** 2 / var)


def lira_requirements(*, online: bool, variance: Variance = "per-example", references: int | None = None,
                      **_: object) -> tuple[int, int]:
    """Fewest (IN, OUT) shadow models each example needs, per target, for this LiRA variant (with a
    cap ``references`` = k: k // 2 IN and k - k // 2 OUT online, k OUT offline, see :mod:`.references`)."""
    _check_variance(variance)
    r = _MIN_SHADOWS[variance]
    r_in, r_out = (r if online else 0), r
    if references is not None:
        k_in, k_out = reference_split(references, online=online)
        if k_in < r_in or k_out < r_out:
            raise ConfigError(f"lira-{'online' if online else 'offline'} with variance={variance!r} needs >= {r_in} IN "
                              f"and >= {r_out} OUT shadows per example, so references >= "
                              f"{2 * max(r_in, r_out) if online else r_out}; got references={references} "
                              "(variance='global' or 'fixed' needs fewest)")
        r_in, r_out = max(r_in, k_in), max(r_out, k_out)
    return r_in, r_out


def _check_variance(variance: str) -> None:
    if variance not in _VARIANCE:
        raise ConfigError(f"lira option variance={variance!r} is not allowed; use one of {sorted(_VARIANCE)}")


def _check_counts(n_in: Tensor, n_out: Tensor, keep_rate: float, *, online: bool, variance: str,
                  targets: list[int]) -> None:
    """Raise ConfigError naming how many examples lack IN/OUT shadows; n_* are [T, N] counts for the
    targets ``targets``."""
    r_in, r_out = lira_requirements(online=online, variance=variance)  # type: ignore[arg-type]
    bad_in, bad_out = n_in < r_in, n_out < r_out  # [T, N]
    bad_targets = (bad_in | bad_out).any(1)
    if not bool(bad_targets.any()):
        return
    name = "lira-online" if online else "lira-offline"
    n = n_in.shape[-1]
    hit = [targets[i] for i in torch.nonzero(bad_targets).flatten().tolist()]
    shown = ", ".join(map(str, hit[:8])) + (", ..." if len(hit) > 8 else "")
    need_txt = f">= {r_in} IN and >= {r_out} OUT" if r_in else f">= {r_out} OUT"
    lack_txt = (f"{int(bad_in.any(0).sum())} of {n} examples have fewer than {r_in} IN and " if r_in else "")
    lack_txt += f"{int(bad_out.any(0).sum())} of {n} examples have fewer than {r_out} OUT shadows"
    need = models_needed_random(n, keep_rate, min_in=r_in, min_out=r_out)
    raise ConfigError(
        f"{name} with variance={variance!r} needs {need_txt} shadow models (models other than the target) per "
        f"example, but for {len(hit)} target model(s) ({shown}) {lack_txt}. Train more models: with keep "
        f"rate {keep_rate:.2f}, about {need} models give every example enough (a balanced design, each "
        f"example IN for exactly half of the models, needs {2 * max(r_in, r_out) + 2}); shadow_coverage(keep) "
        "checks a design before training" + ("; or use variance='fixed'." if variance == "per-example" else "."))


def _score(d: Tensor, mom_in: _Moments, mom_out: _Moments, *, online: bool, variance: str,
           var_eps: float, centre: Tensor) -> Tensor:
    """LiRA score [..., N] of centred target confidences d [..., N, A] given shadow moments."""
    mu_out, var_out = _gaussian(mom_out, variance, var_eps, centre)
    if not online:
        return torch.special.log_ndtr((d - mu_out) / var_out.sqrt()).sum(-1)
    mu_in, var_in = _gaussian(mom_in, variance, var_eps, centre)
    return (_log_normal(d, mu_in, var_in) - _log_normal(d, mu_out, var_out)).sum(-1)


def _prepare(obs: Observations, *, online: bool, variance: str, var_eps: float) -> tuple[Tensor, Tensor]:
    _check_variance(variance)
    if not var_eps >= 0:
        raise ConfigError(f"lira option var_eps must be >= 0, got {var_eps!r}")
    phi, clipped = scaled_confidence(obs.logits, obs.labels)
    warn_clipped(clipped, phi.numel(), attack="lira-online" if online else "lira-offline")
    return phi, phi.mean(0, keepdim=True)


def _lira_target(obs: Observations, target: int, *, online: bool, variance: Variance = "per-example",
                 var_eps: float = VAR_EPS, references: int | None = None, seed: int = 0,
                 prepared: tuple[Tensor, Tensor] | None = None) -> Tensor:
    m = obs.num_models
    if not 0 <= target < m:
        raise ConfigError(f"target must be a model index in [0, {m - 1}], got {target}")
    if references is not None:
        lira_requirements(online=online, variance=variance, references=references)
    phi, centre = prepared or _prepare(obs, online=online, variance=variance, var_eps=var_eps)
    d = phi - centre
    name = "lira-online" if online else "lira-offline"
    shadows, w_in, w_out = reference_weights(obs.keep.bool().cpu(), target, references=references, online=online,
                                             seed=seed, attack=name)  # never keep[target]
    w_in, w_out = w_in.to(d.device), w_out.to(d.device)
    mom_in, mom_out = _total(_moments(d[shadows], w_in)), _total(_moments(d[shadows], w_out))
    rate = float(obs.keep[shadows].float().mean()) if shadows.numel() else 0.5
    _check_counts(mom_in.n[None], mom_out.n[None], rate, online=online, variance=variance, targets=[target])
    return _score(d[target], mom_in, mom_out, online=online, variance=variance, var_eps=var_eps,
                  centre=centre[0]).cpu()


def lira_all_targets(obs: Observations, *, online: bool, variance: Variance = "per-example",
                     var_eps: float = VAR_EPS, references: int | None = None, seed: int = 0) -> Tensor:
    """Scores of every model as the target, float64 [M, N], in O(M * N * A) (leave-one-out sums;
    with ``references`` one target at a time, O(M^2 * N * A)).

    Row m equals ``ATTACKS.get(name)(obs, m, ...)`` up to float64 rounding (the totals over all
    models minus model m's own term; model m's keep cancels exactly in exact arithmetic).
    """
    if references is not None:
        prepared = _prepare(obs, online=online, variance=variance, var_eps=var_eps)
        return torch.stack([_lira_target(obs, t, online=online, variance=variance, var_eps=var_eps,
                                         references=references, seed=seed, prepared=prepared)
                            for t in range(obs.num_models)])
    phi, centre = _prepare(obs, online=online, variance=variance, var_eps=var_eps)
    d = phi - centre
    keep = obs.keep.to(d.device).bool()
    own_in, own_out = _moments(d, keep), _moments(d, ~keep)
    mom_in, mom_out = _total(own_in) - own_in, _total(own_out) - own_out  # [M, N, A] leave-one-out
    m = obs.num_models
    rate = float(keep.float().mean()) if keep.numel() else 0.5
    _check_counts(mom_in.n, mom_out.n, rate, online=online, variance=variance, targets=list(range(m)))
    return _score(d, mom_in, mom_out, online=online, variance=variance, var_eps=var_eps, centre=centre[0]).cpu()


@register_attack("lira-online", all_targets=partial(lira_all_targets, online=True),
                 requirements=partial(lira_requirements, online=True))
def lira_online(obs: Observations, target: int, *, variance: Variance = "per-example",
                var_eps: float = VAR_EPS, references: int | None = None, seed: int = 0) -> Tensor:
    """Online LiRA (Carlini et al. 2022, Algorithm 1): log-likelihood ratio of the target's scaled
    confidences under the IN and OUT Gaussians of the shadows -> scores float64 [N] (higher = member)."""
    return _lira_target(obs, target, online=True, variance=variance, var_eps=var_eps, references=references,
                        seed=seed)


@register_attack("lira-offline", all_targets=partial(lira_all_targets, online=False),
                 requirements=partial(lira_requirements, online=False))
def lira_offline(obs: Observations, target: int, *, variance: Variance = "per-example",
                 var_eps: float = VAR_EPS, references: int | None = None, seed: int = 0) -> Tensor:
    """Offline LiRA (Carlini et al. 2022, Eq. 4): log one-sided probability that an OUT model's scaled
    confidence is below the target's -> scores float64 [N] (higher = member). Uses OUT shadows only."""
    return _lira_target(obs, target, online=False, variance=variance, var_eps=var_eps, references=references,
                        seed=seed)

