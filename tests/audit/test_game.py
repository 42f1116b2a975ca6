"""The distinguishing game: models needed, the held-out split, and the sorted threshold sweep, which
must choose the very threshold and bound of the brute-force search it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.audit.game import (
    MIN_USEFUL_EPS,
    _best_threshold,
    best_possible_bound,
    distinguish,
    models_needed,
    threshold_errors,
)
from mlaudit.stats import eps_lower_bound


def brute_force_threshold(score_in: np.ndarray, score_out: np.ndarray, *, delta: float, alpha: float
                          ) -> tuple[float, float]:
    """The O(n^2) reference: count errors with comparisons at every candidate threshold."""
    vals = np.unique(np.concatenate([score_in, score_out]))
    cands = np.concatenate([[-math.inf], (vals[1:] + vals[:-1]) / 2 if vals.size > 1 else [], [math.inf]])
    best = (-1.0, -1.0, math.inf)
    for t in cands:
        fp, fn = int((score_out <= t).sum()), int((score_in > t).sum())
        b = eps_lower_bound(fp, fn, score_out.size, score_in.size, delta=delta, alpha=alpha)
        acc = 1.0 - (fp + fn) / (score_in.size + score_out.size)
        if (b, acc) > best[:2]:
            best = (b, acc, float(t))
    return best[2], best[0]


# few distinct values (ties across and within sides), shifted sides, the odd infinity or NaN
_values = st.one_of(st.integers(-5, 5).map(float), st.floats(-1e6, 1e6, allow_nan=False),
                    st.sampled_from([math.inf, -math.inf, math.nan]))
_scores = st.lists(_values, min_size=1, max_size=40).map(lambda v: np.array(v, dtype=float))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf + inf: a NaN midpoint, as before
@settings(max_examples=300, deadline=None)
@given(_scores, _scores, st.sampled_from([0.0, 1e-5, 1e-2]), st.sampled_from([0.05, 0.5]), st.floats(-3, 3))
def test_sweep_chooses_the_brute_force_threshold(score_in: np.ndarray, score_out: np.ndarray, delta: float,
                                                 alpha: float, shift: float) -> None:
    score_in = score_in + shift
    got = _best_threshold(score_in, score_out, delta=delta, alpha=alpha)
    want = brute_force_threshold(score_in, score_out, delta=delta, alpha=alpha)
    assert got == want or (math.isnan(got[0]) and math.isnan(want[0]) and got[1] == want[1])


@settings(max_examples=100, deadline=None)
@given(_scores, _scores, st.lists(_values, max_size=20))
def test_threshold_errors_count_like_comparisons(score_in: np.ndarray, score_out: np.ndarray, ts: list[float]) -> None:
    t = np.array(ts, dtype=float)
    fp, fn = threshold_errors(t, score_in, score_out)
    assert fp.tolist() == [int((score_out <= x).sum()) for x in t]
    assert fn.tolist() == [int((score_in > x).sum()) for x in t]


def test_sweep_handles_many_models() -> None:
    """50,000 models per selection half (the most models_per_side allows): one sort and 10^5 bounds,
    not 10^10 comparisons. A gap of 3 sd gives a bound of several epsilon."""
    rng = np.random.default_rng(0)
    score_in, score_out = rng.normal(0, 1, 50_000), rng.normal(3, 1, 50_000)
    t, b = _best_threshold(score_in, score_out, delta=1e-5, alpha=0.05)
    fp, fn = threshold_errors(np.array([t]), score_in, score_out)
    assert b == eps_lower_bound(int(fp[0]), int(fn[0]), 50_000, 50_000, delta=1e-5, alpha=0.05) > 2.0


@settings(max_examples=20, deadline=None)
@given(st.floats(0.5, 0.999), st.sampled_from([1e-6, 1e-5, 1e-3]))
def test_models_needed_is_the_smallest(confidence: float, delta: float) -> None:
    need = models_needed(delta=delta, confidence=confidence)
    assert best_possible_bound(need, delta=delta, confidence=confidence) >= MIN_USEFUL_EPS
    assert need == 2 or best_possible_bound(need - 1, delta=delta, confidence=confidence) < MIN_USEFUL_EPS


def test_distinguish_separated_and_identical() -> None:
    rng = np.random.default_rng(0)
    sep = distinguish(rng.uniform(0, 1, 30), rng.uniform(2, 3, 30), delta=1e-5, confidence=0.95, seed=1)
    assert (sep.fp, sep.fn, sep.n_neg, sep.n_pos) == (0, 0, 15, 15)
    assert 1 < sep.threshold < 2
    assert sep.epsilon_lower_bound == pytest.approx(best_possible_bound(30, delta=1e-5, confidence=0.95))
    same = distinguish(rng.normal(size=200), rng.normal(size=200), delta=1e-5, confidence=0.95, seed=1)
    assert same.epsilon_lower_bound < 0.5
    flipped = distinguish(rng.uniform(2, 3, 30), rng.uniform(0, 1, 30), delta=1e-5, confidence=0.95, seed=1)
    assert flipped.epsilon_lower_bound == 0.0  # only low loss says "in": a reversed gap gives no bound
