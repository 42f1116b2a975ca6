"""One-run DP auditing statistics (Steinke, Nasr & Jagielski 2023; mlaudit.audit.one_run): the p-value
is the binomial tail at delta = 0 and monotone in eps, the bound has the closed form logit(beta^(1/r))
when every guess is right, is 0 at chance, never exceeds the true eps of a simulated eps-DP randomized
response in more than about beta of seeded trials and approaches it as m grows; invariants by
hypothesis; guesses, counts and the Bonferroni-corrected sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit
from scipy.stats import binom

from mlaudit.audit.one_run import (
    audit,
    best_reachable_bound,
    count_correct,
    default_choices,
    draw_inclusion,
    epsilon_lower_bound,
    guesses,
    p_value,
)


@pytest.mark.parametrize(("r", "v", "eps"), [(10, 7, 0.5), (100, 60, 0.0), (1000, 731, 1.0), (50, 0, 2.0), (7, 7, 3.0)])
def test_p_value_at_delta_zero_is_the_binomial_tail(r: int, v: int, eps: float) -> None:
    q = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(m=r, r=r, v=v, epsilon=eps, delta=0.0) == pytest.approx(float(binom.sf(v - 1, r, q)), rel=1e-12)


def test_p_value_delta_term_by_direct_sum() -> None:
    """The delta term, 2 m delta max_i P[v > B >= v - i] / i, summed term by term."""
    m, r, v, eps, delta = 500, 80, 55, 0.7, 1e-4
    q = float(expit(eps))
    extra = max(sum(binom.pmf(j, r, q) for j in range(v - i, v)) / i for i in range(1, v + 1))
    want = float(binom.sf(v - 1, r, q)) + 2 * m * delta * extra
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize(("m", "r", "v", "delta"), [(1000, 200, 150, 1e-5), (100, 100, 90, 5e-3), (40, 40, 40, 1e-2)])
def test_p_value_is_monotone_in_eps(m: int, r: int, v: int, delta: float) -> None:
    ps = [p_value(m=m, r=r, v=v, epsilon=e, delta=delta) for e in np.linspace(0, 12, 400)]
    assert all(b >= a - 1e-15 for a, b in zip(ps, ps[1:]))
    assert ps[-1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("r", [5, 20, 100, 1000])
def test_all_correct_closed_form(r: int) -> None:
    """delta = 0, v = r: p = q^r, so eps_LB = logit(beta^(1/r))."""
    want = float(logit(0.05 ** (1 / r)))
    assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0, confidence=0.95) == pytest.approx(want, abs=1e-5)
    assert best_reachable_bound(m=r, r=r, delta=0.0, confidence=0.95) == pytest.approx(want, abs=1e-5)
    # delta > 0 only lowers it
    assert best_reachable_bound(m=10 * r, r=r, delta=1e-5, confidence=0.95) <= want + 1e-6


@pytest.mark.parametrize(("r", "v"), [(1, 0), (1, 1), (10, 5), (101, 50), (1000, 500), (1000, 0)])
def test_bound_is_zero_at_chance(r: int, v: int) -> None:
    assert epsilon_lower_bound(m=r, r=r, v=v, delta=1e-5 if r > 1 else 0.0, confidence=0.95) == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(m=10, r=11, v=1, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="2 m delta"):
        epsilon_lower_bound(m=100_000, r=10, v=10, delta=1e-5, confidence=0.95)
    for c in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            epsilon_lower_bound(m=10, r=10, v=10, delta=0.0, confidence=c)
    with pytest.raises(ValueError, match="k_pos"):
        guesses(np.zeros(5), k_pos=3, k_neg=3)


def _randomized_response(eps: float, included: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An eps-DP mechanism in each canary's bit: it reports each bit, flipped with probability 1/(1+e^eps);
    the auditor's membership score is that report plus a tie-breaking jitter independent of the bits."""
    s = np.where(included, 1.0, -1.0)
    flip = rng.random(s.shape) < 1.0 / (1.0 + math.exp(eps))
    return np.where(flip, -s, s) + 0.01 * rng.random(s.shape)


def test_randomized_response_never_beats_its_eps_beyond_beta() -> None:
    """1000 seeded audits of eps = 1 randomized response on m = 200 canaries (all guessed): the 95% bound
    exceeds the true eps in at most 5% of them, plus 3 binomial standard errors (a statistical test; the
    fraction is 0.023 with these seeds)."""
    eps, m, trials, beta = 1.0, 200, 1000, 0.05
    rng = np.random.default_rng(20231)
    above = 0
    for _ in range(trials):
        inc = rng.random(m) < 0.5
        t = guesses(_randomized_response(eps, inc, rng), k_pos=m // 2, k_neg=m // 2)
        r, v = count_correct(t, inc)
        above += epsilon_lower_bound(m=m, r=r, v=v, delta=0.0, confidence=1 - beta, tol=1e-4) > eps
    assert above / trials <= beta + 3 * math.sqrt(beta * (1 - beta) / trials), above


def test_randomized_response_bound_approaches_eps_as_m_grows() -> None:
    """Median bound (9 seeds) of eps = 1 randomized response with every canary guessed: it rises with m
    and is within 0.05 of the truth at m = 100000, while staying below it (medians 0.56, 0.85, 0.95, 0.99
    for m = 100, 1000, 10000, 100000)."""
    eps, rng = 1.0, np.random.default_rng(7)
    medians = []
    for m in (100, 1000, 10_000, 100_000):
        bounds = []
        for _ in range(9):
            inc = rng.random(m) < 0.5
            r, v = count_correct(guesses(_randomized_response(eps, inc, rng), k_pos=m // 2, k_neg=m - m // 2), inc)
            bounds.append(epsilon_lower_bound(m=m, r=r, v=v, delta=1e-6, confidence=0.95, tol=1e-4))
        medians.append(float(np.median(bounds)))
    assert medians == sorted(medians), medians
    assert eps - 0.05 < medians[-1] < eps, medians


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 400), data=st.data(), delta=st.sampled_from([0.0, 1e-6, 1e-4]),
       confidence=st.sampled_from([0.5, 0.9, 0.95, 0.999]))
def test_bound_is_non_negative_and_non_decreasing_in_v(r: int, data: st.DataObject, delta: float,
                                                       confidence: float) -> None:
    m = data.draw(st.integers(r, 2000))
    v1 = data.draw(st.integers(0, r))
    v2 = data.draw(st.integers(v1, r))
    b1 = epsilon_lower_bound(m=m, r=r, v=v1, delta=delta, confidence=confidence, tol=1e-5)
    b2 = epsilon_lower_bound(m=m, r=r, v=v2, delta=delta, confidence=confidence, tol=1e-5)
    assert 0.0 <= b1 <= b2 + 2e-5
    assert b2 <= best_reachable_bound(m=m, r=r, delta=delta, confidence=confidence) + 2e-5


def test_guesses_and_counts() -> None:
    s = np.array([0.5, 3.0, np.nan, -1.0, 2.0, 2.0, -4.0])
    t = guesses(s, k_pos=2, k_neg=2)
    # the two highest (3.0; the tie at 2.0 goes to the lower index 4), the two lowest; NaN never guessed
    assert t.tolist() == [0, 1, 0, -1, 1, 0, -1]
    inc = np.array([True, True, False, False, False, True, True])
    assert count_correct(t, inc) == (4, 2)
    # fewer numbers than guesses: "in" first, then what is left for "out"
    assert guesses(np.array([1.0, np.nan, 0.0]), k_pos=1, k_neg=2).tolist() == [1, 0, -1]


def test_inclusion_bits_are_seeded_per_run() -> None:
    a, b = draw_inclusion(1000, seed=3, run=0), draw_inclusion(1000, seed=3, run=1)
    assert a.dtype == bool and (a == draw_inclusion(1000, seed=3, run=0)).all() and (a != b).any()
    assert 400 < a.sum() < 600


def test_default_choices() -> None:
    assert default_choices(1000) == ((500, 500), (250, 250), (125, 125), (62, 62), (31, 31), (16, 16), (8, 8))
    assert default_choices(5) == ((3, 2),) and default_choices(1) == ((1, 0),)
    assert all(k >= 4 for k, _ in default_choices(40))


def test_audit_pools_runs_and_corrects_for_the_sweep() -> None:
    """Perfect scores on 2 runs of 50 canaries: each choice's bound is the all-correct bound at level
    1 - beta / 3 on 100 canaries; the audit reports the largest (the most guesses)."""
    inc = np.stack([draw_inclusion(50, seed=0, run=j) for j in range(2)])
    scores = np.where(inc, 1.0, -1.0) + np.arange(50) * 1e-6
    choices = ((25, 25), (10, 10), (4, 4))
    res = audit(scores, inc, choices=choices, delta=1e-5, confidence=0.95)
    assert res.m == 100 and res.runs == 2 and res.level == pytest.approx(1 - 0.05 / 3)
    assert len(res.rows) == 3 and res.rows[2].v == res.rows[2].r == 16
    for g in res.rows:
        assert g.bound == pytest.approx(epsilon_lower_bound(m=100, r=g.r, v=g.v, delta=1e-5, confidence=res.level))
    assert res.epsilon_lower_bound == max(g.bound for g in res.rows) > 0
    assert res.rows[0].r == 100  # (25, 25) guesses every canary of both runs
    single = audit(scores, inc, choices=((10, 10),), delta=1e-5, confidence=0.95)
    assert single.epsilon_lower_bound > res.rows[1].bound  # no Bonferroni price for one choice


# ------------------------------------------------------------------ f-DP in one run (Mahloujifar et al.)
def test_gaussian_mu_is_the_calibrated_gaussian_mechanism() -> None:
    from mlaudit.audit.gdp import delta_from_mu, gaussian_mu

    for eps, delta in [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-3)]:
        mu = gaussian_mu(eps, delta)
        assert delta_from_mu(eps, mu) == pytest.approx(delta, rel=1e-6)
        assert delta_from_mu(eps, mu * 1.01) > delta  # the largest such mu
    assert gaussian_mu(1.0, 1e-5) < gaussian_mu(2.0, 1e-5)  # more epsilon, less noise
    with pytest.raises(ValueError):
        gaussian_mu(1.0, 0.0)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(200, 20_000), r=st.integers(10, 200), data=st.data())
def test_fdp_bound_is_monotone_in_correct_guesses_and_zero_at_chance(m: int, r: int, data: st.DataObject) -> None:
    from mlaudit.audit.one_run import fdp_epsilon_lower_bound

    r = min(r, m)
    v = data.draw(st.integers(r // 2, r))
    b = fdp_epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5, confidence=0.95)
    if v < r:
        assert fdp_epsilon_lower_bound(m=m, r=r, v=v + 1, delta=1e-5, confidence=0.95) >= b - 1e-5
    assert fdp_epsilon_lower_bound(m=m, r=r, v=r // 2, delta=1e-5, confidence=0.95) == 0.0  # chance accuracy


def test_fdp_bound_is_tighter_than_the_epsilon_delta_bound_on_strong_audits() -> None:
    """Mahloujifar et al.'s point: judged against the Gaussian trade-off curve, the same guesses give a
    larger epsilon than Steinke et al.'s (eps, delta) bound (values cross-checked against jax_privacy in
    benchmarks/audit_cross_check.py)."""
    from mlaudit.audit.one_run import fdp_epsilon_lower_bound

    for m, r, v in [(1000, 100, 95), (10_000, 500, 480), (1000, 50, 50)]:
        fdp = fdp_epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5, confidence=0.95)
        plain = epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5, confidence=0.95)
        assert fdp > plain > 0, (m, r, v, fdp, plain)


def test_the_audit_reports_the_fdp_bound_for_one_sided_choices() -> None:
    rng = np.random.default_rng(0)
    inc = rng.random((1, 2000)) < 0.5
    scores = inc * 3.0 + rng.normal(size=inc.shape)
    res = audit(scores, inc, choices=[(50, 0), (50, 50)], delta=1e-5, confidence=0.95)
    assert res.rows[0].fdp_bound is not None and res.rows[1].fdp_bound is None  # two-sided: not defined here
    assert res.fdp_epsilon_lower_bound == res.rows[0].fdp_bound > 0
    assert audit(scores, inc, choices=[(50, 0)], delta=0.0, confidence=0.95).fdp_epsilon_lower_bound is None
