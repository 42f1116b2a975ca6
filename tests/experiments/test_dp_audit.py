"""Experiment kind ``dp-audit``: a deliberately broken DP-SGD is caught (lower bound above its
claim), correct DP-SGD (mlaudit's and a user's) stays below its claim, the contract YAML runs, and
bad input (too few models, bad trainer path, no claim, no dp, BatchNorm) is refused before anything
is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.audit.game import models_needed
from mlaudit.cli import app
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.stats import eps_lower_bound
from mlaudit.train.checkpoint import sha256_file

CONTRACT = """\
kind: dp-audit
dataset: digits
model: logistic
recipe: {name: fast, dp: {epsilon: 1.0, delta: 1.0e-5, clip: 1.0}}
canary: mislabeled
models_per_side: 100
trainer: mlaudit           # or "package.module:function" for a user's own training function
confidence: 0.95
seed: 0
"""

# Full-batch DP-SGD on a linear model with exact per-example clipping, sigma calibrated by the RDP
# accountant for the claim (q = 1, 30 steps). The "broken" variant divides the noise by the number
# of examples a second time (noise std sigma * C / N instead of sigma * C): a plausible bug.
TRAINERS = '''\
import functools
import torch
from torch import nn
from mlaudit.privacy.accountant import calibrate_noise

CLAIM, DELTA, STEPS, CLIP, LR = 1.0, 1e-5, 30, 1.0, 5.0


@functools.lru_cache
def _sigma():
    return calibrate_noise(target_epsilon=CLAIM, sample_rate=1.0, steps=STEPS, delta=DELTA)


def _dpsgd(dataset, seed, noise_scale):
    x = dataset.x.flatten(1)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    n, k = len(x), len(dataset.classes)
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(k, x.shape[1])
    onehot = nn.functional.one_hot(dataset.y, k).float()
    for _ in range(STEPS):
        r = torch.softmax(x @ w.T, 1) - onehot               # per-example gradient = r_i (outer) x_i
        norms = r.norm(dim=1) * x.norm(dim=1)
        r = r * (CLIP / norms.clamp_min(CLIP)).unsqueeze(1)  # clip each example to norm CLIP
        noise = torch.randn(w.shape, generator=g) * _sigma() * CLIP * noise_scale
        w = w - LR * (r.T @ x + noise) / n
    lin = nn.Linear(x.shape[1] - 1, k)
    with torch.no_grad():
        lin.weight.copy_(w[:, :-1])
        lin.bias.copy_(w[:, -1])
    return nn.Sequential(nn.Flatten(), lin)


def broken(dataset, seed):
    return _dpsgd(dataset, seed, 1.0 / len(dataset))


def correct(dataset, seed):
    return _dpsgd(dataset, seed, 1.0)


not_a_function = 3


def Net():
    """The architecture the trainers above build (the config's model names it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''


@pytest.fixture
def trainers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "dpa_user_trainers.py").write_text(TRAINERS)
    monkeypatch.syspath_prepend(str(mod))
    return "dpa_user_trainers"


def user_cfg(fn: str, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": "dp-audit", "dataset": "digits", "model": "dpa_user_trainers:Net",
                           "recipe": "fast", "models_per_side": 40, "trainer": f"dpa_user_trainers:{fn}", "claimed_epsilon": 1.0,
                           "seed": 0}
    cfg.update(changes)
    return cfg


def run(cfg: dict[str, Any], tmp_path: Path, name: str = "o") -> dict[str, Any]:
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "s.db", quiet=True).results


def test_broken_dpsgd_is_caught(trainers: str, tmp_path: Path) -> None:
    """Noise divided by N twice, claiming eps = 1: with 40 models per side the canary loss separates
    the sides perfectly (FP = FN = 0 on 20 + 20 held-out models), so eps_LB = 1.597 > 1.0 at 95%
    confidence (the most 20 + 20 error-free models can show). The same trainer with the correct
    noise gives eps_LB = 0.0 (attack accuracy about chance)."""
    m = run(user_cfg("broken"), tmp_path)["metrics"]
    assert m["claimed_epsilon"] == 1.0 and m["confidence"] == 0.95 and m["models"] == 80
    assert (m["fp"], m["fn"], m["n_neg"], m["n_pos"]) == (0, 0, 20, 20)
    assert m["epsilon_lower_bound"] == pytest.approx(eps_lower_bound(0, 0, 20, 20, delta=1e-5, alpha=0.05))
    assert m["epsilon_lower_bound"] > 1.5 > m["claimed_epsilon"] and m["claim_refuted"] is True
    assert m["canary_loss_in"]["max"] < m["threshold"] < m["canary_loss_out"]["min"]
    assert (tmp_path / "o" / "artifacts" / "canary_losses.npz").is_file()
    assert "Canary loss" in (tmp_path / "o" / "report.html").read_text()

    ok = run(user_cfg("correct", models_per_side=20), tmp_path, "ok")["metrics"]
    assert ok["epsilon_lower_bound"] < 1.0 and ok["claim_refuted"] is False


def test_correct_mlaudit_dpsgd_contract_below_claim(tmp_path: Path) -> None:
    """The contract YAML through the CLI, with models_per_side 100 -> 20 and 3 epochs: mlaudit's own
    DP-SGD calibrated to eps = 1 gives eps_LB = 0.0 <= 1.0 (the best 10 + 10 held-out models could
    show is 0.807), the accountant reports eps <= 1, and q is fixed to 64 / 1438 for both sides."""
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(CONTRACT)
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet",
                                   "--store", str(tmp_path / "s.db"), "--set", "models_per_side=20",
                                   "--set", "recipe.epochs=3"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    m = results["metrics"]
    for key in ("claimed_epsilon", "epsilon_lower_bound", "confidence", "models", "fp", "fn", "threshold",
                "canary_loss_in", "canary_loss_out", "sample_rate", "accountant_epsilon"):
        assert key in m
    assert m["claimed_epsilon"] == 1.0 and m["models"] == 40 and m["confidence"] == 0.95
    assert m["epsilon_lower_bound"] <= m["claimed_epsilon"] and not m["claim_refuted"]
    assert m["accountant_epsilon"] <= 1.0 + 1e-6
    n = len(load_dataset("digits").train)
    assert m["sample_rate"] == pytest.approx(64 / n)
    rows = results["trials"]
    assert len(rows) == 40 and {r["side"] for r in rows} == {"in", "out"}
    assert all(r["dp_epsilon"] <= 1.0 + 1e-6 for r in rows)
    assert not list((tmp_path / "o" / "artifacts" / "models").glob("*.pt"))  # save_models: false
    # resuming reuses the scores kept in the store (the weights are gone) instead of retraining
    res = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "o"), "--device", "cpu", "--quiet",
                                   "--store", str(tmp_path / "s.db")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "o" / "results.json").read_text())
    assert again["cost"]["models_trained"] == 0
    assert again["metrics"]["epsilon_lower_bound"] == m["epsilon_lower_bound"]
    assert again["metrics"]["canary_loss_in"] == m["canary_loss_in"]
    # growing the audit to 30 models per side trains only the 20 new ones; the kept scores are reused,
    # and the grown audit equals a fresh one of 30 per side (model i's seed does not depend on the count)
    res = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "o"), "--device", "cpu", "--quiet", "--grow",
                                   "--store", str(tmp_path / "s.db"), "--set", "models_per_side=30"])
    assert res.exit_code == 0, res.output
    grown = json.loads((tmp_path / "o" / "results.json").read_text())
    assert (grown["cost"]["models_trained"], grown["cost"]["models_resumed"]) == (20, 40)
    assert grown["metrics"]["models"] == 60 and grown["grown_from"] == {"models_per_side": 20}
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "f"), "--device", "cpu", "--quiet",
                                   "--store", str(tmp_path / "s.db"), "--set", "models_per_side=30",
                                   "--set", "recipe.epochs=3"])
    assert res.exit_code == 0, res.output
    fresh = json.loads((tmp_path / "f" / "results.json").read_text())
    for key in ("epsilon_lower_bound", "canary_loss_in", "canary_loss_out", "fp", "fn", "threshold"):
        assert grown["metrics"][key] == fresh["metrics"][key], key


def test_contract_validates() -> None:
    cfg = parse_config(yaml.safe_load(CONTRACT))
    assert cfg.kind == "dp-audit" and cfg.models_per_side == 100 and cfg.trainer == "mlaudit"
    assert cfg.canary == "mislabeled" and cfg.delta == 1e-5 and cfg.recipe.dp.sample_rate is None
    assert cfg.audited_recipe(1000).dp.sample_rate == pytest.approx(64 / 1000)


def test_too_few_models_says_how_many() -> None:
    """At 95% confidence a perfect attack needs 6 held-out models per side (11 per side: the test half is the larger one) for eps_LB >= 0.01."""
    need = models_needed(delta=1e-5, confidence=0.95)
    assert need == 11
    raw = yaml.safe_load(CONTRACT) | {"models_per_side": 10}
    with pytest.raises(ConfigError, match=rf"models_per_side >= {need}\b"):
        parse_config(raw)
    parse_config(raw | {"models_per_side": need})
    with pytest.raises(ConfigError, match=r"models_per_side >= \d+"):
        parse_config(raw | {"models_per_side": 40, "confidence": 0.9999999})


@pytest.mark.parametrize(("trainer", "match"), [
    ("no_such_module_xyz:train", "cannot import module 'no_such_module_xyz'"),
    ("dpa_user_trainers:missing", "module 'dpa_user_trainers' has no attribute 'missing'"),
    ("dpa_user_trainers:not_a_function", "is a int, not a function"),
])
def test_bad_trainer_is_refused_before_writing(trainers: str, tmp_path: Path, trainer: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(user_cfg("x", trainer=trainer), tmp_path)
    assert not (tmp_path / "o").exists()


def test_bad_configs() -> None:
    raw = yaml.safe_load(CONTRACT)
    with pytest.raises(ConfigError, match="trainer must be 'mlaudit'.*'package.module:function'"):
        parse_config(raw | {"trainer": "not a path"})
    with pytest.raises(ConfigError, match="claimed_epsilon"):
        parse_config(raw | {"trainer": "pkg.mod:train"})
    with pytest.raises(ConfigError, match="recipe has no dp"):
        parse_config(raw | {"recipe": "fast"})
    with pytest.raises(ConfigError, match="mislabeled.*crafted.*gradient|crafted.*gradient.*mislabeled"):
        parse_config(raw | {"canary": "sparkle"})


def test_batchnorm_with_dp_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(CONTRACT) | {"model": {"name": "mlp", "norm": "batch"}, "models_per_side": 12}
    with pytest.raises(UnsupportedModelError, match="norm: group"):
        run(raw, tmp_path)
    assert not (tmp_path / "o").exists()


def test_worst_case_init_starts_every_audited_model_from_one_pretrained_model(tmp_path: Path) -> None:
    """worst_case_init (Annamalai & De Cristofaro 2024): one non-private model is trained first (kept in the
    store: a resume does not retrain it) and every audited model starts from its sha256-pinned weights, which
    shows in the audited models' accuracy (DP fine-tuning from a trained model vs DP training from scratch)."""
    base = yaml.safe_load(CONTRACT) | {"models_per_side": 20,
                                        "recipe": {"name": "fast", "epochs": 1, "dp": {"epsilon": 1.0, "delta": 1e-5,
                                                                                       "clip": 1.0}}}
    plain = run_experiment(base, out=tmp_path / "plain", device="cpu", store=tmp_path / "s.db", quiet=True).results
    cfg = base | {"worst_case_init": {"epochs": 3}}
    res = run_experiment(cfg, out=tmp_path / "wc", device="cpu", store=tmp_path / "s.db", quiet=True).results
    init = res["metrics"]["worst_case_init"]
    assert init["epochs"] == 3 and Path(init["checkpoint"]).is_file()
    assert sha256_file(Path(init["checkpoint"])) == init["sha256"]
    acc = [r["test_accuracy"] for r in res["trials"]]
    acc_plain = [r["test_accuracy"] for r in plain["trials"]]
    assert sum(acc) / len(acc) > sum(acc_plain) / len(acc_plain) + 0.05
    again = run_experiment(cfg, out=tmp_path / "wc", device="cpu", store=tmp_path / "s.db", quiet=True, resume=True)
    assert again.results["metrics"]["worst_case_init"]["sha256"] == init["sha256"]


@pytest.mark.parametrize("extra,match", [
    ({"trainer": "os:getcwd", "claimed_epsilon": 1.0}, "worst_case_init .* needs trainer mlaudit"),
    ({"design": "one-run", "canary": "mislabeled", "canaries": 400}, "worst_case_init .* needs design: game"),
    ({"worst_case_init": {"epochs": 0}}, "epochs"),
    ({"worst_case_init": {"epochs": 2, "recipe": {"name": "fast", "dp": {"epsilon": 1.0}}}},
     "worst_case_init.recipe trains the initialisation without privacy"),
    ({"worst_case_init": {"epochs": 2, "recipe": {"name": "fast", "lr": -1}}}, "worst_case_init.recipe.lr"),
])
def test_worst_case_init_bad_input(extra: dict, match: str) -> None:
    raw = yaml.safe_load(CONTRACT) | {"worst_case_init": {"epochs": 2}} | extra
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_last_iterate_audit_full_batch_blank_canary(tmp_path: Path) -> None:
    """The setting of Annamalai & De Cristofaro 2024: full-batch DP-SGD (q = 1, the canary in every step), the
    blank canary, the initialisation pre-trained with its own recipe (worst_case_init.recipe). The canary's
    label is the pre-trained model's least likely class, the steps and q are the recipe's, and the paper's
    estimator (every threshold on all models) is reported beside the held-out bound, never above the best
    one the same counts could give."""
    raw = yaml.safe_load(CONTRACT) | {
        "models_per_side": 12, "canary": "blank",
        "recipe": {"name": "custom", "optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "nesterov": False,
                   "weight_decay": 0.0, "schedule": "constant", "augment": "none", "epochs": 3, "batch_size": 2000,
                   "dp": {"epsilon": 10.0, "delta": 1e-5, "clip": 1.0, "sample_rate": 1.0}},
        "worst_case_init": {"epochs": 2, "recipe": "fast"}}
    res = run_experiment(raw, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True).results
    m = res["metrics"]
    assert m["sample_rate"] == 1.0 and m["gdp"]["steps"] == 3
    assert m["worst_case_init"]["recipe"] == "fast"
    assert m["canary"]["type"] == "blank" and m["canary"]["label_rule"] == "lowest logit of the initial model"
    import torch

    from mlaudit.models import build_model
    init = build_model({"name": "logistic", "init": m["worst_case_init"]["checkpoint"]}, input_shape=(1, 8, 8),
                       num_classes=10)
    assert m["canary"]["label"] == int(init(torch.zeros(1, 1, 8, 8))[0].argmin())
    b = m["gdp_best_threshold_all_models"]
    assert (b["n_pos"], b["n_neg"]) == (12, 12) and b["eps_lower_from_mu"] >= 0.0
