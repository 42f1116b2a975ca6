"""Denoised smoothing through a real ``diffusers`` pipeline (issue 17 item 2): a tiny ``UNet2DModel`` +
``DDPMScheduler`` built and briefly trained here on digits, saved with ``DDPMPipeline.save_pretrained``
(safetensors), loaded by :func:`mlaudit.certify.load_diffusers_pipeline` from the local folder only, used as
the one-shot and DDIM denoiser, by the ``certify`` kind's ``denoiser: {kind: ddpm, path}`` and by the ``defend``
kind's ``defence: {method: ndt, denoiser: {kind: ddpm, path}}`` (every training set of the ensemble denoised by
it). A folder with pickled weights only is refused, and a pipeline for other inputs (3 channels on 1-channel
digits) exits 2 naming the field before anything is written. Skips when diffusers is not installed (the
``diffusion`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mlaudit.certify import DiffusionDenoiser, ddpm_timestep, load_diffusers_pipeline
from mlaudit.cli import app
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment

diffusers = pytest.importorskip("diffusers")


def _unet(channels: int = 1) -> Any:
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
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


def _ndt(folder: Path) -> dict[str, Any]:
    """A Witches' Brew poison of digits defended by 11 noised models whose training sets the DDPM denoises."""
    return {"kind": "defend", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 2},
            "attack": {"method": "gradient-matching", "eps": 16, "budget": 0.01, "restarts": 1, "steps": 3},
            "defence": {"method": "ndt", "sigma": 0.25, "models": 11, "alpha": 0.01,
                        "denoiser": {"kind": "ddpm", "path": str(folder)}}, "victims": 1, "seed": 0}


def test_the_defend_kinds_ndt_denoises_every_training_set_with_the_pipeline(
        pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = DiffusionDenoiser.forward

    def spy(self: DiffusionDenoiser, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        seen.append((x.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(DiffusionDenoiser, "forward", spy)
    r = run_experiment(_ndt(pipeline_dir), out=tmp_path / "o", device="cpu", store=tmp_path / "runs.db",
                       quiet=True).results
    m, abar = r["metrics"], load_diffusers_pipeline(pipeline_dir)[1]
    assert m["defence"]["denoiser"] == {"kind": "ddpm", "path": str(pipeline_dir), "steps": 1,
                                        "data_range": [0.0, 1.0], "clip": True}
    d = m["ndt"]["denoiser"]
    assert (d["label"], d["t_star"], d["model_calls"]) == ("DDPM (one-shot)", ddpm_timestep(abar, 0.5), 1)
    assert r["cost"]["models_trained"] == 1 + 1 + 11  # a crafting model, a victim, the ensemble
    # the check's probe (2 zero inputs), then every row of each of the 11 models' training sets, in model order
    (probe, _), *train = seen
    assert probe.shape == (2, 1, 8, 8) and not probe.any()
    x = load_dataset({"name": "digits"}).train.x
    noisy = torch.cat([i for i, _ in train]).view(11, *x.shape)
    denoised = torch.cat([o for _, o in train]).view(11, *x.shape)
    mse_noisy, mse_denoised = float((noisy - x).square().mean()), float((denoised - x).square().mean())
    assert mse_noisy == pytest.approx(0.25 ** 2, rel=0.05)  # sigma 0.25 (the poisons move 14 rows by <= 16/255)
    assert mse_denoised < 0.6 * mse_noisy, (mse_denoised, mse_noisy)
    assert not torch.allclose(noisy[0], noisy[1])  # each model's own noise
    assert m["ndt"]["per_set"]["s000"]["ensemble_accuracy"]["value"] > 0.8  # trained on the denoised sets


def test_a_pipeline_for_other_inputs_exits_2_naming_the_field(tmp_path: Path) -> None:
    folder = tmp_path / "rgb"
    diffusers.DDPMPipeline(unet=_unet(3), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        folder, safe_serialization=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_ndt(folder)))
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--device", "cpu",
                                   "--store", str(tmp_path / "runs.db")])
    assert res.exit_code == 2, res.output
    assert "defence.denoiser (the DDPM in" in res.stderr and "cannot denoise inputs of shape [2, 1, 8, 8]" in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
