"""Memorization and influence estimated from a pool of models (Feldman & Zhang 2020, "What Neural
Networks Memorize and Why"; seed 004).

With ``correct`` [M, N] (model m classifies example n right) and ``keep`` [M, N] (model m trained
on example n),

    infl(i, j) = P[h(x_j) = y_j | i in S] - P[h(x_j) = y_j | i not in S]      (means over IN / OUT models)
    mem(i)     = infl(i, i)                                                    (self-influence)

Each estimate averages k IN and M - k OUT models, so its standard error is up to
``sqrt(0.25 / k + 0.25 / (M - k))`` (:func:`max_standard_error`); small pools give coarse values.
"""

from __future__ import annotations

import math

from torch import Tensor


def self_influence(correct: Tensor, keep: Tensor) -> Tensor:
    """mem(i) float64 [N] from ``correct`` bool [M, N] and ``keep`` bool [M, N] (module docstring);
    NaN where an example has no IN or no OUT model."""
    c, k = correct.double(), keep.double()
    p_in = (c * k).sum(0) / k.sum(0)
    p_out = (c * (1 - k)).sum(0) / (1 - k).sum(0)
    return p_in - p_out


def influence(keep: Tensor, correct_test: Tensor) -> Tensor:
    """infl(i, j) float32 [N, N_test] of pool example i on test example j: ``keep`` bool [M, N],
    ``correct_test`` bool [M, N_test] (module docstring)."""
    k, c = keep.double(), correct_test.double()
    p_in = (k.T @ c) / k.sum(0).unsqueeze(1)
    p_out = ((1 - k).T @ c) / (1 - k).sum(0).unsqueeze(1)
    return (p_in - p_out).float()


def max_standard_error(in_models: int, models: int) -> float:
    """Largest standard error of a mem or infl estimate from ``in_models`` IN and ``models -
    in_models`` OUT models: that of a difference of two means of 0/1 values (variance <= 1/4)."""
    return float(math.sqrt(0.25 / in_models + 0.25 / (models - in_models)))


def mean_member_score(scores: Tensor, keep: Tensor) -> Tensor:
    """Mean attack score [N] of each example over the models that hold it: ``scores`` [M, N],
    ``keep`` bool [M, N]."""
    return (scores * keep).sum(0) / keep.sum(0)
