"""The inclusion design of a shadow-model pool (LiRA reference construction) and its sizing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.attacks.membership import inclusion_matrix, models_needed_exact, shadow_coverage


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(1, 60), keep=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_inclusion_has_exact_counts_per_example(m: int, n: int, keep: float, seed: int) -> None:
    k = int(keep * m)
    inc = inclusion_matrix(m, n, keep=keep, seed=seed)
    assert inc.dtype == torch.bool and inc.shape == (m, n)
    assert torch.equal(inc.sum(0), torch.full((n,), k))
    assert torch.equal(inc, inclusion_matrix(m, n, keep=keep, seed=seed))


def test_inclusion_is_random_per_example_and_seed() -> None:
    a, b = inclusion_matrix(16, 500, keep=0.5, seed=0), inclusion_matrix(16, 500, keep=0.5, seed=1)
    assert not torch.equal(a, b)
    assert abs(float(a.float().mean(1).min()) - 0.5) < 0.1  # every model holds about half of the pool
    assert len({tuple(c) for c in a.T.tolist()}) > 450  # columns are distinct subsets, not one pattern


def test_models_needed_matches_the_exact_count_design() -> None:
    assert models_needed_exact(0.5, 1, 1) == 4 and models_needed_exact(0.5, 2, 2) == 6 and models_needed_exact(0.5, 0, 1) == 3


@settings(max_examples=30, deadline=None)
@given(keep=st.floats(0.1, 0.9), r_in=st.integers(0, 4), r_out=st.integers(0, 4))
def test_models_needed_exact_gives_the_design_its_shadows(keep: float, r_in: int, r_out: int) -> None:
    m = models_needed_exact(keep, r_in, r_out)
    cov = shadow_coverage(inclusion_matrix(m, 30, keep=keep, seed=0), min_in=r_in, min_out=r_out)
    assert cov["examples_without_in"] == 0 and cov["examples_without_out"] == 0
