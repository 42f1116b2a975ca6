"""Errors before writing (issue 21): a DP recipe on a BatchNorm model, a DP target epsilon that is
infinite or unreachable, and a poisoning budget that rounds to zero poisons are refused by the
runner's preflight or the kind's check hook, before config.yaml, the output folder or the run
store exists; the CLI exits with code 2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.experiments import run_experiment

VEC = {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [12]}}
IMG = {"name": "synthetic", "options": {"n_train": 96, "n_test": 48, "shape": [3, 8, 8]}}
BN = {"name": "resnet18", "width": 4}  # BatchNorm by default
PLAIN = {"name": "mlp", "norm": "none"}


def dp(**dp_fields: Any) -> dict[str, Any]:
    return {"name": "fast", "epochs": 1, "batch_size": 32, "dp": {"clip": 1.0, **dp_fields}}


KINDS: dict[str, dict[str, Any]] = {
    "train": {"kind": "train", "trials": 1},
    "membership-inference": {"kind": "membership-inference", "pool": {"models": 4, "keep": 0.5}, "attacks": ["loss"]},
    "availability-poison": {"kind": "availability-poison", "victims": 1, "attack": {"method": "random-noise", "eps": 8}},
    "targeted-poison": {"kind": "targeted-poison", "scenarios": 1, "victims": 1,
                        "attack": {"method": "label-flip", "budget": 0.05}},
    "indiscriminate-poison": {"kind": "indiscriminate-poison", "victims": 1,
                              "attack": {"method": "label-flip", "eps_d": 0.1}},
    "dp-audit": {"kind": "dp-audit", "models_per_side": 11},
}


def refused(cfg: dict[str, Any], tmp_path: Path, error: type[Exception], match: str) -> None:
    out, db = tmp_path / "out", tmp_path / "runs.db"
    with pytest.raises(error, match=match):
        run_experiment(cfg, out=out, device="cpu", store=db, quiet=True)
    assert not out.exists() and not db.exists() and not Path(os.environ["MLAUDIT_STORE"]).exists()


@pytest.mark.parametrize("kind", ["train", "membership-inference", "availability-poison", "targeted-poison",
                                  "indiscriminate-poison", "dp-audit"])
def test_dp_on_a_batchnorm_model_is_refused_before_writing(tmp_path: Path, kind: str) -> None:
    cfg = {**KINDS[kind], "model": BN, "dataset": IMG, "recipe": dp(epsilon=8)}
    where = "" if kind == "dp-audit" else r"recipe.dp with model 'resnet18' \(norm 'batch'\): "
    refused(cfg, tmp_path, UnsupportedModelError, where + "DP-SGD cannot train a model with BatchNorm")


def test_a_dp_victim_recipe_on_a_batchnorm_victim_is_refused(tmp_path: Path) -> None:
    cfg = {**KINDS["targeted-poison"], "model": PLAIN, "dataset": IMG, "recipe": {"name": "fast", "epochs": 1},
           "victim": {"model": BN, "recipe": dp(noise_multiplier=1.0)}}
    refused(cfg, tmp_path, UnsupportedModelError, r"victim.recipe.dp with model 'resnet18'")


@pytest.mark.parametrize("kind", ["train", "membership-inference", "availability-poison", "indiscriminate-poison",
                                  "dp-audit"])
@pytest.mark.parametrize("eps, match", [
    (float("inf"), r"recipe.dp.epsilon = inf: a target epsilon must be a finite number > 0"),
    (1e-12, r"recipe.dp.epsilon = 1e-12 cannot be reached: with q = .*even sigma = 10000 gives epsilon 0.\d+; "
            r"ask for epsilon >= 0.\d+"),
])
def test_an_unreachable_dp_epsilon_is_refused_before_writing(tmp_path: Path, kind: str, eps: float, match: str) -> None:
    refused({**KINDS[kind], "model": PLAIN, "dataset": VEC, "recipe": dp(epsilon=eps)}, tmp_path, ConfigError, match)


def test_a_poisoning_budget_under_one_poison_is_refused_before_writing(tmp_path: Path) -> None:
    cfg = {**KINDS["targeted-poison"], "model": PLAIN, "dataset": VEC, "recipe": {"name": "fast", "epochs": 1}}
    cfg["attack"] = {"method": "label-flip", "budget": 0.004}  # 0.38 of 96 examples
    refused(cfg, tmp_path, ConfigError, r"attack.budget = 0.004 of 96 training examples rounds to 0 poisons; "
                                        r"use budget >= 1/N = 0.0104")
    cfg = {**KINDS["availability-poison"], "model": PLAIN, "dataset": VEC, "recipe": "fast"}
    cfg["attack"] = {**cfg["attack"], "fraction": 0.004}
    refused(cfg, tmp_path, ConfigError, r"attack.fraction = 0.004 of 96 training examples poisons none")
    cfg = {**KINDS["indiscriminate-poison"], "model": PLAIN, "dataset": VEC, "recipe": "fast"}
    cfg["attack"] = {"method": "label-flip", "eps_d": 0.004}
    refused(cfg, tmp_path, ConfigError, r"attack.eps_d: eps_d = 0.004 of 96 training examples rounds to 0")


@pytest.mark.parametrize("recipe, model, match", [
    (dp(epsilon=8), BN, "DP-SGD cannot train a model with BatchNorm"),
    (dp(epsilon=1e-12), PLAIN, "cannot be reached"),
    (dp(epsilon=".inf"), PLAIN, "a target epsilon must be a finite number"),
])
def test_the_cli_exits_2_and_writes_nothing(tmp_path: Path, recipe: dict, model: dict, match: str) -> None:
    cfg = tmp_path / "c.yaml"
    text = yaml.safe_dump({**KINDS["train"], "model": model, "dataset": IMG, "recipe": recipe})
    cfg.write_text(text.replace("'.inf'", ".inf"))
    out, db = tmp_path / "out", tmp_path / "runs.db"
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "--store", str(db), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists() and not db.exists()
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "--store", str(db), "--device", "cpu"])
    assert r.exit_code == 2 and "already holds" not in r.output  # refused the same way again, not as a used folder


def test_a_reachable_dp_recipe_still_runs(tmp_path: Path) -> None:
    cfg = {**KINDS["train"], "model": PLAIN, "dataset": VEC, "recipe": dp(epsilon=8)}
    res = run_experiment(cfg, out=tmp_path / "out", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert res.results["trials"][0]["dp_epsilon"] <= 8
