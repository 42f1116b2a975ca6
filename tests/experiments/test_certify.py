"""Experiment kind ``certify`` (randomized smoothing, Cohen et al. 2019): the example config end to end through
the CLI (metrics, intervals, headline, report with the verdict first and the curve; per-example
certificates in artifacts/certificates.npz that redraw the table); an external target
checkpoint gives the run's own numbers; the user's nn.Module (and trainer) as import strings; the model is
noise-trained at sigma unless the recipe says otherwise; bad input exits 2 before anything is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.special import ndtri
from typer.testing import CliRunner

from mlaudit.certify import max_radius
from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.errors import ConfigError, DataError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.base import config_to_dict
from mlaudit.headline import headline
from mlaudit.train.checkpoint import sha256_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "certify.yaml"
SMALL: dict[str, Any] = {"kind": "certify", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 4},
                         "sigma": 0.25, "n0": 20, "n": 200, "predict_n": 100, "alpha": 0.01, "radii": [0, 0.25],
                         "examples": 40, "seed": 0}


def cli(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["run", *args, "--device", "cpu", "--store", str(tmp_path / "runs.db")])


def go(config: dict[str, Any], out: Path) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True).results


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("certify")
    res = cli(tmp, str(EXAMPLE), "--out", str(tmp / "run"))
    assert res.exit_code == 0, res.output
    return tmp / "run", json.loads((tmp / "run" / "results.json").read_text())


def test_example_config_runs_end_to_end_through_the_cli(example_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = example_run
    m, cfg = r["metrics"], load_yaml(EXAMPLE)
    assert r["config"]["recipe"]["noise_sigma"] == cfg["sigma"] == m["train_noise_sigma"]  # noise-trained at sigma
    assert (m["n0"], m["n"], m["predict_n"], m["examples"]) == (cfg["n0"], cfg["n"], cfg["predict_n"], cfg["examples"])
    acc = [m["certified_accuracy"][f"{r:g}"] for r in cfg["radii"]]
    values = [a["value"] for a in acc]
    assert values == sorted(values, reverse=True) and values[0] > 0.8  # falls with the radius
    assert all(a["method"] == "clopper-pearson" and a["lo"] <= a["value"] <= a["hi"] for a in acc)
    assert values[-1] == 0.0 and cfg["radii"][-1] > m["max_certifiable_radius"]  # beyond what n can certify
    assert m["max_certifiable_radius"] == pytest.approx(max_radius(sigma=0.25, n=cfg["n"], alpha=cfg["alpha"]))
    assert m["certified_at_radius"]["radius"] == cfg["radii"][1] and m["certified_at_radius"]["value"] == values[1]
    assert values[0] + m["abstention_rate"]["value"] + m["certified_incorrect"]["value"] == pytest.approx(1.0)
    assert m["clean_accuracy"]["value"] > 0.9 and m["smoothed_accuracy"]["value"] > 0.85
    t = m["throughput"]
    assert t["certified_per_s"] > 0 and t["n"] == cfg["n"] and t["forwards_per_s"] == pytest.approx(
        t["certified_per_s"] * (cfg["n0"] + cfg["n"]))
    assert r["trials"][0]["trial_id"] == "model-0000" and r["cost"]["models_trained"] == 1
    text = headline("certify", {"certified_at_radius.value": values[1], "certified_at_radius.radius": 0.1})
    assert text == f"cert {100 * values[1]:.1f}% @r 0.1"
    html = (out / "report.html").read_text()
    verdict = html.index("certified accuracy of the smoothed classifier at the first l2 radius &gt; 0: cert")
    assert verdict < html.index("Certified accuracy vs l2 radius")  # the verdict comes first
    assert html.count("data:image/png") == 1 and "Throughput of CERTIFY" in html


def test_per_example_certificates_redraw_the_curve(example_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = example_run
    m, cfg = r["metrics"], load_yaml(EXAMPLE)
    with np.load(out / "artifacts" / "certificates.npz") as a:
        c = {k: a[k] for k in a.files}
    assert sorted(c) == ["label", "pa_lower", "prediction", "radius", "rows"]
    assert all(v.shape == (cfg["examples"],) for v in c.values())
    assert np.all(np.diff(c["rows"]) > 0) and np.all(c["rows"] < 359)  # distinct test rows, in split order
    abstained = c["prediction"] < 0
    assert abstained.mean() == pytest.approx(m["abstention_rate"]["value"]) and np.all(c["radius"][abstained] == 0)
    assert np.all(c["pa_lower"][~abstained] > 0.5)
    # Cohen's radius from each pA_lower
    assert np.allclose(c["radius"][~abstained], cfg["sigma"] * ndtri(c["pa_lower"][~abstained]))
    for rad in cfg["radii"]:  # the table's radii, recomputed from the per-example certificates
        k = int(((c["prediction"] == c["label"]) & (c["radius"] >= rad)).sum())
        assert k == m["certified_accuracy"][f"{rad:g}"]["k"], rad


def test_target_checkpoint_reproduces_the_runs_certificates(example_run: tuple[Path, dict[str, Any]],
                                                            tmp_path: Path) -> None:
    out, r = example_run
    ckpt = out / "artifacts" / "models" / "model-0000.pt"
    cfg = {**load_yaml(EXAMPLE), "target": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt)}}
    t = go(cfg, tmp_path / "target")
    assert t["metrics"]["certified_accuracy"] == r["metrics"]["certified_accuracy"]
    assert t["metrics"]["smoothed_accuracy"] == r["metrics"]["smoothed_accuracy"]
    assert t["metrics"]["train_noise_sigma"] is None and t["cost"]["models_trained"] == 0


def test_resuming_a_finished_run_trains_nothing_and_certifies_the_same(example_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = example_run
    res = cli(out.parent, "--resume", str(out))
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["cost"]["models_trained"] == 0 and again["cost"]["models_resumed"] == 1
    assert again["metrics"]["certified_accuracy"] == r["metrics"]["certified_accuracy"]


USER = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.body(x)


def fit(model, train_set, *, seed, device):
    x, y = (t.to(device) for t in train_set.tensors)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator(device=device).manual_seed(seed)
    for _ in range(60):
        opt.zero_grad()
        noisy = x + 0.25 * torch.randn(x.shape, generator=g, device=device)
        nn.functional.cross_entropy(model(noisy), y).backward()
        opt.step()
    return model
'''


@pytest.mark.parametrize("trainer", ["mlaudit", "fit"])
def test_the_users_module_and_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: str) -> None:
    (tmp_path / "cert_user.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**SMALL, "model": "cert_user:Net", **({"trainer": "cert_user:fit"} if trainer == "fit" else {})}
    r = go(cfg, tmp_path / "o")
    assert r["config"]["model"]["name"] == "cert_user:Net"
    assert r["config"]["recipe"]["noise_sigma"] == (0.25 if trainer == "mlaudit" else 0.0)  # the user adds their own
    assert r["metrics"]["certified_accuracy"]["0"]["value"] > 0.6 and r["cost"]["models_trained"] == 1


def test_noise_training_follows_sigma_unless_the_recipe_sets_it() -> None:
    cfg = parse_config({**SMALL, "sigma": 0.5, "recipe": "fast"})
    assert cfg.recipe.noise_sigma == 0.5 and cfg.recipe.epochs == 12
    assert parse_config(config_to_dict(cfg)) == cfg
    plain = parse_config({**SMALL, "recipe": {"name": "fast", "noise_sigma": 0}})
    assert plain.recipe.noise_sigma == 0.0 and parse_config(config_to_dict(plain)) == plain
    other = parse_config({**SMALL, "recipe": {"name": "fast", "noise_sigma": 0.12}})
    assert other.recipe.noise_sigma == 0.12
    assert parse_config({**SMALL, "target": {"checkpoint": "m.pt"}}).recipe.noise_sigma == 0.0  # nothing trained


def _bad(**change: Any) -> dict[str, Any]:
    return copy.deepcopy(SMALL) | change


@pytest.mark.parametrize(("change", "words"), [
    ({"sigma": 0}, ["sigma", "got 0", "0.0 < sigma"]),
    ({"sigma": -0.5}, ["sigma", "got -0.5"]),
    ({"sigma": ".inf"}, ["sigma"]),
    ({"alpha": 0}, ["alpha", "0.0 < alpha < 1.0"]),
    ({"alpha": 1.0}, ["alpha", "got 1.0", "0.0 < alpha < 1.0"]),
    ({"n0": 200}, ["n0 = 200 must be smaller than n = 200", "1 <= n0 < n"]),
    ({"n0": 0}, ["n0", "1 <= n0"]),
    ({"n": 6, "n0": 1, "alpha": 0.01}, ["n = 6 is too small for any certificate at alpha = 0.01",
                                        "the smallest n that can certify is 7"]),
    ({"n": 9, "n0": 2, "alpha": 0.001, "predict_n": 20}, ["n = 9 is too small", "smallest n that can certify is 10"]),
    ({"predict_n": 7}, ["predict_n = 7 is too small for PREDICT", "allowed predict_n >= 8"]),
    ({"radii": [0, -0.25]}, ["radii must be finite and >= 0", "-0.25"]),
    ({"radii": [0.5, 0.25]}, ["radii must be ascending"]),
    ({"radii": []}, ["radii must list at least one"]),
    ({"examples": 100_000}, ["examples = 100000 exceeds the 359 examples", "test split"]),
    ({"batch_size": 0}, ["batch_size", "1 <= batch_size"]),
    ({"recipe": {"name": "fast", "noise_sigma": -1}}, ["recipe.noise_sigma", "got -1"]),
    ({"recipe": {"name": "fast", "noise_sigma": 0.25}, "trainer": "pkg.mod:fit"}, ["recipe.noise_sigma = 0.25"]),
    ({"target": {"checkpoint": "/nonexistent/model.pt"}}, ["/nonexistent/model.pt"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, change: dict[str, Any], words: list[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_bad(**change)).replace("'.inf'", ".inf"))
    res = cli(tmp_path, str(cfg), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
    with pytest.raises((ConfigError, DataError)):
        run_experiment(load_yaml(cfg), out=tmp_path / "out2", device="cpu", store=tmp_path / "r2.db", quiet=True)
    assert not (tmp_path / "out2").exists()
