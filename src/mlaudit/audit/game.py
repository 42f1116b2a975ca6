"""The distinguishing game of a DP audit: M models trained on D' (side "in") and M on D (side
"out") are scored on the canary; each side is split at random into a selection half and a test half;
the threshold on the score is chosen on the selection halves, and the false positives / negatives on
the test halves give eps_LB by :func:`mlaudit.stats.eps_lower_bound` (Clopper-Pearson at level
alpha = 1 - confidence)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..stats import eps_lower_bound

MIN_USEFUL_EPS = 0.01
"""A best-case lower bound below this is "no bound": the audit is refused as too small."""


def best_possible_bound(models_per_side: int, *, delta: float, confidence: float,
                        models_out: int | None = None) -> float:
    """eps_LB of a perfect attack (no errors) on the test half of ``models_per_side`` models per side
    (``models_out``: a different count of "out" models, e.g. after failed ones were dropped)."""
    n_in = models_per_side - models_per_side // 2
    n_out = n_in if models_out is None else models_out - models_out // 2
    return eps_lower_bound(0, 0, n_out, n_in, delta=delta, alpha=1.0 - confidence)


def models_needed(*, delta: float, confidence: float, at_least: float = MIN_USEFUL_EPS) -> int:
    """Fewest models per side for which a perfect attack gives eps_LB >= ``at_least``."""
    for m in range(2, 1_000_000):
        if best_possible_bound(m, delta=delta, confidence=confidence) >= at_least:
            return m
    return 1_000_000


@dataclass(frozen=True)
class Distinguisher:
    """Outcome of the distinguishing test. "in" = predicted trained on D'; a model is predicted "in"
    when its canary score (loss, or white-box update) is <= ``threshold``. Counts are on the
    held-out halves."""

    threshold: float
    fp: int
    fn: int
    n_neg: int
    n_pos: int
    epsilon_lower_bound: float
    selection_bound: float

    @property
    def accuracy(self) -> float:
        return 1.0 - (self.fp + self.fn) / (self.n_neg + self.n_pos)


def threshold_errors(thresholds: np.ndarray, score_in: np.ndarray, score_out: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """False positives #(score_out <= t) and false negatives #(score_in > t) at every threshold t
    [T] (int64 [T] each), from one sort per side and a binary search per threshold: O((n + T) log n).
    The same counts as the comparisons, NaN included (a NaN score or threshold compares false)."""
    out, inn = np.sort(score_out), np.sort(score_in)  # NaNs sort last, after +inf
    n_in = int(np.count_nonzero(~np.isnan(inn)))
    nan_t = np.isnan(thresholds)
    fp = np.where(nan_t, 0, np.searchsorted(out, thresholds, side="right"))
    fn = np.where(nan_t, 0, n_in - np.searchsorted(inn, thresholds, side="right"))
    return fp.astype(np.int64), fn.astype(np.int64)


def threshold_candidates(score_in: np.ndarray, score_out: np.ndarray) -> np.ndarray:
    """Every distinct split of the scores: -inf, the midpoints between consecutive distinct scores of both
    sides, and +inf ([T], increasing)."""
    vals = np.unique(np.concatenate([score_in, score_out]))
    return np.concatenate([[-math.inf], (vals[1:] + vals[:-1]) / 2 if vals.size > 1 else [], [math.inf]])


def _best_threshold(score_in: np.ndarray, score_out: np.ndarray, *, delta: float, alpha: float
                    ) -> tuple[float, float]:
    """Threshold on the canary score maximising (eps_LB, accuracy) on the selection half: the
    smallest such among :func:`threshold_candidates`. Returns (threshold, eps_LB at it). One sorted
    sweep for the error counts (:func:`threshold_errors`), then one
    :func:`~mlaudit.stats.eps_lower_bound` per candidate."""
    cands = threshold_candidates(score_in, score_out)
    fps, fns = threshold_errors(cands, score_in, score_out)
    best = (-1.0, -1.0, math.inf)
    for t, fp, fn in zip(cands.tolist(), fps.tolist(), fns.tolist()):
        b = eps_lower_bound(fp, fn, score_out.size, score_in.size, delta=delta, alpha=alpha)
        acc = 1.0 - (fp + fn) / (score_in.size + score_out.size)
        if (b, acc) > best[:2]:
            best = (b, acc, float(t))
    return best[2], best[0]


def distinguish(loss_in: np.ndarray, loss_out: np.ndarray, *, delta: float, confidence: float,
                seed: int) -> Distinguisher:
    """Split each side's canary scores [M] at random (``seed``) into a selection half (floor(M/2)
    models) and a test half; pick the threshold on the selection half and count errors on the
    test half; eps_LB by :func:`mlaudit.stats.eps_lower_bound` at level alpha = 1 - confidence."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x534C4354]))
    a_in, a_out = rng.permutation(np.asarray(loss_in, float)), rng.permutation(np.asarray(loss_out, float))
    h_in, h_out = a_in.size // 2, a_out.size // 2
    alpha = 1.0 - confidence
    t, sel = _best_threshold(a_in[:h_in], a_out[:h_out], delta=delta, alpha=alpha)
    test_in, test_out = a_in[h_in:], a_out[h_out:]
    fp, fn = int((test_out <= t).sum()), int((test_in > t).sum())
    lb = eps_lower_bound(fp, fn, test_out.size, test_in.size, delta=delta, alpha=alpha)
    return Distinguisher(t, fp, fn, test_out.size, test_in.size, lb, sel)
