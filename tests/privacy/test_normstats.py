"""Privately estimated normalisation statistics for ScatterNet features (mlaudit.privacy.normstats, Tramèr &
Boneh ICLR 2021) and the accountant's composition of extra Gaussian releases with DP-SGD: closed forms,
accuracy of the estimates against the exact statistics, the clipping bound, DP training end to end, bad configs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models import build_model
from mlaudit.models.scatternet import DPStatsNorm
from mlaudit.privacy.accountant import (
    calibrate_noise,
    calibrate_releases,
    composed_rdp,
    epsilon,
    gaussian_rdp,
    releases_epsilon,
)
from mlaudit.privacy.normstats import clipped_stat_sums, example_stats, noisy_stats, norm_noise
from mlaudit.train.evaluate import evaluate
from mlaudit.train.loop import StackedModels, init_models, train_stack
from mlaudit.train.recipe import resolve_recipe

CPU = torch.device("cpu")
DELTA = 1e-5


def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def _balle(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. 2020, Thm 21, written out: min_a RDP(a) + log((a-1)/a) - (log delta + log a)/(a-1)."""
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.nanmin(eps))


# ------------------------------------------------------------------------------------------------ accountant
def test_gaussian_rdp_is_the_closed_form_and_adds_up() -> None:
    orders = [1.5, 2.0, 10.0, 64.0]
    assert gaussian_rdp(orders, 4.0, 3) == pytest.approx([3 * a / 32 for a in orders])
    both = composed_rdp(orders, noise_multiplier=1.0, sample_rate=0.1, steps=0, releases=((4.0, 1), (2.0, 2)))
    assert both == pytest.approx([a / 32 + 2 * a / 8 for a in orders])


@pytest.mark.parametrize(("sigma", "count"), [(5.0, 1), (17.4, 2), (40.0, 3)])
def test_releases_alone_match_the_closed_form(sigma: float, count: int) -> None:
    from mlaudit.privacy.accountant import RELEASE_ONLY_ORDERS

    orders = np.array(_orders() + RELEASE_ONLY_ORDERS)
    want = _balle(count * orders / (2 * sigma**2), orders, DELTA)
    assert releases_epsilon(releases=((sigma, count),), delta=DELTA) == pytest.approx(want, rel=1e-9)


def test_composition_adds_the_releases_rdp_to_dp_sgd_and_reduces_to_the_old_accountant() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp

    from mlaudit.privacy.accountant import _with_history

    q, sigma, steps, s_r = 0.05, 1.5, 600, 12.0
    orders = np.array(_orders())
    sgd = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)))
    want = _balle(sgd + 2 * orders / (2 * s_r**2), orders, DELTA)
    got = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, releases=((s_r, 2),))
    assert got == pytest.approx(want, rel=1e-9)
    # no releases: exactly Opacus's accountant on DP-SGD's history, as before
    old = float(_with_history("rdp", sigma, q, steps).get_epsilon(delta=DELTA))
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA) == old
    assert got > old
    # the same composition as Opacus's own history of two mechanisms (sampling rate 1 for the releases)
    two = _with_history("rdp", sigma, q, steps, ((s_r, 2),))
    assert got == pytest.approx(float(two.get_epsilon(delta=DELTA)), rel=1e-9)
    prv = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, releases=((s_r, 2),),
                  accountant="prv")
    prv0 = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    assert prv0 < prv <= got * 1.01


def test_calibration_meets_the_target_with_the_releases() -> None:
    q, steps = 0.18, 180
    s_r = calibrate_releases(target_epsilon=0.3, count=2, delta=DELTA)
    assert releases_epsilon(releases=((s_r, 2),), delta=DELTA) <= 0.3
    assert releases_epsilon(releases=((s_r * 0.99, 2),), delta=DELTA) > 0.3
    plain = calibrate_noise(target_epsilon=3.0, sample_rate=q, steps=steps, delta=DELTA)
    sigma = calibrate_noise(target_epsilon=3.0, sample_rate=q, steps=steps, delta=DELTA, releases=((s_r, 2),))
    assert sigma > plain
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, releases=((s_r, 2),)) <= 3.0
    with pytest.raises(ConfigError, match="releases"):
        calibrate_noise(target_epsilon=0.2, sample_rate=q, steps=steps, delta=DELTA, releases=((1.0, 2),))
    with pytest.raises(ConfigError, match="count must be an integer >= 1"):
        epsilon(noise_multiplier=1.0, sample_rate=q, steps=steps, delta=DELTA, releases=((1.0, 0),))


# ------------------------------------------------------------------------------------------------ statistics
def _features(n: int, f: int = 40, seed: int = 0) -> torch.Tensor:
    """n examples [F, 2, 2] with channel means 0.1..0.5 and standard deviations 0.01..0.2."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.linspace(0.1, 0.5, f).view(1, f, 1, 1)
    sd = torch.linspace(0.01, 0.2, f).view(1, f, 1, 1)
    return mu + sd * torch.randn(n, f, 2, 2, generator=g)


def _exact(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, s = example_stats(z)
    mean = m.mean(0)
    return mean, s.mean(0) - mean**2


def test_estimates_are_close_with_small_noise_and_far_with_large_noise() -> None:
    n, cm, cs = 20_000, 10.0, 10.0  # bounds above every example's norms: clipping inactive
    z = _features(n)
    m, s = example_stats(z)
    assert float(m.norm(dim=1).max()) < cm and float(s.norm(dim=1).max()) < cs
    mean, var = _exact(z)
    sums = clipped_stat_sums(z, clip_mean=cm, clip_second=cs)
    g = torch.Generator().manual_seed(1)
    sigma = 2.0
    em, ev = noisy_stats(*sums, n, clip_mean=cm, clip_second=cs, noise_multiplier=sigma, generator=g)
    sd_mean = sigma * cm / n  # the std of each noisy mean coordinate
    sd_var = sigma * (cs + 2 * float(mean.abs().max()) * cm) / n  # to first order: S/n noise and 2 mean * M/n noise
    assert float((em.double() - mean).abs().max()) < 5 * sd_mean
    assert float((ev.double() - var).abs().max()) < 5 * sd_var + 1e-6
    # large noise: some of the 40 coordinates must miss by more than half a noise std (P(all miss) ~ 0.38^40)
    big = 2000.0
    em, ev = noisy_stats(*sums, n, clip_mean=cm, clip_second=cs, noise_multiplier=big, generator=g)
    assert float((em.double() - mean).abs().max()) > 0.5 * big * cm / n > 100 * sd_mean
    assert float(ev.min()) >= big * cs / n * (1 - 1e-6)  # the floor (the noise std of S / n)


def test_one_example_moves_each_sum_by_at_most_its_bound() -> None:
    z = _features(300)
    extreme = torch.full((1, 40, 2, 2), 1e6)
    for cm, cs in [(0.5, 0.25), (3.0, 2.0)]:
        a = clipped_stat_sums(z, clip_mean=cm, clip_second=cs)
        b = clipped_stat_sums(torch.cat([z, extreme]), clip_mean=cm, clip_second=cs)
        assert float((b[0] - a[0]).norm()) == pytest.approx(cm, rel=1e-9)
        assert float((b[1] - a[1]).norm()) == pytest.approx(cs, rel=1e-9)
        # removing any ordinary example moves the sums by no more than the bounds either
        c = clipped_stat_sums(z[1:], clip_mean=cm, clip_second=cs)
        assert float((a[0] - c[0]).norm()) <= cm * (1 + 1e-9) and float((a[1] - c[1]).norm()) <= cs * (1 + 1e-9)


def test_noise_off_gives_the_exact_statistics_and_the_layer_uses_them() -> None:
    z = _features(500, f=9)
    mean, var = _exact(z)
    em, ev = noisy_stats(*clipped_stat_sums(z, clip_mean=100.0, clip_second=100.0), 500, clip_mean=100.0,
                         clip_second=100.0, noise_multiplier=0.0)
    torch.testing.assert_close(em.double(), mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ev.double(), var, rtol=1e-4, atol=1e-7)
    norm = DPStatsNorm(9)
    norm.set_stats(em, ev)
    out = norm(z)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(9), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var((0, 2, 3), correction=0), torch.ones(9), atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------------ training
@functools.lru_cache(maxsize=1)
def digits():  # noqa: ANN201
    return load_dataset(DatasetSpec(name="digits"))


def _recipe(dp: dict, epochs: int = 8):  # noqa: ANN202
    return resolve_recipe({"name": "custom", "epochs": epochs, "batch_size": 128, "lr": 4.0, "schedule": "constant",
                           "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "augment": "none", "dp": dp})


def _builder(name: str = "scatter-linear", norm: str = "dp-stats"):  # noqa: ANN202
    b = digits()
    return functools.partial(build_model, {"name": name, "norm": norm, "width": 8}, input_shape=b.input_shape,
                             num_classes=b.num_classes)


NORM = {"share": 0.1, "clip_mean": 0.5, "clip_second": 0.3}


def test_dp_scatter_linear_with_private_normalisation_learns_digits_and_reports_the_whole_cost() -> None:
    b = digits()
    dp = {"epsilon": 3.0, "delta": DELTA, "clip": 0.1, "normalisation": NORM}
    r = _recipe(dp)
    fn = _builder()
    out = train_stack(init_models(fn, [0]), b.train, r, seeds=[0], lr=4.0, device=CPU, strategy="loop")[0]
    model = fn()
    model.load_state_dict(out.state_dict)
    assert not torch.equal(model.head.norm.var, torch.ones(9))  # fitted, and saved with the weights
    acc = evaluate(StackedModels.from_modules([model], CPU, strategy="loop"), b.test, batch_size=512)
    assert float(acc["accuracy"][0]) > 0.8, acc
    p = out.privacy
    sigma_norm = norm_noise(r.dp)
    assert p["dp_norm_noise_multiplier"] == sigma_norm
    assert releases_epsilon(releases=((sigma_norm, 2),), delta=DELTA) <= 0.3
    q, steps, sigma = p["dp_sample_rate"], int(p["dp_steps"]), p["dp_noise_multiplier"]
    composed = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, releases=((sigma_norm, 2),))
    assert p["dp_epsilon"] == composed <= 3.0
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA) < composed  # the norm's share
    assert sigma > calibrate_noise(target_epsilon=3.0, sample_rate=q, steps=steps, delta=DELTA)


def test_models_trained_together_get_their_own_noisy_statistics() -> None:
    b = digits()
    r = _recipe({"noise_multiplier": 1.0, "clip": 0.1, "normalisation": {"noise_multiplier": 20.0}}, epochs=1)
    fn = _builder("scatter-cnn")
    outs = train_stack(init_models(fn, [0, 1]), b.train, r, seeds=[0, 1], lr=1.0, device=CPU, strategy="vmap")
    means = [o.state_dict["head.norm.mean"] for o in outs]
    assert not torch.equal(means[0], means[1])
    alone = train_stack(init_models(fn, [1]), b.train, r, seeds=[1], lr=1.0, device=CPU, strategy="loop")
    torch.testing.assert_close(alone[0].state_dict["head.norm.mean"], means[1])
    assert math.isfinite(outs[0].privacy["dp_epsilon"])


@pytest.mark.parametrize(("norm", "match"), [
    ({"share": 1.5}, r"dp.normalisation.share = 1.5 is outside the allowed range 0 < share < 1"),
    ({"share": 0.0}, r"dp.normalisation.share = 0.0 is outside the allowed range"),
    ({"noise_multiplier": -1.0}, r"dp.normalisation.noise_multiplier = -1.0 is outside the allowed range 0 <="),
    ({"clip_mean": 0.0}, r"dp.normalisation.clip_mean = 0.0 is outside the allowed range 0 < clip_mean"),
    ({"clip_second": float("inf")}, r"dp.normalisation.clip_second = inf is outside"),
    ({"share": 0.1, "noise_multiplier": 5.0}, r"give one of dp.normalisation.share and"),
    ({"noise_multiplier": 0.0}, r"noise_multiplier = 0 releases the statistics without noise"),
    ({"bound": 1.0}, r"normalisation.bound"),
])
def test_bad_normalisation_configs_are_refused(norm: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _recipe({"epsilon": 3.0, "normalisation": norm})


def test_mismatched_model_and_recipe_are_refused_before_training() -> None:
    b = digits()
    with pytest.raises(ConfigError, match="share = 0.1 splits dp.epsilon"):
        _recipe({"noise_multiplier": 1.0, "normalisation": {"share": 0.1}})
    with pytest.raises(ValueError, match="dp-stats.*scatter-linear, scatter-cnn only"):  # the spec's validation
        build_model({"name": "fastcnn", "norm": "dp-stats"}, input_shape=(1, 8, 8), num_classes=10)
    calls = []
    with pytest.raises(ConfigError, match="needs recipe.dp with dp.normalisation"):
        train_stack(init_models(_builder(), [0]), b.train, _recipe({"epsilon": 3.0}), seeds=[0], lr=1.0, device=CPU,
                    on_epoch=lambda e, lo: calls.append(e))
    with pytest.raises(ConfigError, match="needs a model built with norm: dp-stats"):
        train_stack(init_models(_builder(norm="group"), [0]), b.train, _recipe({"epsilon": 3.0, "normalisation": NORM}),
                    seeds=[0], lr=1.0, device=CPU, on_epoch=lambda e, lo: calls.append(e))
    assert calls == []
    with pytest.raises(ConfigError, match=r"dp.normalisation.share = 0.005 asks for epsilon 0.0025"):
        train_stack(init_models(_builder(), [0]), b.train,
                    _recipe({"epsilon": 0.5, "normalisation": {"share": 0.005}}), seeds=[0], lr=1.0, device=CPU)
