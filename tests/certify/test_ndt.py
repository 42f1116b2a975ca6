"""Noise, denoise, train, classify (mlaudit.certify.ndt, seed 004): the ensemble certificate equals Cohen's
formula sigma * Phi^-1(pA_lower) on hand-made votes (m0 selection models, m estimation models); each
model's training set is noised with its own seed, denoised, and the noise differs across models; poisoned
views keep their labels, insertions and keep mask; bad arguments are named; a denoiser that changes the
input shape is refused, naming both shapes; end to end on digits with
logistic models trained by the factory."""

from __future__ import annotations

import pytest
import torch
from scipy.special import ndtri
from scipy.stats import beta
from torch import nn

from mlaudit.certify import ABSTAIN, certified_accuracy
from mlaudit.certify.ndt import (
    certify_ensemble,
    load_models,
    ndt_certify,
    ndt_inputs,
    ndt_trials,
    ndt_view,
    ndt_views,
    train_ndt,
)
from mlaudit.data.base import TensorDataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError


def _split(n: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.5 + 0.25
    return TensorDataset(x, torch.arange(n) % 3, ("a", "b", "c"))


def _cohen(n_a: int, n: int, sigma: float, alpha: float) -> float:
    lower = float(beta.ppf(alpha, n_a, n - n_a + 1))  # one-sided Clopper-Pearson lower bound
    return sigma * float(ndtri(lower)) if lower > 0.5 else 0.0


@pytest.mark.parametrize(("sel", "est", "sigma", "alpha"), [
    ([0], [0] * 20, 0.25, 0.001),
    ([1, 1], [1] * 18 + [0] * 2, 0.5, 0.01),
    ([2], [2] * 30 + [1] * 5 + [0] * 5, 1.0, 0.001),
    ([0], [0] * 6 + [1] * 4, 0.25, 0.05),   # pA_lower < 1/2: abstain
    ([1], [0] * 20, 0.25, 0.001),          # the selection model's class gets no estimation vote: abstain
])
def test_certificate_is_cohens_formula_on_votes(sel: list[int], est: list[int], sigma: float, alpha: float) -> None:
    votes = torch.tensor(sel + est)[:, None].repeat(1, 2)  # two identical inputs
    res = ndt_certify(votes, 3, sigma=sigma, alpha=alpha, n0=len(sel))
    c_a = max(set(sel), key=sel.count)
    n_a = est.count(c_a)
    want = _cohen(n_a, len(est), sigma, alpha)
    assert torch.allclose(res.radius, torch.full((2,), want, dtype=torch.float64), atol=1e-9)
    expect = c_a if want > 0 else ABSTAIN
    assert res.certificate.prediction.tolist() == [expect, expect]
    assert res.certificate.selection_counts.sum(1).tolist() == [len(sel)] * 2
    assert res.certificate.counts.sum(1).tolist() == [len(est)] * 2
    assert res.prediction.shape == (2,) and res.votes.shape == (len(sel) + len(est), 2)


def test_noise_is_seeded_per_model_and_denoised() -> None:
    split = _split()
    a = ndt_inputs(split.x, sigma=0.1, seed=1, clip=False)
    assert torch.equal(a, ndt_inputs(split.x, sigma=0.1, seed=1, clip=False))  # same seed, same noise
    b = ndt_inputs(split.x, sigma=0.1, seed=2, clip=False)
    assert not torch.allclose(a, b)
    noise = a - split.x
    assert 0.07 < float(noise.std()) < 0.13  # sigma 0.1 over 192 draws

    class Halve(nn.Module):  # a stand-in denoiser that records what it saw
        seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Halve.seen.append(x.clone())
            return x * 0.5

    views = ndt_views(split, sigma=0.1, seeds=[1, 2, 3], denoiser=Halve(), prefix="t")
    assert list(views) == ["t-m0000", "t-m0001", "t-m0002"]
    xs = [v.gather(torch.arange(v.num_total), validate=False)[0] for v in views.values()]
    for i, (s, x) in enumerate(zip([1, 2, 3], xs)):
        noisy = ndt_inputs(split.x, sigma=0.1, seed=s, clip=False)
        assert torch.allclose(Halve.seen[i], noisy)               # the denoiser saw model i's own noisy copy
        assert torch.allclose(x, (noisy * 0.5).clamp(0, 1), atol=1e-6)  # and the model trains on its output
        assert views[f"t-m{i:04d}"].meta["ndt"] == {"sigma": 0.1, "seed": s, "denoised": True}
    assert not torch.allclose(xs[0], xs[1]) and not torch.allclose(xs[1], xs[2])
    for v in views.values():
        assert torch.equal(v.labels, split.y)


def test_poisoned_view_keeps_labels_insertions_and_keep() -> None:
    split = _split()
    poisoned = (DataView.identity(split).with_delta([0, 1], torch.full((2, 1, 4, 4), 0.1), eps=None)
                .with_labels([2], 0).with_inserted(torch.full((2, 1, 4, 4), 0.5), torch.tensor([1, 2])))
    keep = torch.ones(poisoned.num_total, dtype=torch.bool)
    keep[3] = False
    poisoned = poisoned.with_keep(keep)
    out = ndt_view(poisoned, sigma=0.05, seed=7)
    assert out.num_total == poisoned.num_total and torch.equal(out.keep, keep)
    assert torch.equal(out.labels, poisoned.labels)
    got = out.gather(torch.arange(out.num_total), validate=False)[0]
    src = poisoned.gather(torch.arange(out.num_total), validate=False)[0]
    assert torch.allclose(got, ndt_inputs(src, sigma=0.05, seed=7), atol=1e-6)  # inserted rows noised too


def test_trials_and_bad_arguments_name_the_field() -> None:
    views = ndt_views(_split(), sigma=0.1, seeds=[5, 6])
    trials = ndt_trials(views, seeds=[5, 6])
    assert [(t.trial_id, t.view, t.seed) for t in trials] == [("ndt-m0000", "ndt-m0000", 5), ("ndt-m0001", "ndt-m0001", 6)]
    with pytest.raises(ConfigError, match="sigma"):
        ndt_inputs(_split().x, sigma=0.0, seed=0)
    with pytest.raises(ConfigError, match="distinct seeds"):
        ndt_views(_split(), sigma=0.1, seeds=[1, 1])
    with pytest.raises(ConfigError, match="n0"):
        ndt_certify(torch.zeros(3, 2, dtype=torch.long), 2, sigma=0.1, alpha=0.01, n0=3)
    with pytest.raises(ConfigError, match="alpha"):
        ndt_certify(torch.zeros(3, 2, dtype=torch.long), 2, sigma=0.1, alpha=1.5)
    with pytest.raises(ConfigError, match="one seed per view"):
        ndt_trials(views, seeds=[1])


def test_a_denoiser_that_changes_the_shape_is_refused_naming_both_shapes() -> None:
    x = _split().x  # [12, 1, 4, 4]
    for den, got in ((nn.AvgPool2d(2), "[1, 2, 2]"), (nn.Flatten(), "[16]")):
        with pytest.raises(ConfigError) as e:
            ndt_inputs(x, sigma=0.1, seed=0, denoiser=den)
        msg = str(e.value)
        assert f"the denoiser maps inputs of shape [1, 4, 4] to {got}" in msg and "the same shape" in msg, msg
    with pytest.raises(ConfigError, match=r"\[1, 4, 4\] to \[1, 2, 2\]"):  # through the views of a poisoned set too
        ndt_views(_split(), sigma=0.1, seeds=[1, 2], denoiser=nn.AvgPool2d(2))
    assert ndt_inputs(x, sigma=0.1, seed=0, denoiser=nn.Identity()).shape == x.shape


def test_digits_end_to_end_certified_accuracy() -> None:
    from mlaudit.data.registry import load_dataset
    from mlaudit.train import Recipe

    data = load_dataset("digits")
    seeds = list(range(100, 112))
    trained = train_ndt("logistic", Recipe(lr=0.1, epochs=3, batch_size=64), data, sigma=0.25, seeds=seeds)
    assert [t.trial_id for t in trained] == [f"ndt-m{i:04d}" for i in range(12)]
    models = load_models(trained, "logistic", data)
    x, y = data.test.x[:120], data.test.y[:120]
    res = certify_ensemble(models, x, sigma=0.25, alpha=0.01, n0=1)
    acc = certified_accuracy(res.certificate.prediction, res.radius, y, [0.0, 0.05, 10.0])
    assert float(acc[0]) > 0.6          # a noise-trained logistic ensemble still classifies digits
    assert float(acc[0]) >= float(acc[1]) >= float(acc[2]) == 0.0
    assert float(res.radius.max()) <= 0.25 * float(ndtri(0.01 ** (1 / 11))) + 1e-9  # all 11 votes: the cap
