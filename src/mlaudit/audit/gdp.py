"""Gaussian differential privacy (GDP) estimates for DP audits: the "tight auditing" of Nasr, Hayes,
Steinke, Balle, Tramèr, Jagielski, Carlini & Terzis (2023), "Tight Auditing of Differentially Private
Machine Learning" (USENIX Security), which reads a distinguishing attack's errors through the
Gaussian trade-off curve instead of through one (eps, delta) point.

Definitions (Dong, Roth & Su 2022, "Gaussian Differential Privacy", JRSS-B; preprint 2019):

- A mechanism is **mu-GDP** when every test between the outputs on neighbouring datasets has
  ``FNR >= G_mu(FPR) = Phi(Phi^-1(1 - FPR) - mu)``: it is no easier to tell apart than N(0, 1) from
  N(mu, 1).
- An attack with error rates (FPR, FNR) therefore shows ``mu >= Phi^-1(1 - FPR) - Phi^-1(FNR)``
  (:func:`mu_from_rates`; symmetric in FPR and FNR, since Phi^-1(1 - a) = -Phi^-1(a)).
- mu-GDP is exactly the family of (eps, delta(eps))-DP guarantees with (Corollary 2.13)::

      delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)

  (:func:`delta_from_mu`; :func:`eps_from_mu` inverts it by bisection).

The statistical bound (:func:`mu_lower_bound`) replaces FPR and FNR by their Clopper-Pearson upper
bounds (:func:`mlaudit.stats.clopper_pearson`, two-sided at level beta, i.e. each one-sided bound at
beta/2, jointly valid with probability >= 1 - beta), as :func:`mlaudit.stats.eps_lower_bound` does for
the (eps, delta) bound. The implied mu decreases in both rates, so the bound holds with confidence
>= 1 - beta: not for the mechanism's mu, but for the mu of the best Gaussian trade-off curve that lies
below the attack's true (FPR, FNR). Reading it as eps at a delta (:func:`eps_from_mu`) assumes that
the mechanism's trade-off curve *is* Gaussian (the assumption of Nasr et al.'s tight audits; DP-SGD
with many steps is close to GDP by the central limit theorem, :func:`dpsgd_mu_clt`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from ..errors import ConfigError
from ..stats import clopper_pearson
from .game import threshold_candidates, threshold_errors

__all__ = ["GDPEstimate", "gaussian_mu", "mu_from_rates", "mu_lower_bound", "mu_point", "delta_from_mu", "eps_from_mu", "dpsgd_mu_clt",
           "gdp_estimate", "gdp_best_threshold"]


def mu_from_rates(fpr: float, fnr: float) -> float:
    """The mu implied by an attack's error rates: ``Phi^-1(1 - FPR) - Phi^-1(FNR)`` (the smallest mu
    whose Gaussian trade-off curve G_mu lies on or below (FPR, FNR)). Negative for an attack worse
    than chance (FPR + FNR > 1); +inf when a rate is 0 and the other < 1."""
    fpr, fnr = float(fpr), float(fnr)
    if not (0.0 <= fpr <= 1.0 and 0.0 <= fnr <= 1.0):
        raise ConfigError(f"error rates must lie in [0, 1], got FPR {fpr!r}, FNR {fnr!r}")
    return float(norm.isf(fpr) - norm.ppf(fnr))


def mu_lower_bound(fp: int, fn: int, n_neg: int, n_pos: int, *, alpha: float = 0.05) -> float:
    """Lower confidence bound on mu from ``fp`` false positives of ``n_neg`` and ``fn`` false negatives
    of ``n_pos`` (Nasr et al. 2023): ``max(0, Phi^-1(1 - FPR_hi) - Phi^-1(FNR_hi))`` with FPR_hi, FNR_hi
    the Clopper-Pearson upper bounds, two-sided at level ``alpha`` (each one-sided at alpha / 2, as in
    :func:`mlaudit.stats.eps_lower_bound`). Holds with confidence >= 1 - alpha."""
    fpr_hi = clopper_pearson(fp, n_neg, alpha=alpha)[1]
    fnr_hi = clopper_pearson(fn, n_pos, alpha=alpha)[1]
    return max(0.0, mu_from_rates(fpr_hi, fnr_hi))


def mu_point(fp: int, fn: int, n_neg: int, n_pos: int) -> float:
    """Point estimate of mu from the empirical rates, each clipped to [1/(2n), 1 - 1/(2n)] so that an
    error-free attack gives a finite value (a continuity correction), and clamped at 0. Always >=
    :func:`mu_lower_bound` of the same counts."""
    def rate(k: int, n: int) -> float:
        return min(max(k / n, 0.5 / n), 1.0 - 0.5 / n)
    if n_neg < 1 or n_pos < 1 or not (0 <= fp <= n_neg and 0 <= fn <= n_pos):
        raise ConfigError(f"need 0 <= fp <= n_neg, 0 <= fn <= n_pos and n >= 1, got fp={fp}, fn={fn}, "
                          f"n_neg={n_neg}, n_pos={n_pos}")
    return max(0.0, mu_from_rates(rate(fp, n_neg), rate(fn, n_pos)))


def delta_from_mu(eps: float, mu: float) -> float:
    """delta(eps) of a mu-GDP mechanism (Dong, Roth & Su, Corollary 2.13):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``; the second term is evaluated in log space so
    that large eps do not overflow. delta(eps) = 0 for mu = 0."""
    eps, mu = float(eps), float(mu)
    if mu < 0 or eps < 0:
        raise ConfigError(f"need mu >= 0 and eps >= 0, got mu={mu!r}, eps={eps!r}")
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    second = math.exp(eps + float(norm.logcdf(-eps / mu - mu / 2)))
    return max(0.0, float(norm.cdf(-eps / mu + mu / 2)) - second)


def eps_from_mu(mu: float, delta: float, *, tol: float = 1e-10) -> float:
    """The smallest eps with ``delta_from_mu(eps, mu) <= delta``: the (eps, delta)-DP that mu-GDP gives
    at ``delta`` (delta(eps) decreases in eps, so bisection). 0 when delta >= delta(0) = 2 Phi(mu/2) - 1;
    +inf for mu = +inf."""
    mu, delta = float(mu), float(delta)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    if mu < 0:
        raise ConfigError(f"mu must be >= 0, got {mu!r}")
    if math.isinf(mu):
        return math.inf
    if delta_from_mu(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_from_mu(hi, mu) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        if delta_from_mu(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_mu(eps: float, delta: float, *, tol: float = 1e-12) -> float:
    """mu = 1 / sigma of the Gaussian mechanism (sensitivity 1) that is exactly (eps, delta)-DP: the
    largest mu with delta_mu(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta (Balle &
    Wang 2018, the analytic Gaussian mechanism; delta_mu(eps) increases with mu). Needs 0 < delta < 1."""
    if not 0.0 < delta < 1.0 or eps < 0:
        raise ValueError(f"gaussian_mu needs eps >= 0 and 0 < delta < 1, got eps={eps}, delta={delta}")
    lo, hi = 0.0, 1.0
    while delta_from_mu(eps, hi) <= delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            return math.inf
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_from_mu(eps, mid) <= delta else (lo, mid)
    return lo


def dpsgd_mu_clt(*, sample_rate: float, steps: int, noise_multiplier: float) -> float:
    """The mu of DP-SGD with Poisson sampling rate q, T steps and noise multiplier sigma by the central
    limit theorem of f-DP composition: ``mu ~ q sqrt(T (e^(1/sigma^2) - 1))`` (Bu, Dong, Long & Su
    2020, "Deep Learning with Gaussian Differential Privacy", HDSR, the Poisson-subsampling form of
    Dong, Roth & Su's CLT, Sec. 5; exact in the limit q sqrt(T) -> const, T -> inf). An
    **approximation**: it can under-state the privacy loss when q sqrt(T) is large or T is small,
    so it is a reference point, not an accountant."""
    q, t, s = float(sample_rate), float(steps), float(noise_multiplier)
    if not (0.0 < q <= 1.0 and t >= 0 and s > 0):
        raise ConfigError(f"need 0 < sample_rate <= 1, steps >= 0, noise_multiplier > 0; got q={q}, T={t}, "
                          f"sigma={s}")
    return q * math.sqrt(t * math.expm1(1.0 / s**2))


@dataclass(frozen=True)
class GDPEstimate:
    """GDP reading of a distinguishing attack's held-out errors (see :func:`gdp_estimate`)."""

    mu_point: float
    mu_lower: float
    eps_lower_from_mu: float
    eps_point_from_mu: float
    delta: float
    confidence: float
    threshold: float | None
    fp: int
    fn: int
    n_neg: int
    n_pos: int
    fpr: float
    fnr: float

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def gdp_estimate(fp: int, fn: int, n_neg: int, n_pos: int, *, delta: float, confidence: float,
                 threshold: float | None = None) -> GDPEstimate:
    """mu point estimate (:func:`mu_point`), lower bound at ``confidence`` (:func:`mu_lower_bound` at
    alpha = 1 - confidence) and the eps each gives at ``delta`` under the GDP assumption
    (:func:`eps_from_mu`), from one threshold's error counts."""
    lo = mu_lower_bound(fp, fn, n_neg, n_pos, alpha=1.0 - confidence)
    pt = mu_point(fp, fn, n_neg, n_pos)
    return GDPEstimate(mu_point=pt, mu_lower=lo, eps_lower_from_mu=eps_from_mu(lo, delta),
                       eps_point_from_mu=eps_from_mu(pt, delta), delta=float(delta), confidence=float(confidence),
                       threshold=None if threshold is None else float(threshold), fp=int(fp), fn=int(fn),
                       n_neg=int(n_neg), n_pos=int(n_pos), fpr=fp / n_neg, fnr=fn / n_pos)


def gdp_best_threshold(score_in: np.ndarray, score_out: np.ndarray, *, delta: float, alpha: float = 0.05
                       ) -> dict[str, float | int]:
    """The estimator of Annamalai & De Cristofaro (2024, "Nearly Tight Black-Box Auditing of Differentially
    Private Machine Learning", NeurIPS; their ``compute_eps_lower_gdp`` over every threshold), for comparing
    with their numbers: for every threshold t on the scores (a model is called "in" when its score <= t;
    score_in [n_pos], score_out [n_neg]), mu_t = Phi^-1(1 - FPR_hi) - Phi^-1(FNR_hi) with FPR_hi, FNR_hi the
    Clopper-Pearson upper bounds, each **one-sided at** ``alpha`` (their ``proportion_ci`` at confidence
    1 - 2 alpha), and the eps that mu-GDP gives at ``delta``; returns the largest, with its threshold and
    counts.

    **Not a held-out bound**: the threshold is chosen on the same models it is counted on, and the max over
    thresholds is not corrected for, so its confidence is below 1 - 2 alpha. mlaudit's own figures
    (:func:`mlaudit.audit.game.distinguish`, :func:`gdp_estimate`) choose the threshold on half of the models
    and count errors on the other half."""
    s_in, s_out = np.asarray(score_in, float), np.asarray(score_out, float)
    cands = threshold_candidates(s_in, s_out)
    fps, fns = threshold_errors(cands, s_in, s_out)
    best: dict[str, float | int] = {"mu_lower": 0.0, "eps_lower_from_mu": 0.0, "threshold": math.inf,
                                    "fp": int(s_out.size), "fn": 0}
    for t, fp, fn in zip(cands.tolist(), fps.tolist(), fns.tolist()):
        mu = mu_lower_bound(int(fp), int(fn), s_out.size, s_in.size, alpha=2.0 * alpha)
        if mu > best["mu_lower"]:
            best = {"mu_lower": mu, "eps_lower_from_mu": eps_from_mu(mu, delta), "threshold": float(t),
                    "fp": int(fp), "fn": int(fn)}
    return {**best, "n_neg": int(s_out.size), "n_pos": int(s_in.size), "alpha_one_sided": float(alpha),
            "delta": float(delta)}
