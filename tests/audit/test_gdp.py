"""Gaussian-DP estimates (mlaudit.audit.gdp; Nasr et al. 2023, Dong, Roth & Su 2019) and their wiring into
the dp-audit kind."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.stats import norm

from mlaudit.audit.game import threshold_errors
from mlaudit.audit.gdp import (
    delta_from_mu,
    dpsgd_mu_clt,
    eps_from_mu,
    gdp_best_threshold,
    gdp_estimate,
    mu_from_rates,
    mu_lower_bound,
    mu_point,
)
from mlaudit.config import load_yaml
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dp_audit.yaml"


def _delta_by_integral(eps: float, mu: float) -> float:
    """delta(eps) = int max(0, p(x) - e^eps q(x)) dx with P = N(mu, 1), Q = N(0, 1): the hockey-stick
    divergence, integrated numerically (nonzero only right of x* where p / q = e^eps)."""
    x_star = eps / mu + mu / 2  # mu x - mu^2 / 2 = eps
    val, _ = integrate.quad(lambda x: norm.pdf(x, mu) - math.exp(eps) * norm.pdf(x), x_star, np.inf,
                            epsabs=1e-14, epsrel=1e-12)
    return val


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 3.0, 8.0])
def test_delta_formula_matches_hockey_stick_integral(mu: float, eps: float) -> None:
    assert delta_from_mu(eps, mu) == pytest.approx(_delta_by_integral(eps, mu), rel=1e-7, abs=1e-13)


def test_delta_known_values() -> None:
    assert delta_from_mu(0.0, 1.0) == pytest.approx(2 * norm.cdf(0.5) - 1)  # delta(0) = TV distance
    assert delta_from_mu(1.0, 0.0) == 0.0
    assert delta_from_mu(1e4, 1.0) == 0.0  # no overflow
    d = [delta_from_mu(e, 1.5) for e in np.linspace(0, 10, 50)]
    assert all(a >= b for a, b in zip(d, d[1:]))


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_eps_from_mu_round_trips(mu: float, delta: float) -> None:
    eps = eps_from_mu(mu, delta)
    if eps == 0.0:
        assert delta_from_mu(0.0, mu) <= delta
    else:
        assert delta_from_mu(eps, mu) == pytest.approx(delta, rel=1e-6)
    # about 4.38 at mu = 1, delta = 1e-5 (the GDP literature's conversion)
    assert eps_from_mu(1.0, 1e-5) == pytest.approx(4.377, abs=2e-3)
    assert eps_from_mu(0.0, delta) == 0.0 and eps_from_mu(math.inf, delta) == math.inf
    assert eps_from_mu(mu, delta) <= eps_from_mu(mu * 1.1, delta)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("t", [-1.0, 0.0, 0.4, 1.7, 3.0])
def test_exact_gaussian_test_recovers_mu(mu: float, t: float) -> None:
    # in-scores N(0, 1), out-scores N(mu, 1), "in" when score <= t (the game's convention)
    fpr, fnr = norm.cdf(t - mu), norm.sf(t)
    assert mu_from_rates(fpr, fnr) == pytest.approx(mu, abs=1e-9)
    assert mu_from_rates(fnr, fpr) == pytest.approx(mu, abs=1e-9)  # symmetric


def test_lower_bound_covers_true_mu() -> None:
    """Seeded simulated audits: 500 Gaussian scores per side (in N(0, 1), out N(mu, 1)), the threshold fixed
    in advance; mu_lower <= mu in >= 95% of them. 400 audits: the coverage of a valid (conservative) 95%
    bound is >= 95%, and we fail only below 92% (3 binomial SE ~ 3.3 points under 95%: a chance failure
    has probability < 0.2% even at exactly 95%). The bound is conservative (two Clopper-Pearson bounds),
    so the coverage measured is near 100%."""
    rng = np.random.default_rng(1234)
    mu, n, reps = 1.0, 500, 400
    cover = 0
    for _ in range(reps):
        s_in, s_out = rng.normal(0.0, 1.0, n), rng.normal(mu, 1.0, n)
        fp, fn = threshold_errors(np.array([mu / 2]), s_in, s_out)
        lo = mu_lower_bound(int(fp[0]), int(fn[0]), n, n, alpha=0.05)
        cover += lo <= mu
        assert 0.0 <= lo <= mu_point(int(fp[0]), int(fn[0]), n, n)
    assert cover / reps >= 0.92, cover


def test_lower_bound_monotone_in_errors() -> None:
    n = 200
    prev = math.inf
    for k in range(0, 120, 5):  # more errors on either side -> smaller (or equal) bound
        lo = mu_lower_bound(k, 10, n, n)
        assert lo <= prev
        assert mu_lower_bound(10, k, n, n) == pytest.approx(lo)  # symmetric
        prev = lo
    assert mu_lower_bound(100, 100, n, n) == 0.0  # chance
    assert mu_lower_bound(n, n, n, n) == 0.0 and mu_point(n, n, n, n) == 0.0  # worse than chance: clamped
    # more models with the same error rates -> a larger bound
    assert mu_lower_bound(10, 20, 100, 100) < mu_lower_bound(100, 200, 1000, 1000)


def test_gdp_estimate_and_clt() -> None:
    g = gdp_estimate(1, 4, 250, 250, delta=1e-5, confidence=0.95, threshold=0.3)
    assert 0 < g.mu_lower <= g.mu_point
    assert g.eps_lower_from_mu == pytest.approx(eps_from_mu(g.mu_lower, 1e-5))
    assert g.to_dict()["threshold"] == 0.3 and g.fpr == 1 / 250
    # CLT: q sqrt(T (e^(1/sigma^2) - 1)); one full-batch step of the Gaussian mechanism is exactly 1/sigma-GDP
    assert dpsgd_mu_clt(sample_rate=1.0, steps=1, noise_multiplier=2.0) == pytest.approx(math.sqrt(math.expm1(0.25)))
    assert dpsgd_mu_clt(sample_rate=0.01, steps=10_000, noise_multiplier=1.0) == pytest.approx(
        0.01 * math.sqrt(1e4 * (math.e - 1)))
    with pytest.raises(ConfigError):
        dpsgd_mu_clt(sample_rate=0.0, steps=1, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        eps_from_mu(1.0, 0.0)


def test_dp_audit_example_reports_gdp(tmp_path: Path) -> None:
    cfg = load_yaml(EXAMPLE)
    run = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    res = run.results
    m = res["metrics"]
    g = m["gdp"]
    for k in ("mu_point", "mu_lower", "eps_lower_from_mu", "threshold", "fp", "fn", "fpr", "fnr", "n_neg", "n_pos",
              "delta", "confidence", "accountant_mu_clt", "eps_from_accountant_mu_clt", "steps"):
        assert k in g, k
    assert 0.0 <= g["mu_lower"] <= g["mu_point"]
    # the same held-out counts and threshold as the (eps, delta) bound
    assert (g["fp"], g["fn"], g["n_neg"], g["n_pos"], g["threshold"]) == (m["fp"], m["fn"], m["n_neg"], m["n_pos"],
                                                                        m["threshold"])
    assert g["delta"] == m["delta"]
    assert g["accountant_mu_clt"] > 0
    assert "Gaussian-DP: mu &gt;= " in (run.out_dir / "report.html").read_text()  # the report's note


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-6, 6), min_size=1, max_size=25), st.lists(st.integers(-6, 6), min_size=1, max_size=25))
def test_best_threshold_estimator_is_the_max_over_thresholds(s_in: list[int], s_out: list[int]) -> None:
    """Annamalai & De Cristofaro's estimator: the largest mu (one-sided Clopper-Pearson at alpha per rate) over
    every threshold, counted on all models; checked against a loop over every integer cut."""
    a_in, a_out = np.array(s_in, float), np.array(s_out, float)
    got = gdp_best_threshold(a_in, a_out, delta=1e-5, alpha=0.05)
    want = max(mu_lower_bound(int((a_out <= t).sum()), int((a_in > t).sum()), a_out.size, a_in.size, alpha=0.1)
               for t in np.arange(-7.5, 7.0, 1.0))
    assert got["mu_lower"] == pytest.approx(want, abs=1e-12)
    assert got["eps_lower_from_mu"] == pytest.approx(eps_from_mu(want, 1e-5), abs=1e-9)
    if got["mu_lower"] > 0:  # the reported counts are those of the reported threshold
        t = got["threshold"]
        assert (got["fp"], got["fn"]) == (int((a_out <= t).sum()), int((a_in > t).sum()))


def test_best_threshold_estimator_perfect_separation() -> None:
    """100 models per side, perfectly separated: FPR_hi = FNR_hi = 1 - 0.05^(1/100) (one-sided CP), so
    mu = 2 Phi^-1(0.05^(1/100)); at least the held-out estimate of the same scores (half the models)."""
    s_in, s_out = np.arange(100.0), np.arange(100.0) + 1000
    got = gdp_best_threshold(s_in, s_out, delta=1e-5, alpha=0.05)
    hi = 1 - 0.05 ** (1 / 100)
    assert got["mu_lower"] == pytest.approx(2 * norm.isf(hi), rel=1e-6)
    assert (got["fp"], got["fn"]) == (0, 0)
    assert got["mu_lower"] > gdp_estimate(0, 0, 50, 50, delta=1e-5, confidence=0.95).mu_lower
