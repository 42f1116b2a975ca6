from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from mlaudit.errors import ConfigError
from mlaudit.stats import (
    MeanSE,
    auc,
    balanced_accuracy_best,
    bootstrap_ci,
    clopper_pearson,
    describe,
    eps_lower_bound,
    fpr_key,
    mean_difference,
    mean_se,
    roc_curve,
    roc_metrics,
    separation,
    tpr_at_fpr,
)

# Scores drawn from a tiny alphabet so that ties are frequent.
scored_labels = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0, 7.5]), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
).filter(lambda sl: 0 < sum(sl[1]) < len(sl[1]))


@settings(max_examples=60, deadline=None)
@given(scored_labels)
def test_roc_matches_sklearn_with_ties(sl: tuple[list[float], list[int]]) -> None:
    scores, labels = sl
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf and len(thr) == len(set(scores)) + 1
    assert auc(fpr, tpr) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(scored_labels, st.floats(0, 1), st.floats(0, 1))
def test_tpr_at_fpr_monotone_and_feasible(sl: tuple[list[float], list[int]], a: float, b: float) -> None:
    fpr, tpr, _ = roc_curve(*sl)
    lo, hi = sorted((a, b))
    t_lo, t_hi = tpr_at_fpr(fpr, tpr, lo), tpr_at_fpr(fpr, tpr, hi)
    assert t_lo <= t_hi
    # The returned TPR is achieved by a point whose FPR respects the target.
    assert any(f <= lo and t == t_lo for f, t in zip(fpr, tpr, strict=True))
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_tpr_at_fpr_hand_example() -> None:
    # Sorted desc: 0.9(+) 0.8(-) 0.7(+) 0.6(-) -> fpr [0, 0, .5, .5, 1], tpr [0, .5, .5, 1, 1]
    fpr, tpr, _ = roc_curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.49) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert balanced_accuracy_best(fpr, tpr) == 0.75


def test_balanced_accuracy_matches_bruteforce() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    fpr, tpr, thr = roc_curve(s, y)
    brute = max(skm.balanced_accuracy_score(y, (s >= t).astype(int)) for t in thr[1:])
    assert balanced_accuracy_best(fpr, tpr) == pytest.approx(max(brute, 0.5))


def test_roc_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="both classes"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ConfigError, match="NaN"):
        roc_curve([0.1, float("nan")], [0, 1])
    with pytest.raises(ConfigError, match="same length"):
        roc_curve([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ConfigError, match="0/1"):
        roc_curve([0.1, 0.2], [0, 2])


def test_clopper_pearson_known_values() -> None:
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    # Reference value (e.g. R binom.test(5, 10)): [0.1870860, 0.8129140].
    lo, hi = clopper_pearson(5, 10)
    assert (lo, hi) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    lo99, hi99 = clopper_pearson(5, 10, alpha=0.01)
    assert lo99 < lo and hi99 > hi
    for bad in [(-1, 10), (11, 10), (1, 0), (1.5, 10)]:
        with pytest.raises(ConfigError):
            clopper_pearson(*bad)
    with pytest.raises(ConfigError, match="alpha"):
        clopper_pearson(1, 10, alpha=1.5)


def test_clopper_pearson_one_sided_is_the_two_sided_bound_at_twice_alpha() -> None:
    assert clopper_pearson(10, 10, alpha=0.001, one_sided=True)[0] == pytest.approx(0.001 ** (1 / 10), rel=1e-12)
    assert clopper_pearson(37, 50, alpha=0.01, one_sided=True) == pytest.approx(clopper_pearson(37, 50, alpha=0.02))
    assert clopper_pearson(3, 4, alpha=0.7, one_sided=True)[0] > clopper_pearson(3, 4, alpha=0.3, one_sided=True)[0]


def test_mean_se() -> None:
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    m1, se1 = mean_se(np.array([0.7]))
    assert m1 == 0.7 and math.isnan(se1)
    with pytest.raises(ConfigError, match="empty"):
        mean_se([])
    ms = MeanSE.of([0.91, 0.914, 0.912])
    assert ms.n == 3 and ms.to_dict() == {"mean": ms.mean, "se": ms.se, "n": 3}
    assert str(MeanSE(0.9123, 0.0041, 5)) == "0.912 ± 0.004"


def test_describe() -> None:
    d = describe(np.array([3, 1, 2, 10]))
    assert d == {**MeanSE.of([3.0, 1.0, 2.0, 10.0]).to_dict(), "min": 1.0, "median": 2.5, "max": 10.0}


def test_mean_difference_paired_and_unpaired() -> None:
    clean, poisoned = [0.9, 0.8, 0.85], [0.5, 0.6, 0.4]
    assert mean_difference(clean, poisoned) == MeanSE.of(np.subtract(clean, poisoned)).to_dict()
    d = mean_difference(clean, poisoned[:2])  # unequal counts: the difference of means, SEs in quadrature
    a, b = MeanSE.of(clean), MeanSE.of(poisoned[:2])
    assert d == {"mean": a.mean - b.mean, "se": math.hypot(a.se, b.se), "n": 2}


def test_separation() -> None:
    scores, labels = np.array([[2.0, 0.0], [3.0, 1.0]]), np.array([[1, 0], [1, 0]], dtype=bool)
    # means 2.5 and 0.5, each group's variance 0.5 on 1 degree of freedom: pooled sd sqrt(1 / 2)
    assert separation(scores, labels) == pytest.approx(2.0 / math.sqrt(0.5))
    assert separation(-scores, labels) == pytest.approx(-2.0 / math.sqrt(0.5))
    assert math.isnan(separation([1.0, 1.0, 1.0], [1, 0, 0]))  # no spread at all
    assert math.isnan(separation([1.0, 2.0], [1, 1]))  # no negatives


def test_bootstrap_ci_contains_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = rng.normal(size=2000) + 1.5 * y
    point = skm.roc_auc_score(y, s)
    lo, hi = bootstrap_ci(lambda a, b: skm.roc_auc_score(b, a), s, y, n_boot=100, seed=3)
    assert lo < point < hi and hi - lo < 0.1
    m_lo, m_hi = bootstrap_ci(np.mean, s, n_boot=200, seed=1)
    assert m_lo < s.mean() < m_hi
    assert bootstrap_ci(np.mean, s, n_boot=50, seed=7) == bootstrap_ci(np.mean, s, n_boot=50, seed=7)
    with pytest.raises(ConfigError, match="equal length"):
        bootstrap_ci(np.mean, s, y[:10])


def test_roc_metrics_structure_and_intervals() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    s = rng.normal(size=3000) + 1.0 * y
    out = roc_metrics(s, y, fpr_targets=(1e-3, 0.1), n_boot=100, seed=0)
    assert out["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, s))
    assert out["n_pos"] + out["n_neg"] == 3000
    for key in ("auc", "balanced_accuracy"):
        e = out[key]
        assert e["method"] == "bootstrap" and e["lo"] <= e["value"] <= e["hi"]
    e = out["tpr_at_fpr"][fpr_key(0.1)]
    assert e["fpr"] <= 0.1 and e["lo"] <= e["value"] <= e["hi"]
    cp = e["clopper_pearson"]
    assert cp["k"] / cp["n"] == pytest.approx(e["value"]) and cp["lo"] < e["value"] < cp["hi"]
    assert set(out["tpr_at_fpr"]) == {"0.001", "0.1"}
    # The vectorised bootstrap of AUC agrees with the generic one (same statistic, different draws).
    lo, hi = bootstrap_ci(lambda a, b: skm.roc_auc_score(b, a), s, y, n_boot=100, seed=5)
    assert out["auc"]["lo"] == pytest.approx(lo, abs=0.01) and out["auc"]["hi"] == pytest.approx(hi, abs=0.01)
    none = roc_metrics(s, y, n_boot=0)
    assert none["auc"]["method"] == "none" and math.isnan(none["auc"]["lo"])


def test_eps_lower_bound() -> None:
    # Random guessing: half wrong on each side -> no evidence of leakage.
    assert eps_lower_bound(500, 500, 1000, 1000, delta=1e-5, alpha=0.05) == 0.0
    # A perfect attack with n trials per side: eps_LB = ln((1 - delta - hi0) / hi0), hi0 = 1 - (a/2)^(1/n).
    hi0 = 1 - 0.025 ** (1 / 1000)
    assert eps_lower_bound(0, 0, 1000, 1000, delta=0.0) == pytest.approx(math.log((1 - hi0) / hi0))
    # Fewer mistakes -> larger bound; more trials at equal error rates -> larger bound.
    values = [eps_lower_bound(fp, 10, 1000, 1000, delta=1e-5) for fp in (0, 5, 20, 100, 400)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    values = [eps_lower_bound(10, fn, 1000, 1000, delta=1e-5) for fn in (0, 5, 20, 100, 400)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert eps_lower_bound(10, 10, 1000, 1000, delta=0) < eps_lower_bound(100, 100, 10000, 10000, delta=0)
    assert eps_lower_bound(10, 10, 1000, 1000, delta=0, alpha=0.01) < eps_lower_bound(
        10, 10, 1000, 1000, delta=0, alpha=0.1)
    with pytest.raises(ConfigError, match="delta"):
        eps_lower_bound(1, 1, 10, 10, delta=1.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=4, max_size=60), st.integers(0, 10_000))
def test_roc_analysis_curve_is_roc_curve(values: list[int], seed: int) -> None:
    """The curve roc_analysis returns with its metrics (one sort) is roc_curve's, ties and all."""
    from mlaudit.stats import roc_analysis

    rng = np.random.default_rng(seed)
    s = np.array(values, dtype=np.float64)
    y = rng.integers(0, 2, s.size).astype(bool)
    y[0], y[1] = True, False
    metrics, (fpr, tpr) = roc_analysis(s, y, n_boot=0)
    want = roc_curve(s, y)
    np.testing.assert_array_equal(fpr, want[0])
    np.testing.assert_array_equal(tpr, want[1])
    ref = roc_metrics(s, y, n_boot=0)
    assert metrics["auc"]["value"] == ref["auc"]["value"] and metrics["tpr_at_fpr"].keys() == ref["tpr_at_fpr"].keys()
    assert all(metrics["tpr_at_fpr"][k]["value"] == v["value"] for k, v in ref["tpr_at_fpr"].items())
