"""One-run DP auditing: the statistics of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv 2305.08846), as pure functions.

**The audit.** m canaries; canary i is in the training data iff S_i = +1, with S uniform on
{-1, +1}^m (each canary included independently with probability 1/2, the rest of the data fixed).
Training runs once. The auditor scores every canary on the output and guesses T_i in {-1, 0, +1}:
+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 (abstain) for the others:
r = k+ + k- guesses, of which W = #{i : T_i = S_i} are correct (:func:`guesses`, :func:`count_correct`).

**The theorem** (the paper's main result, cited here as its Theorem 3.1 with the approximate-DP
(delta > 0) correction; the paper's text could not be re-read where this was written, see
docs/dp_audit.md for how the formula was checked). If training is (eps, delta)-DP with respect to
adding or removing any one canary, then for every v

    P[W >= v] <= P[B >= v] + 2 m delta * max_{i = 1..v} P[v > B >= v - i] / i,
    B ~ Binomial(r, q),   q = e^eps / (1 + e^eps).

At delta = 0 this says W is stochastically dominated by Binomial(r, q): no eps-DP training lets an
auditor beat eps-DP randomized response on r independent bits. Group privacy is not needed, which is
why one run suffices. The right-hand side at the observed v is the p-value of the hypothesis
"(eps, delta)-DP" (:func:`p_value`). Closed form at delta = 0 and v = r: p = q^r, so the bound below
is logit(beta^(1/r)).

**The bound** (:func:`epsilon_lower_bound`). eps_LB = inf{eps >= 0 : p(eps) > beta}, beta =
1 - confidence, found by bisection. It holds with probability >= confidence: if training is
(eps*, delta)-DP, eps_LB > eps* needs p(eps*) <= beta, which has probability <= beta. Bisection finds
that infimum because p is non-decreasing in eps whenever c = 2 m delta <= 1: the max over i is the max
of (1 - c/i) P[B >= v] + (c/i) P[B >= v - i], a non-negative mix of binomial tails, each non-decreasing
in q. A larger c is refused (such a delta lets a DP algorithm reveal a constant number of canaries
outright, so no useful bound exists anyway).

**Several (k+, k-)** (:func:`audit`). Each choice fixed in advance gives a valid bound; taking the best
of K choices is a multiple comparison, so each is computed at level beta / K (Bonferroni): the
probability that any of them exceeds the truth is <= K * beta / K.

**Several runs.** R independent runs of m canaries each are one audit of R m canaries: each
inclusion bit enters exactly one run, which is (eps, delta)-DP in it, and the other runs do not
depend on it, so the R runs together are (eps, delta)-DP in every bit and the theorem applies with m
-> R m, r and W summed. Guesses are made run by run (scores of different models need not be
comparable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom, norm

from .gdp import gaussian_mu


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m or m < 1:
        raise ValueError(f"need 0 <= v <= r <= m and m >= 1, got m={m}, r={r}, v={v}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if 2 * m * delta > 1.0:
        raise ValueError(f"2 m delta = {2 * m * delta:.3g} > 1 (m={m}, delta={delta}): the one-run p-value is "
                         "monotone in eps only for 2 m delta <= 1; use fewer canaries or a smaller delta")


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return 1.0 - confidence


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The p-value of "(epsilon, delta)-DP" after v correct of r guesses on m canaries (module docstring):
    P[B >= v] + 2 m delta max_{i=1..v} P[v > B >= v - i] / i with B ~ Binomial(r, e^eps / (1 + e^eps)),
    capped at 1. At delta = 0 it is the binomial tail P[B >= v] exactly."""
    _check(m, r, v, delta)
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    band = np.cumsum(binom.pmf(v - i, r, q))  # P[v > B >= v - i], i = 1..v
    return min(1.0, tail + 2.0 * m * delta * float(np.max(band / i)))


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float, tol: float = 1e-6) -> float:
    """eps_LB = inf{eps >= 0 : p_value(eps) > 1 - confidence} (bisection to ``tol``; the returned value
    is rejected, i.e. on the safe side). 0 when even eps = 0 is not rejected, e.g. whenever
    v <= r / 2 at confidence >= 1/2. Holds with probability >= ``confidence``."""
    beta = _check_confidence(confidence)
    _check(m, r, v, delta)

    def rejected(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) <= beta

    return _largest_rejected(rejected, tol)


def _largest_rejected(rejected: Callable[[float], bool], tol: float) -> float:
    """inf{eps >= 0 : not rejected(eps)} for a claim test that rejects small eps and accepts large ones,
    by doubling then bisection to ``tol``; the returned eps is rejected (the safe side), 0 when even
    eps = 0 is accepted."""
    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # acceptance comes for large eps (p -> 1; q rounds to 1 near eps = 37), so this ends
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def best_reachable_bound(*, m: int, r: int, delta: float, confidence: float) -> float:
    """The largest bound any auditor can show with r guesses on m canaries: all r correct (v = r)."""
    return epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=confidence)


def draw_inclusion(m: int, *, seed: int, run: int = 0) -> np.ndarray:
    """The inclusion bits [m] bool of run ``run`` (S_i = +1 <=> True): each canary in with probability 1/2,
    independently, from SeedSequence([seed, "ONE", run]); fixed by (seed, run) alone."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4F4E45, run]))
    return rng.integers(0, 2, size=m).astype(bool)


def guesses(scores: Sequence[float] | np.ndarray, *, k_pos: int, k_neg: int) -> np.ndarray:
    """The auditor's guesses T int8 [m] from membership scores [m] (high = "in"): +1 for the ``k_pos``
    highest, -1 for the ``k_neg`` lowest of the rest, 0 otherwise. Ties are broken by canary index
    (fixed before training, so the guesses stay a function of the output only); NaN scores are never
    guessed (if fewer than k_pos + k_neg scores are numbers, fewer guesses are made: r stays
    k_pos + k_neg in the bound, which only makes it more conservative)."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"scores must be one score per canary [m], got shape {s.shape}")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m = {s.size}, got {k_pos} and {k_neg}")
    valid = np.flatnonzero(~np.isnan(s))
    order = valid[np.argsort(-s[valid], kind="stable")]
    t = np.zeros(s.size, dtype=np.int8)
    t[order[:k_pos]] = 1
    rest = order[k_pos:]
    t[rest[rest.size - min(k_neg, rest.size):]] = -1
    return t


def count_correct(t: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses) of guesses ``t`` [m] in {-1, 0, +1} against inclusion bits [m] bool."""
    t, inc = np.asarray(t), np.asarray(included, dtype=bool)
    if t.shape != inc.shape:
        raise ValueError(f"guesses {t.shape} and inclusion bits {inc.shape} differ in shape")
    made = t != 0
    return int(made.sum()), int((made & (t == np.where(inc, 1, -1))).sum())


def default_choices(m: int) -> tuple[tuple[int, int], ...]:
    """The (k+, k-) pairs of a sweep over m canaries: k+ = k- = k for k = m/2, m/4, ..., m/128 (rounded,
    at least 4 each), so at most 7 choices; (ceil(m/2), floor(m/2)) when m < 8."""
    ks = sorted({int(round(m / 2 ** (j + 1))) for j in range(7)} - set(range(4)), reverse=True)
    return tuple((k, k) for k in ks) if ks else ((m - m // 2, m // 2),)


@dataclass(frozen=True)
class Guessing:
    """One (k+, k-) choice, pooled over runs: r guesses, v correct, its bound at the per-choice level
    and the bound all-correct guesses would give."""

    k_pos: int
    k_neg: int
    r: int
    v: int
    bound: float
    best_reachable: float
    fdp_bound: float | None = None
    """:func:`fdp_epsilon_lower_bound` at the same level (one-sided choices, k- = 0, and delta > 0 only)."""


@dataclass(frozen=True)
class OneRunAudit:
    """Outcome of :func:`audit`: the best choice's bound and counts, and every choice tried (``rows``).
    ``level`` is the confidence each choice was computed at (``confidence`` Bonferroni-corrected for
    ``len(rows)`` choices); ``m`` counts the canaries of all runs."""

    epsilon_lower_bound: float
    k_pos: int
    k_neg: int
    r: int
    v: int
    m: int
    runs: int
    confidence: float
    level: float
    best_reachable: float
    rows: tuple[Guessing, ...]
    fdp_epsilon_lower_bound: float | None = None
    """The largest f-DP bound over the one-sided choices (None when there is none or delta = 0). It
    rejects a stronger claim than (eps, delta)-DP, "as private as the Gaussian mechanism calibrated to
    (eps, delta)" (right for DP-SGD, whose privacy curve is close to Gaussian): it does not refute a
    mechanism that is (eps, delta)-DP but not Gaussian-like."""


def audit(scores: Sequence[Sequence[float]] | np.ndarray, included: Sequence[Sequence[bool]] | np.ndarray, *,
          choices: Sequence[tuple[int, int]], delta: float, confidence: float) -> OneRunAudit:
    """The one-run audit of R runs: ``scores`` and ``included`` [R, m] (membership scores, high = "in";
    inclusion bits). For every (k+, k-) of ``choices`` each run guesses (:func:`guesses`), the counts are
    pooled (m -> R m, see the module docstring) and the bound is computed at confidence
    1 - (1 - confidence) / len(choices); the largest of these bounds holds with probability >= ``confidence``."""
    s, inc = np.atleast_2d(np.asarray(scores, dtype=float)), np.atleast_2d(np.asarray(included, dtype=bool))
    if s.shape != inc.shape:
        raise ValueError(f"scores {s.shape} and inclusion bits {inc.shape} differ in shape")
    if not choices:
        raise ValueError("audit needs at least one (k_pos, k_neg) choice")
    runs, m = s.shape
    level = 1.0 - _check_confidence(confidence) / len(choices)
    rows = []
    for kp, kn in choices:
        v = sum(count_correct(guesses(sj, k_pos=kp, k_neg=kn), ij)[1] for sj, ij in zip(s, inc))
        r = runs * (kp + kn)
        fdp = (fdp_epsilon_lower_bound(m=runs * m, r=r, v=v, delta=delta, confidence=level)
               if kn == 0 and delta > 0 and r > 0 else None)
        rows.append(Guessing(kp, kn, r, v, epsilon_lower_bound(m=runs * m, r=r, v=v, delta=delta, confidence=level),
                             best_reachable_bound(m=runs * m, r=r, delta=delta, confidence=level), fdp))
    best = max(rows, key=lambda g: g.bound)  # the first of equal bounds
    fdps = [g.fdp_bound for g in rows if g.fdp_bound is not None]
    return OneRunAudit(best.bound, best.k_pos, best.k_neg, best.r, best.v, runs * m, runs, confidence, level,
                       max(g.best_reachable for g in rows), tuple(rows), max(fdps) if fdps else None)


# --------------------------------------------------------------------------- f-DP in one run
# Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One Run" (ICML 2025, arXiv
# 2410.22235): the same guessing game, judged against the whole trade-off curve of the claimed mechanism
# instead of its (eps, delta) corner. The claim "(eps, delta)-DP" is read as "as private as the Gaussian
# mechanism calibrated to (eps, delta)", i.e. mu-GDP with mu = :func:`~mlaudit.audit.gdp.gaussian_mu` (eps, delta); its
# trade-off curve f(x) = Phi(Phi^-1(1 - x) - mu) enters through g(x) = Phi(Phi^-1(x) - mu), the inverse
# of the curve's "blow-up". With r one-sided guesses ("in" for the r highest scores, k- = 0), v of them
# correct, and beta = 1 - confidence, the paper's recursion (its capped "audit_rh" algorithm) starts from
# the normalised masses a = beta v / m (correct) and b = beta (r - v) / m (wrong) and, for
# i = v - 1, ..., 0, raises b to max(b, g(a)) and a by i / (r - i) times that rise (capped at 1), stopping
# as soon as b no longer moves. The claim is rejected when a + b > r / m: the observed accuracy could not
# happen with probability more than beta under any mu-GDP mechanism.


def fdp_rejects(*, m: int, r: int, v: int, epsilon: float, delta: float, confidence: float) -> bool:
    """True when v correct of r one-sided guesses on m canaries reject, at ``confidence``, that training is
    as private as the Gaussian mechanism calibrated to (epsilon, delta) (see the comment above)."""
    beta = _check_confidence(confidence)
    _check(m, r, v, 0.0)
    if v == 0:
        return False
    mu = gaussian_mu(epsilon, delta)
    if math.isinf(mu):
        return False
    a, b = beta * v / m, beta * (r - v) / m
    for i in range(v - 1, -1, -1):
        b_new = max(b, float(norm.cdf(norm.ppf(a) - mu)))
        if b_new == b:
            break
        a = min(a + i / (r - i) * (b_new - b), 1.0)
        b = b_new
    return a + b > r / m


def fdp_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float, tol: float = 1e-6) -> float:
    """The largest epsilon whose Gaussian-calibrated claim :func:`fdp_rejects` rejects (bisection to
    ``tol``, on the safe side); 0 when even epsilon = 0 is not rejected. Holds with probability >=
    ``confidence``. Mahloujifar et al. report it tighter than :func:`epsilon_lower_bound` for mechanisms
    close to Gaussian (DP-SGD)."""
    def rejected(eps: float) -> bool:
        return fdp_rejects(m=m, r=r, v=v, epsilon=eps, delta=delta, confidence=confidence)

    return _largest_rejected(rejected, tol)
