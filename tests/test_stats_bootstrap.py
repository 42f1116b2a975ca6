"""The batched bootstrap of :func:`mlaudit.stats.roc_metrics` against the per-resample loop it replaced
(the reference below is that loop, verbatim in substance): same point estimates, and on the CPU the
same resamples (numpy stream), hence the same intervals up to float rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit import stats
from mlaudit.stats import roc_curve, roc_metrics, tpr_at_fpr

TARGETS = (1e-5, 1e-3, 0.01, 0.1, 0.5)


def reference_boot(scores: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The loop of roc_metrics before the batched version: one numpy resample at a time."""
    s, yb, ends = stats._prepare(scores, labels)
    boot = np.full((n_boot, 2 + len(TARGETS)), np.nan)
    rng = np.random.default_rng(seed)
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, s.size, s.size), minlength=s.size)
        boot[b] = stats._roc_stats(*stats._curve(yb, ends, w), TARGETS)
    return boot


cases = st.integers(2, 80).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 9.0]), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.integers(0, 2**31 - 1),
    )
).filter(lambda c: 0 < sum(c[1]) < len(c[1]))


@settings(max_examples=60, deadline=None)
@given(cases)
def test_batched_replicates_equal_reference_loop(case: tuple[list[float], list[int], int]) -> None:
    s, y, seed = np.array(case[0]), np.array(case[1]), case[2]
    _, yb, ends = stats._prepare(s, y)
    fast = stats._bootstrap_roc_stats(yb, ends, TARGETS, n_boot=25, seed=seed, device=stats.torch.device("cpu"))
    ref = reference_boot(s, y, 25, seed)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))  # resamples without a class: NaN rows
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12, equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(cases)
def test_point_estimates_are_those_of_roc_curve(case: tuple[list[float], list[int], int]) -> None:
    s, y, seed = np.array(case[0]), np.array(case[1]), case[2]
    fpr, tpr, thr = roc_curve(s, y)
    mt = roc_metrics(s, y, fpr_targets=TARGETS, n_boot=0, seed=seed)
    for t in TARGETS:
        assert mt["tpr_at_fpr"][f"{t:g}"]["value"] == tpr_at_fpr(fpr, tpr, t)  # exactly
    assert mt["auc"]["value"] == stats.auc(fpr, tpr)
    assert mt["balanced_accuracy"]["value"] == stats.balanced_accuracy_best(fpr, tpr)


def test_intervals_equal_reference_on_a_larger_pool() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(20_000) < 0.5
    s = np.round(rng.normal(size=y.size) + 0.4 * y, 2)  # many ties
    mt = roc_metrics(s, y, fpr_targets=TARGETS, n_boot=40, seed=7)
    ref = reference_boot(s, y, 40, 7)
    keys = [("auc", None), ("balanced_accuracy", None)] + [("tpr_at_fpr", f"{t:g}") for t in TARGETS]
    for j, (k, sub) in enumerate(keys):
        e = mt[k] if sub is None else mt[k][sub]
        lo, hi = np.quantile(ref[:, j], [0.025, 0.975])
        assert e["lo"] == pytest.approx(lo, abs=1e-12) and e["hi"] == pytest.approx(hi, abs=1e-12)
        assert e["lo"] <= e["value"] <= e["hi"] or k == "tpr_at_fpr"


def test_small_memory_budget_batches_give_the_same_replicates(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.3
    s = rng.normal(size=y.size) + y
    _, yb, ends = stats._prepare(s, y)
    dev = stats.torch.device("cpu")
    big = stats._bootstrap_roc_stats(yb, ends, TARGETS, n_boot=9, seed=1, device=dev)
    monkeypatch.setitem(stats.BOOT_MEMORY_BYTES, "cpu", 1)  # one replicate per batch
    np.testing.assert_array_equal(stats._bootstrap_roc_stats(yb, ends, TARGETS, n_boot=9, seed=1, device=dev), big)


@pytest.mark.skipif(not stats.torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bootstrap_is_consistent_with_cpu() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200_000) < 0.5
    s = rng.normal(size=y.size) + 0.5 * y
    cpu = roc_metrics(s, y, n_boot=200, seed=0)
    gpu = roc_metrics(s, y, n_boot=200, seed=0, device="cuda")
    assert gpu["auc"]["value"] == cpu["auc"]["value"]
    width = cpu["auc"]["hi"] - cpu["auc"]["lo"]
    assert math.isclose(gpu["auc"]["lo"], cpu["auc"]["lo"], abs_tol=0.3 * width)
    assert math.isclose(gpu["auc"]["hi"], cpu["auc"]["hi"], abs_tol=0.3 * width)
