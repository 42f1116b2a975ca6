"""Denoised smoothing (Salman et al. 2020; Carlini et al. 2023): t* is the step whose (1 - abar_t) / abar_t is
closest to the model-units sigma^2; with an oracle noise predictor the one-shot estimate (and DDIM from t*)
returns the clean input exactly, and x_t is exactly a forward-process sample where sigma^2 matches the
schedule; Denoised(f, D) is f(D(.)) and the sampling functions add the noise before D; a DnCNN trained for
a second on digits lowers the MSE of noisy digits; the stability objective leaves the classifier untouched;
a denoiser that changes its input's shape is refused, naming it and both shapes, before any vote is counted;
the diffusers loader names the missing package and loads local folders only."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mlaudit.certify import (
    Denoised,
    DiffusionDenoiser,
    DnCNN,
    certify,
    check_denoiser,
    ddpm_denoise,
    ddpm_schedule,
    ddpm_timestep,
    load_diffusers_pipeline,
    model_sigma,
    sample_counts,
    train_denoiser,
)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.query import forward_batched


def linear_schedule(t: int = 1000) -> Tensor:
    """abar_t of DDPM's linear beta schedule (Ho et al. 2020: beta from 1e-4 to 0.02 over 1000 steps), float64."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, t, dtype=torch.float64), 0)


class Oracle(nn.Module):
    """Knows the clean batch x0 (model units): predicts the exact noise (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    of each call and records (x_t, t)."""

    def __init__(self, x0: Tensor, abar: Tensor) -> None:
        super().__init__()
        self.x0, self.abar = x0, abar
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x_t.clone(), t.clone()))
        a = self.abar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_t_star_is_the_step_whose_noise_to_signal_ratio_is_closest_to_sigma_squared() -> None:
    abar = linear_schedule()
    ratio = ((1 - abar) / abar).tolist()
    for sigma in (0.01, 0.05, 0.12, 0.25, 0.5, 1.0, 2.0, 10.0, 1e4):
        brute = min(range(len(ratio)), key=lambda t, s=sigma: abs(ratio[t] - s * s))
        assert ddpm_timestep(abar, sigma) == brute
    for t in (0, 1, 137, 500, 999):  # sigma^2 = (1 - abar_t) / abar_t exactly picks t
        assert ddpm_timestep(abar, math.sqrt(ratio[t])) == t
    assert [ddpm_timestep(abar, s) for s in (0.1, 0.2, 0.4, 0.8)] == sorted(ddpm_timestep(abar, s)
                                                                         for s in (0.1, 0.2, 0.4, 0.8))
    # data in [0, 1] mapped onto the model's [-1, 1]: the noise doubles (Carlini et al.'s 2 sigma)
    assert model_sigma(0.25) == 0.5 and model_sigma(0.25, None) == 0.25
    assert model_sigma(0.5, (0.0, 255.0)) == pytest.approx(1 / 255)
    den = DiffusionDenoiser(lambda x, t: x, abar, sigma=0.25)
    assert den.t_star == ddpm_timestep(abar, 0.5) and den.ratio_at_t_star == pytest.approx(0.5, rel=0.01)
    for bad in (torch.zeros(0), torch.ones(3), torch.tensor([0.5, -0.1]), torch.rand(2, 3)):
        with pytest.raises(ConfigError, match="alphas_cumprod"):
            ddpm_timestep(bad, 0.5)
    with pytest.raises(ConfigError, match="sigma"):
        ddpm_timestep(abar, 0.0)


@pytest.mark.parametrize("data_range", [(0.0, 1.0), None, (-2.0, 6.0)])
def test_one_shot_is_exact_with_an_oracle_noise_predictor(data_range: tuple[float, float] | None) -> None:
    """With sigma' = a sigma set so that sigma'^2 = (1 - abar_k) / abar_k for k = 137, x_t* = sqrt(abar_k)(x' + a eps)
    is exactly q(x_k | x') with standard noise eps / sigma; the one-shot estimate with the true noise is x."""
    abar, k = linear_schedule(), 137
    scale = 1.0 if data_range is None else 2 / (data_range[1] - data_range[0])
    lo = 0.0 if data_range is None else data_range[0]
    sigma = math.sqrt((1 - abar[k]) / abar[k]) / scale
    g = torch.Generator().manual_seed(0)
    x_model = -0.8 + 1.6 * torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64)  # inside the model's [-1, 1]
    x = x_model if data_range is None else lo + (x_model + 1) / scale
    eps = sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    oracle = Oracle(x_model, abar)
    out = ddpm_denoise(oracle, abar, x + eps, sigma=sigma, data_range=data_range)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    ((x_t, t),) = oracle.calls  # one-shot: one model call at t*
    assert t.tolist() == [k] * 4 and t.dtype == torch.int64
    torch.testing.assert_close(x_t, abar[k].sqrt() * (x_model + scale * eps), rtol=0, atol=1e-12)
    z = (x_t - abar[k].sqrt() * x_model) / (1 - abar[k]).sqrt()  # the noise of q(x_k | x'), standard normal
    torch.testing.assert_close(z, eps / sigma, rtol=0, atol=1e-10)


def test_one_shot_formula_without_a_noise_estimate_and_clipping() -> None:
    """eps_hat = 0 leaves x_0 = x_t / sqrt(abar) = x' + a eps: the noisy input comes back (clip off), or clamped
    to the model's [-1, 1] = the data range (clip on)."""
    abar = linear_schedule()
    x_noisy = torch.tensor([-0.4, 0.0, 0.3, 1.0, 1.7], dtype=torch.float64).view(1, 1, 1, 5)

    def zero(x_t: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x_t)

    torch.testing.assert_close(ddpm_denoise(zero, abar, x_noisy, sigma=0.3, clip=False), x_noisy, rtol=0, atol=1e-12)
    torch.testing.assert_close(ddpm_denoise(zero, abar, x_noisy, sigma=0.3), x_noisy.clamp(0, 1), rtol=0, atol=1e-12)


def test_multi_step_ddim_visits_t_star_down_to_0_and_is_exact_with_the_oracle() -> None:
    assert ddpm_schedule(100, 1) == [100] and ddpm_schedule(100, 5) == [100, 75, 50, 25, 0]
    assert ddpm_schedule(3, 10) == [3, 2, 1, 0] and ddpm_schedule(0, 4) == [0]
    abar, sigma = linear_schedule(), 0.25
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    noisy = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    oracle = Oracle(2 * x - 1, abar)
    out = ddpm_denoise(oracle, abar, noisy, sigma=sigma, steps=5)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-9)
    t_star = ddpm_timestep(abar, 2 * sigma)
    assert [int(t[0]) for _, t in oracle.calls] == ddpm_schedule(t_star, 5)


def test_diffusers_shaped_outputs_are_accepted() -> None:
    """``.sample`` outputs (diffusers' UNet2DOutput), tuples (return_dict=False) and 2C-channel learned-variance
    outputs give the same denoising as a plain tensor; a wrong shape is a ConfigError."""
    abar = linear_schedule()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def plain(x_t: Tensor, t: Tensor) -> Tensor:
        return 0.1 * x_t + t.view(-1, 1, 1, 1) * 1e-4

    ref = ddpm_denoise(plain, abar, x, sigma=0.2)
    wrapped = [lambda x_t, t: types.SimpleNamespace(sample=plain(x_t, t)), lambda x_t, t: (plain(x_t, t),),
               lambda x_t, t: torch.cat([plain(x_t, t), torch.full_like(x_t, 9.0)], 1)]
    for unet in wrapped:
        torch.testing.assert_close(ddpm_denoise(unet, abar, x, sigma=0.2), ref)
    with pytest.raises(ConfigError, match=r"must have x_t's shape \[2, 3, 4, 4\]"):
        ddpm_denoise(lambda x_t, t: x_t[:, :1], abar, x, sigma=0.2)


class MeanClassifier(nn.Module):
    """Class 1 iff the mean pixel is above 0.5 (two logits), with one parameter for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        s = self.w * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([-s, s], 1)


class Blur(nn.Module):
    """A fixed denoiser: each pixel replaced by the row mean (so D(z) is not z)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(-1, keepdim=True).expand_as(x) ** 2


def test_denoised_composes_and_the_sampling_functions_add_noise_before_the_denoiser() -> None:
    f, d = MeanClassifier(), Blur()
    g = torch.Generator().manual_seed(3)
    x = 0.4 + 0.4 * torch.rand(5, 1, 4, 4, generator=g)
    torch.testing.assert_close(Denoised(f, d)(x), f(d(x)))
    n, sigma = 64, 0.3
    counts = sample_counts(Denoised(f, d), x, sigma=sigma, n=n, batch_size=5 * n, seed=7)  # one chunk
    noise = torch.randn((5 * n, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    rows = torch.arange(5 * n) // n
    votes = f(d(x[rows] + sigma * noise)).argmax(1)  # f(D(x + eps)), the same draws
    expected = torch.zeros(5, 2, dtype=torch.int64).index_put_((rows, votes), torch.ones_like(rows), accumulate=True)
    assert torch.equal(counts, expected)
    assert not torch.equal(counts, sample_counts(f, x, sigma=sigma, n=n, batch_size=5 * n, seed=7))
    # an untrained DnCNN is the identity (last layer at zero): certify on f(D(.)) = certify on f, exactly
    plain = certify(f, x, sigma=sigma, n0=10, n=200, alpha=0.01, batch_size=100, seed=1)
    both = certify(Denoised(f, DnCNN(1)), x, sigma=sigma, n0=10, n=200, alpha=0.01, batch_size=100, seed=1)
    assert torch.equal(plain.counts, both.counts) and torch.equal(plain.radius, both.radius)
    assert (both.radius > 0).any()


class Pool(nn.Module):
    """A denoiser that halves H and W (2x2 average pooling) and records how often it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return nn.functional.avg_pool2d(x, 2)


def test_a_denoiser_that_changes_the_shape_is_refused_naming_it_and_both_shapes() -> None:
    # f takes 4 features, so f(D(.)) would run on the pooled [B, 1, 2, 2] inputs: only the check stops it
    f = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError) as e:
        Denoised(f, Pool(), input_shape=(1, 4, 4))  # probed once at construction
    for w in ("the denoiser Pool", "shape [2, 1, 2, 2]", "inputs of shape [2, 1, 4, 4]", "allowed: an output of shape"):
        assert w in str(e.value), str(e.value)
    d = Pool()
    with pytest.raises(ConfigError, match=r"returned shape \[30, 1, 2, 2\] for inputs of shape \[30, 1, 4, 4\]"):
        certify(Denoised(f, d), x, sigma=0.25, n0=10, n=50, alpha=0.01, batch_size=60, seed=0)
    assert d.calls == 1  # refused on the first forward pass (n0 = 10 selection copies of 3 inputs), before any vote
    with pytest.raises(ConfigError, match="returned a tuple, not a tensor"):
        check_denoiser(lambda z: (z,), (1, 4, 4), where="denoiser")
    with pytest.raises(ConfigError, match=r"denoiser cannot denoise inputs of shape \[2, 3, 4, 4\]"):
        check_denoiser(nn.Conv2d(1, 1, 3, padding=1), (3, 4, 4), where="denoiser")  # wrong channels
    den = DnCNN(1).train()
    check_denoiser(den, (1, 4, 4))  # a shape-preserving denoiser passes, its mode put back
    assert den.training and Denoised(f, nn.Identity(), input_shape=(1, 2, 2))(torch.zeros(1, 1, 2, 2)).shape == (1, 2)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _mse(model: nn.Module, x: Tensor, sigma: float, seed: int) -> tuple[float, float]:
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return float((noisy - x).square().mean()), float((forward_batched(model, noisy) - x).square().mean())


def test_dncnn_trained_for_a_second_on_digits_lowers_the_mse(digits: Any) -> None:
    torch.manual_seed(0)
    den, sigma = DnCNN(1).train(), 0.25
    losses = train_denoiser(den, digits.train.x, sigma=sigma, epochs=5, seed=0)
    assert len(losses) == 5 and losses[-1] < losses[0] and den.training  # its mode is put back
    noisy, denoised = _mse(den, digits.test.x, sigma, seed=1)
    assert noisy == pytest.approx(sigma ** 2, rel=0.05)
    assert denoised < 0.45 * noisy  # about 0.019 against 0.063 (5 epochs, 2-core CPU, about 0.5 s)
    out = den.eval()(digits.test.x[:3])
    assert out.shape == (3, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"images \[B, C, H, W\]"):
        den(torch.zeros(2, 64))


def test_stability_objective_trains_through_a_frozen_classifier(digits: Any) -> None:
    torch.manual_seed(0)
    f = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = {k: v.clone() for k, v in f.state_dict().items()}
    den = DnCNN(1, depth=3, width=16)
    x = digits.train.x[:512]
    losses = train_denoiser(den, x, sigma=0.5, epochs=3, objective="stability", classifier=f, seed=0)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in f.state_dict().items())  # f is frozen
    assert all(p.requires_grad and p.grad is None for p in f.parameters()) and f.training
    with pytest.raises(ConfigError, match="stability objective needs the classifier"):
        train_denoiser(den, x, sigma=0.5, objective="stability")
    with pytest.raises(ConfigError, match="objective must be one of mse, stability"):
        train_denoiser(den, x, sigma=0.5, objective="l1")  # type: ignore[arg-type]


def test_the_diffusers_loader_names_the_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError, match=r"optional package 'diffusers'.*pip install diffusers"):
        load_diffusers_pipeline(tmp_path)


def fake_diffusers(unet: Any, abar: Tensor, prediction_type: str = "epsilon") -> tuple[types.ModuleType, list]:
    """A stand-in ``diffusers`` module: DiffusionPipeline.from_pretrained records its call and returns a
    pipeline with ``unet`` and a scheduler with ``alphas_cumprod`` and ``config``."""
    calls: list[tuple[tuple, dict]] = []

    class DiffusionPipeline:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            calls.append((args, kwargs))
            scheduler = types.SimpleNamespace(alphas_cumprod=abar.float(), config={"prediction_type": prediction_type})
            return types.SimpleNamespace(unet=unet, scheduler=scheduler)

    mod = types.ModuleType("diffusers")
    mod.DiffusionPipeline = DiffusionPipeline  # type: ignore[attr-defined]
    return mod, calls


def test_the_diffusers_loader_reads_a_local_folder_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unet = nn.Conv2d(1, 1, 1)
    mod, calls = fake_diffusers(unet, linear_schedule())
    monkeypatch.setitem(sys.modules, "diffusers", mod)
    got, abar = load_diffusers_pipeline(tmp_path)
    assert got is unet and not got.training and abar.dtype == torch.float64 and abar.shape == (1000,)
    assert calls == [((str(tmp_path),), {"local_files_only": True, "use_safetensors": True})]
    with pytest.raises(ConfigError, match="is not a folder"):
        load_diffusers_pipeline(tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "diffusers", fake_diffusers(unet, linear_schedule(), "v_prediction")[0])
    with pytest.raises(ConfigError, match="prediction_type 'v_prediction'"):
        load_diffusers_pipeline(tmp_path)
