"""Denoised smoothing through a real ``diffusers`` pipeline (issue 17 item 2): a tiny ``UNet2DModel`` +
``DDPMScheduler`` built and briefly trained here on digits, saved with ``DDPMPipeline.save_pretrained``
(safetensors), loaded by :func:`mlaudit.certify.load_diffusers_pipeline` from the local folder only, used as
the one-shot and DDIM denoiser, and by the ``certify`` kind's ``denoiser: {kind: ddpm, path}``. A folder with
pickled weights only is refused. Skips when diffusers is not installed (the ``diffusion`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mlaudit.certify import DiffusionDenoiser, ddpm_timestep, load_diffusers_pipeline
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment

diffusers = pytest.importorskip("diffusers")


def _unet() -> Any:
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny epsilon-prediction DDPM on digits (pixels mapped to [-1, 1]), trained for 120 steps on the
    timesteps around sigma 0.25's t*, saved as a DDPMPipeline with safetensors."""
    torch.manual_seed(0)
    unet, sched = _unet(), diffusers.DDPMScheduler(num_train_timesteps=1000)
    x = load_dataset({"name": "digits"}).train.x * 2 - 1  # [N, 1, 8, 8] in [-1, 1]
    abar = sched.alphas_cumprod.float()
    t_star = ddpm_timestep(sched.alphas_cumprod, 0.5)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        i = torch.randint(0, len(x), (64,), generator=g)
        t = torch.randint(max(0, t_star - 40), t_star + 40, (64,), generator=g)
        eps = torch.randn(64, 1, 8, 8, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x[i] + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("ddpm") / "pipeline"
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_saved_pipeline_loads_locally_and_denoises(pipeline_dir: Path) -> None:
    unet, abar = load_diffusers_pipeline(pipeline_dir)
    assert isinstance(unet, diffusers.UNet2DModel) and not unet.training
    ref = diffusers.DDPMScheduler.from_pretrained(pipeline_dir / "scheduler").alphas_cumprod
    assert abar.dtype == torch.float64 and torch.allclose(abar, ref.double(), atol=1e-6)
    x = load_dataset({"name": "digits"}).test.x[:200]
    g = torch.Generator().manual_seed(1)
    noisy = x + 0.25 * torch.randn(x.shape, generator=g)
    mse_noisy = float(((noisy - x) ** 2).mean())
    with torch.no_grad():
        for steps in (1, 4):
            den = DiffusionDenoiser(unet, abar, sigma=0.25, steps=steps)
            assert den.t_star == ddpm_timestep(abar, 0.5)
            out = den(noisy)
            assert out.shape == x.shape and torch.isfinite(out).all()
            # the briefly trained model removes much of the noise (one-shot and DDIM alike)
            assert float(((out - x) ** 2).mean()) < 0.6 * mse_noisy, (steps, float(((out - x) ** 2).mean()), mse_noisy)


def test_the_certify_kind_uses_the_saved_pipeline(pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = {"kind": "certify", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 3},
           "sigma": 0.25, "n0": 20, "n": 100, "predict_n": 50, "alpha": 0.01, "radii": [0, 0.25], "examples": 10,
           "seed": 0, "denoiser": {"kind": "ddpm", "path": str(pipeline_dir), "steps": 1}}
    m = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "runs.db", quiet=True).results["metrics"]
    d = m["denoiser"]
    assert d["t_star"] == ddpm_timestep(load_diffusers_pipeline(pipeline_dir)[1], 0.5) and d["model_calls"] == 1
    assert 0.0 <= m["certified_accuracy"]["0"]["value"] <= 1.0 and "without_denoiser" in m


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        folder, safe_serialization=False)
    with pytest.raises(ConfigError, match="safe_serialization=True"):
        load_diffusers_pipeline(folder)
