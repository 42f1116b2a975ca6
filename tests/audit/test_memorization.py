"""Memorization and influence estimates (Feldman & Zhang 2020) from a pool's inclusion and correctness."""

from __future__ import annotations

import math

import torch

from mlaudit.audit.memorization import influence, max_standard_error, mean_member_score, self_influence


def test_self_influence_and_influence_by_hand() -> None:
    keep = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    correct = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    # example 0: IN models 0,1 both right; OUT models 2,3: 1 of 2 -> 1 - 0.5; example 1: IN 1,2: 0.5, OUT 0,3: 0.5
    assert torch.allclose(self_influence(correct, keep), torch.tensor([0.5, 0.0], dtype=torch.float64))
    infl = influence(keep, correct)
    assert infl.shape == (2, 2) and torch.allclose(infl.diagonal().double(), self_influence(correct, keep))
    assert abs(float(infl[0, 1]) - (0.5 - 0.5)) < 1e-6 and abs(float(infl[1, 0]) - (0.5 - 1.0)) < 1e-6


def test_self_influence_is_nan_without_in_or_out_models() -> None:
    keep = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    mem = self_influence(torch.ones(2, 2, dtype=torch.bool), keep)
    assert math.isnan(float(mem[0])) and float(mem[1]) == 0.0


def test_standard_error_and_member_score() -> None:
    assert max_standard_error(8, 16) == math.sqrt(0.25 / 8 + 0.25 / 8)
    keep = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    scores = torch.tensor([[1.0, 5.0], [3.0, 2.0], [7.0, 4.0]], dtype=torch.float64)
    assert torch.equal(mean_member_score(scores, keep), torch.tensor([2.0, 3.0], dtype=torch.float64))
