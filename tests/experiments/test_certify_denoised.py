"""The ``certify`` kind's ``denoiser`` block (denoised smoothing, issue 17 item 2): a DnCNN trained in the run
certifies f(D(.)) beside f alone on the same noise draws (f alone = the run without a denoiser), the report
shows both, a resumed run reloads the denoiser; a diffusers-shaped DDPM (a stand-in module in place of the
diffusers package) runs one-shot and multi-step, and one whose output shape differs from its input exits 2
before anything is written; the block validates and a bad value names the field."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor
from typer.testing import CliRunner

from mlaudit.certify import ddpm_timestep
from mlaudit.cli import app
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.base import config_to_dict

SMALL: dict[str, Any] = {"kind": "certify", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 4},
                         "sigma": 0.25, "n0": 20, "n": 200, "predict_n": 100, "alpha": 0.01, "radii": [0, 0.25],
                         "examples": 40, "seed": 0}
DNCNN = {"kind": "dncnn", "epochs": 5, "width": 16, "depth": 4}


def go(config: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True, **kw).results


def test_dncnn_denoiser_certifies_f_of_d_beside_f_alone(tmp_path: Path) -> None:
    r = go({**SMALL, "denoiser": DNCNN}, tmp_path / "den")
    m = r["metrics"]
    assert r["config"]["recipe"]["noise_sigma"] == 0.0 == m["train_noise_sigma"]  # f off the shelf: no noise
    assert r["config"]["denoiser"] == {"kind": "dncnn", "depth": 4, "width": 16, "batch_norm": True, "epochs": 5,
                                       "batch_size": 128, "lr": 0.001, "objective": "mse"}
    d = m["denoiser"]
    assert len(d["train_loss_mse"]) == 5 and d["resumed"] is False and d["parameters"] > 0
    assert d["mse_denoised"] < 0.6 * d["mse_noisy"] and d["mse_noisy"] == pytest.approx(0.0625, rel=0.1)
    # f alone is exactly the run without a denoiser (same model, same noise draws)
    plain = go({**SMALL, "recipe": {"name": "fast", "epochs": 4, "noise_sigma": 0}}, tmp_path / "plain")["metrics"]
    for key in ("certified_accuracy", "smoothed_accuracy", "clean_accuracy", "abstention_rate"):
        assert m["without_denoiser"][key] == plain[key]
    assert set(m["without_denoiser"]) == set(plain) - {"max_certifiable_radius", "sigma", "alpha", "n0", "n",
                                                         "predict_n", "radii", "examples", "train_noise_sigma"}
    assert m["certified_accuracy"]["0.25"]["value"] >= plain["certified_accuracy"]["0.25"]["value"]
    assert "no denoiser certified@0.25" in r["trials"][0] and r["trials"][0]["denoiser"] == "dncnn"
    html = (tmp_path / "den" / "report.html").read_text()
    assert "certified accuracy, f(D(.)), DnCNN (mse)" in html and "certified accuracy, f alone (no denoiser)" in html
    assert "The denoiser" in html and html.count("data:image/png") == 1
    again = go({**SMALL, "denoiser": DNCNN}, tmp_path / "den", resume=True)["metrics"]
    assert again["denoiser"]["resumed"] is True and again["certified_accuracy"] == m["certified_accuracy"]
    assert again["denoiser"]["train_loss_mse"] == d["train_loss_mse"]


def test_mse_then_stability_trains_both_stages_reproducibly(tmp_path: Path) -> None:
    cfg = {**SMALL, "examples": 10, "denoiser": {**DNCNN, "epochs": 1, "objective": "mse+stability"}}
    d = go(cfg, tmp_path / "o")["metrics"]["denoiser"]
    assert len(d["train_loss_mse"]) == 1 and len(d["train_loss_stability"]) == 1
    torch.manual_seed(123)  # the denoiser's weights and noise come from the config's seed, not the global generator
    again = go(cfg, tmp_path / "again")["metrics"]["denoiser"]
    assert again["train_loss_stability"] == d["train_loss_stability"] and again["mse_denoised"] == d["mse_denoised"]


class TinyEps(torch.nn.Module):
    """A diffusers-shaped noise predictor: unet(x_t, t) -> object with .sample (a 1x1 conv, untrained)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.calls: list[int] = []

    def forward(self, x_t: Tensor, t: Tensor) -> Any:
        self.calls.append(int(t[0]))
        return types.SimpleNamespace(sample=0.1 * self.conv(x_t))


@pytest.mark.parametrize("steps", [1, 3])
def test_ddpm_denoiser_through_a_diffusers_shaped_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           steps: int) -> None:
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    unet, loaded = TinyEps(), []

    class DiffusionPipeline:
        @staticmethod
        def from_pretrained(path: str, **kw: Any) -> Any:
            loaded.append((path, kw))
            return types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(alphas_cumprod=abar, config={}))

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(DiffusionPipeline=DiffusionPipeline))
    (tmp_path / "ddpm").mkdir()
    cfg = {**SMALL, "examples": 10, "denoiser": {"kind": "ddpm", "path": str(tmp_path / "ddpm"), "steps": steps}}
    m = go(cfg, tmp_path / "o")["metrics"]
    d = m["denoiser"]
    t_star = ddpm_timestep(abar, 0.5)  # sigma 0.25 on [0, 1] data is 0.5 on the model's [-1, 1]
    assert (d["t_star"], d["model_calls"], d["model_sigma"], d["timesteps"]) == (t_star, steps, 0.5, 1000)
    assert d["sigma_at_t_star"] == pytest.approx(0.5, rel=0.01)
    # loaded twice, local files only: by the check before anything is written (its shape probe), then by the run
    assert loaded == [(str(tmp_path / "ddpm"), {"local_files_only": True, "use_safetensors": True})] * 2
    assert unet.calls[0] == t_star and (steps == 1 or unet.calls[steps - 1] == 0)
    assert m["throughput"]["certified_per_s"] > 0 and "without_denoiser" in m


def test_a_ddpm_whose_output_shape_differs_exits_2_naming_the_denoiser(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    class Pooling(TinyEps):  # predicts noise at half the resolution: not the input's shape
        def forward(self, x_t: Tensor, t: Tensor) -> Any:
            self.calls.append(int(t[0]))
            return types.SimpleNamespace(sample=torch.nn.functional.avg_pool2d(x_t, 2))

    unet = Pooling()
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(alphas_cumprod=abar, config={}))
    fake = types.SimpleNamespace(DiffusionPipeline=types.SimpleNamespace(from_pretrained=lambda *a, **k: pipe))
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    (tmp_path / "ddpm").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(copy.deepcopy(SMALL) | {"denoiser": {"kind": "ddpm", "path": str(tmp_path / "ddpm")}}))
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--device", "cpu",
                                   "--store", str(tmp_path / "runs.db")])
    assert res.exit_code == 2, res.output
    for w in ("denoiser (the DDPM in", "cannot denoise inputs of shape [2, 1, 8, 8]", "returned shape [2, 1, 4, 4]"):
        assert w in res.stderr, res.stderr
    assert unet.calls == [ddpm_timestep(abar, 0.5)]  # one probe call, no training, nothing written
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()


def test_the_denoiser_block_validates_and_round_trips() -> None:
    cfg = parse_config({**SMALL, "denoiser": "dncnn"})
    assert cfg.denoiser is not None and cfg.denoiser.kind == "dncnn" and cfg.denoiser.epochs == 20
    assert cfg.recipe.noise_sigma == 0.0  # with a denoiser f is trained without noise unless the recipe says
    assert parse_config(config_to_dict(cfg)) == cfg
    noisy = parse_config({**SMALL, "recipe": {"name": "fast", "noise_sigma": 0.25}, "denoiser": "dncnn"})
    assert noisy.recipe.noise_sigma == 0.25
    ddpm = parse_config({**SMALL, "denoiser": {"kind": "ddpm", "path": "m", "steps": 4, "data_range": None}})
    assert ddpm.denoiser is not None and ddpm.denoiser.kind == "ddpm" and ddpm.denoiser.data_range is None
    assert parse_config(config_to_dict(ddpm)) == ddpm
    assert parse_config({**SMALL, "denoiser": {"kind": "ddpm", "path": "m"}}).denoiser.data_range == (0.0, 1.0)


@pytest.mark.parametrize(("block", "words"), [
    ({"kind": "dncnn", "epochs": 0}, ["denoiser.epochs", "got 0", "1 <= denoiser.epochs <= 10000"]),
    ({"kind": "dncnn", "lr": -1}, ["denoiser.lr", "got -1"]),
    ({"kind": "dncnn", "depth": 1}, ["denoiser.depth", "2 <= denoiser.depth"]),
    ({"kind": "dncnn", "objective": "l1"}, ["denoiser.objective", "'mse', 'stability' or 'mse+stability'"]),
    ({"kind": "dncnn", "path": "m"}, ["denoiser.path", "Extra inputs are not permitted"]),
    ({"kind": "bm3d"}, ["denoiser.kind = 'bm3d' is not a denoiser", "valid: dncnn, ddpm"]),
    ({"epochs": 3}, ["denoiser.kind = None is not a denoiser"]),
    ({"kind": "ddpm"}, ["denoiser.path", "Field required"]),
    ({"kind": "ddpm", "path": "m", "steps": 0}, ["denoiser.steps", "1 <= denoiser.steps"]),
    ({"kind": "ddpm", "path": "m", "data_range": [1, 0]}, ["denoiser.data_range must be [lo, hi] with lo < hi"]),
    ({"kind": "ddpm", "path": "m", "epochs": 3}, ["denoiser.epochs", "Extra inputs"]),
])
def test_a_bad_denoiser_value_names_the_field(block: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**SMALL, "denoiser": block})
    for w in words:
        assert w in str(e.value), str(e.value)


def test_bad_ddpm_setups_exit_2_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not installed
    (tmp_path / "ddpm").mkdir()
    cases = [({"kind": "ddpm", "path": str(tmp_path / "nowhere")}, ["denoiser.path", "is not a folder"]),
             ({"kind": "ddpm", "path": str(tmp_path / "ddpm")}, ["optional package 'diffusers'", "pip install diffusers"]),
             ({"kind": "dncnn", "epochs": 0}, ["denoiser.epochs", "got 0"])]
    for i, (block, words) in enumerate(cases):
        cfg = tmp_path / f"bad{i}.yaml"
        cfg.write_text(yaml.safe_dump(copy.deepcopy(SMALL) | {"denoiser": block}))
        res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--device", "cpu",
                                       "--store", str(tmp_path / "runs.db")])
        assert res.exit_code == 2, res.output
        for w in words:
            assert w in res.stderr, res.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
    assert json.loads(json.dumps(SMALL)) == SMALL  # the shared config was not modified
