"""Randomized smoothing (Cohen et al. 2019): CERTIFY's radius and abstention follow the formula exactly on a
constant classifier (pA = 1) and match the closed form of a linear classifier (pA = Phi(margin / (sigma
||w||)), the certified radius at most the distance to the hyperplane); PREDICT abstains on a coin-flip
model; invariants of the decisions under hypothesis; bad input is a ConfigError."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm
from torch import Tensor, nn

from mlaudit.certify import (
    ABSTAIN,
    binomial_pvalue,
    certified_accuracy,
    certified_curve,
    certify,
    certify_from_counts,
    max_radius,
    min_certify_n,
    min_predict_n,
    predict,
    predict_from_counts,
    sample_counts,
)
from mlaudit.errors import ConfigError


class Constant(nn.Module):
    """Always class ``c`` of ``k`` (no parameters: it runs on x's device)."""

    def __init__(self, c: int, k: int = 4) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.c), self.k).float()


class Linear2(nn.Module):
    """Binary linear classifier: class 1 iff w.x + b > 0 (logits [0, w.x + b])."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x: Tensor) -> Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


@pytest.mark.parametrize(("n", "alpha"), [(10, 0.001), (100, 0.001), (1000, 0.05), (12345, 1e-6)])
def test_constant_classifier_follows_the_formula_exactly(n: int, alpha: float) -> None:
    x = torch.rand(3, 2, 4)
    sigma = 0.37
    cert = certify(Constant(2), x, sigma=sigma, n0=5, n=n, alpha=alpha, batch_size=64)
    assert cert.counts[:, 2].tolist() == [n] * 3 and int(cert.counts.sum()) == 3 * n
    assert cert.selection_counts[:, 2].tolist() == [5] * 3
    p_lower = alpha ** (1 / n)  # one-sided Clopper-Pearson bound with all n votes for cA
    torch.testing.assert_close(cert.pa_lower, torch.full((3,), p_lower, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(cert.radius, torch.full((3,), sigma * norm.ppf(p_lower), dtype=torch.float64),
                               rtol=1e-10, atol=0)
    assert cert.prediction.tolist() == [2] * 3 and not cert.abstained.any()
    assert float(cert.radius[0]) == pytest.approx(max_radius(sigma=sigma, n=n, alpha=alpha), rel=1e-10)


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.2, 0.5 ** 7])
def test_constant_classifier_abstains_below_the_smallest_n(alpha: float) -> None:
    m = min_certify_n(alpha)
    x = torch.zeros(2, 3)
    below = certify(Constant(1), x, sigma=1.0, n0=1, n=m - 1, alpha=alpha) if m > 2 else None
    if below is not None:
        assert below.abstained.all() and below.radius.tolist() == [0.0, 0.0]
        assert below.pa_lower[0] == pytest.approx(alpha ** (1 / (m - 1))) and float(below.pa_lower[0]) <= 0.5
    at = certify(Constant(1), x, sigma=1.0, n0=1, n=m, alpha=alpha)
    assert at.prediction.tolist() == [1, 1] and (at.radius > 0).all()
    assert max_radius(sigma=1.0, n=m - 1, alpha=alpha) == 0.0 < max_radius(sigma=1.0, n=m, alpha=alpha)


def test_linear_model_matches_the_closed_form() -> None:
    """For f(x) = 1[w.x + b > 0] the smoothed classifier votes its class with pA = Phi(|w.x + b| / (sigma ||w||)),
    and sigma * Phi^-1(pA) = |w.x + b| / ||w||, the distance to the hyperplane: the certificate is tight
    there, so CERTIFY's radius (from a lower bound on pA) must not exceed it."""
    g = torch.Generator().manual_seed(0)
    d, sigma, n, alpha, b = 12, 0.5, 20_000, 0.001, 0.1
    w = torch.randn(d, generator=g)
    model = Linear2(w, b)
    x0 = torch.randn(16, d, generator=g)
    on_plane = x0 - ((x0 @ w + b) / w.norm() ** 2)[:, None] * w
    dist = torch.cat([torch.tensor([0.005]), torch.linspace(0.05, 1.2, 15)])
    side = torch.tensor([1.0, -1.0]).repeat(8)
    x = on_plane + (side * dist)[:, None] * w / w.norm()
    margin = x @ w + b
    torch.testing.assert_close(margin.abs() / w.norm(), dist)
    p_true = torch.from_numpy(norm.cdf((dist / sigma).numpy())).double()
    cert = certify(model, x, sigma=sigma, n0=200, n=n, alpha=alpha, batch_size=4096, seed=2)
    cls = (margin > 0).long()
    p_hat = cert.counts.gather(1, cls[:, None])[:, 0].double() / n
    assert (p_hat - p_true).abs().max() < 4 * math.sqrt(0.25 / n)  # the estimate is close to the closed form
    ok = ~cert.abstained
    assert (cert.prediction[ok] == cls[ok]).all()
    # a lower bound: each fails with probability <= alpha (seed 1 has one such draw, z = 3.2, at input 6)
    assert (cert.pa_lower[ok] <= p_true[ok]).all()
    assert (cert.pa_lower[ok] >= p_true[ok] - 0.02).all()  # and not a loose one
    true_radius = sigma * torch.from_numpy(norm.ppf(p_true.numpy()))
    assert (cert.radius[ok] <= true_radius[ok]).all()  # conservative
    assert (cert.radius[ok] >= true_radius[ok] - 0.1).all()
    assert cert.abstained.tolist() == [True] + [False] * 15  # pA = 0.504: too close to 1/2 to certify at n


def test_predict_abstains_on_a_coin_flip_and_answers_a_confident_model() -> None:
    coin = Linear2(torch.tensor([1.0, 0.0]), 0.0)  # at x = 0 each class has probability 1/2 under noise
    x = torch.zeros(8, 2)
    assert predict(coin, x, sigma=1.0, n=2000, alpha=0.001).tolist() == [ABSTAIN] * 8
    far = torch.tensor([[3.0, 0.0]] * 4 + [[-3.0, 0.0]] * 4)
    assert predict(coin, far, sigma=1.0, n=200, alpha=0.001).tolist() == [1] * 4 + [0] * 4
    assert predict(Constant(3), x, sigma=1.0, n=min_predict_n(0.01), alpha=0.01).tolist() == [3] * 8
    assert predict(Constant(3), x, sigma=1.0, n=min_predict_n(0.01) - 1, alpha=0.01).tolist() == [ABSTAIN] * 8


def test_binomial_pvalue_is_scipys_binomtest() -> None:
    pairs = [(5, 5), (10, 0), (7, 3), (60, 40), (520, 480), (1, 0), (3, 2), (0, 0)]
    p = binomial_pvalue(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]))
    for (a, b), v in zip(pairs[:-1], p[:-1].tolist(), strict=True):
        assert v == pytest.approx(binomtest(a, a + b, 0.5).pvalue, rel=1e-9)
    assert p[-1] == 1.0  # no votes: no evidence


def test_sample_counts_maps_every_copy_to_its_input_and_restores_the_mode() -> None:
    """Inputs hold their own index; with tiny noise the model returns it: row i has all n votes in class i,
    whatever the chunk boundaries. The model runs in eval mode (BatchNorm's running statistics) and is
    left in the mode it was in."""
    k = 7

    class ByValue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(1, affine=False)

        def forward(self, x: Tensor) -> Tensor:
            v = self.bn(x.mean(1, keepdim=True))  # running mean 0, var 1 in eval mode: the identity (to 1e-5)
            return -(v - torch.arange(k)).abs()

    model = ByValue().train()
    x = torch.arange(k, dtype=torch.float32)[:, None].repeat(1, 3)
    for n, bs in [(1, 1), (5, 3), (13, 100), (40, 7)]:
        counts = sample_counts(model, x, sigma=1e-4, n=n, batch_size=bs)
        assert torch.equal(counts, n * torch.eye(k, dtype=torch.int64)), (n, bs)
    assert model.training and model.bn.training
    assert float(model.bn.running_mean) == 0.0  # never ran in training mode


def test_sample_counts_is_seeded_and_the_selection_draw_is_independent() -> None:
    coin = Linear2(torch.tensor([1.0, 0.0]), 0.0)
    x = torch.zeros(4, 2)
    a = sample_counts(coin, x, sigma=1.0, n=300, seed=5)
    assert torch.equal(a, sample_counts(coin, x, sigma=1.0, n=300, seed=5))
    assert not torch.equal(a, sample_counts(coin, x, sigma=1.0, n=300, seed=6))
    g = torch.Generator().manual_seed(5)
    first, second = (sample_counts(coin, x, sigma=1.0, n=300, generator=g) for _ in range(2))
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_certified_accuracy_and_curve() -> None:
    pred = torch.tensor([0, 1, ABSTAIN, 2, 1])
    radius = torch.tensor([0.5, 0.2, 0.0, 1.0, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 1])
    acc = certified_accuracy(pred, radius, y, [0.0, 0.2, 0.5, 0.9, 1.0])
    assert acc.tolist() == pytest.approx([3 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0])
    r, c = certified_curve(pred, radius, y, points=11)
    assert r[0] == 0.0 and r[-1] == pytest.approx(1.0) and c[0] == pytest.approx(0.6) and c[-1] == 0.0
    assert (c[:-1] >= c[1:]).all()


_COUNTS = st.lists(st.integers(0, 400), min_size=2, max_size=4)


@settings(max_examples=150, deadline=None)
@given(votes=_COUNTS, alpha=st.sampled_from([1e-4, 0.001, 0.01, 0.05, 0.3]), sigma=st.floats(0.05, 2.0),
       move=st.integers(1, 50))
def test_certify_decision_invariants(votes: list[int], alpha: float, sigma: float, move: int) -> None:
    """Radius = sigma Phi^-1(pA_lower) > 0 exactly when pA_lower > 1/2 (never certifies below), else abstain with 0;
    never above the all-votes radius; moving votes from another class to cA never lowers the radius."""
    if sum(votes) == 0:
        votes = [*votes[:-1], 1]
    counts = torch.tensor([votes])
    guess = torch.tensor([0])
    c = certify_from_counts(guess, counts, sigma=sigma, alpha=alpha)
    n = sum(votes)
    lower = float(c.pa_lower[0])
    if lower > 0.5:
        assert c.prediction.tolist() == [0] and float(c.radius[0]) == pytest.approx(sigma * norm.ppf(lower))
    else:
        assert c.prediction.tolist() == [ABSTAIN] and float(c.radius[0]) == 0.0
    assert float(c.radius[0]) <= max_radius(sigma=sigma, n=n, alpha=alpha) + 1e-12
    donor = 1 + int(torch.tensor(votes[1:]).argmax())
    moved = min(move, votes[donor])
    more = list(votes)
    more[0] += moved
    more[donor] -= moved
    c2 = certify_from_counts(guess, torch.tensor([more]), sigma=sigma, alpha=alpha)
    assert float(c2.pa_lower[0]) >= lower and float(c2.radius[0]) >= float(c.radius[0])
    pred, pvalue = predict_from_counts(counts, alpha=alpha)
    assert (pred[0] == ABSTAIN) == (pvalue[0] > alpha)


@given(alpha=st.floats(1e-12, 0.999))
def test_smallest_n_is_the_boundary(alpha: float) -> None:
    m = min_certify_n(alpha)
    assert alpha ** (1 / m) > 0.5 and (m == 1 or alpha ** (1 / (m - 1)) <= 0.5)
    p = min_predict_n(alpha)
    assert 2 * 0.5 ** p <= alpha and (p == 1 or 2 * 0.5 ** (p - 1) > alpha)


@pytest.mark.parametrize(("kw", "words"), [
    ({"sigma": 0.0}, "sigma must be a finite number > 0"),
    ({"sigma": float("nan")}, "sigma must be"),
    ({"alpha": 1.0}, "alpha must lie in (0, 1)"),
    ({"alpha": 0.0}, "alpha must lie in (0, 1)"),
    ({"n0": 100, "n": 100}, "n0 = 100 must be smaller than n = 100"),
    ({"n0": 0}, "n0 must be an integer >= 1"),
    ({"n": 2.5}, "n must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_arguments_are_config_errors(kw: dict[str, float], words: str) -> None:
    args = {"sigma": 0.5, "n0": 2, "n": 10, "alpha": 0.01, **kw}
    with pytest.raises(ConfigError) as ei:
        certify(Constant(0), torch.zeros(2, 3), **args)  # type: ignore[arg-type]
    assert words in str(ei.value)
    with pytest.raises(ConfigError, match="B >= 1"):
        sample_counts(Constant(0), torch.zeros(0, 3), sigma=1.0, n=3)
