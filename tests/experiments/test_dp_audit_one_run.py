"""``dp-audit`` with ``design: one-run`` (Steinke, Nasr & Jagielski 2023): a deliberately broken DP-SGD is
refuted from one training run where single examples are visible (high-dimensional data), the correct one
is not; the kind's config runs end to end through the CLI on digits (results, report, resume, growing
``runs``); bad input exits 2 before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.audit.one_run import audit, default_choices, draw_inclusion
from mlaudit.cli import app
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment

CONFIG = """\
kind: dp-audit
design: one-run
dataset: digits
model: logistic
recipe: {name: fast, dp: {epsilon: 1.0, delta: 1.0e-5, clip: 1.0}}
canary: mislabeled
canaries: 1000
guesses: sweep
runs: 1
confidence: 0.95
seed: 0
"""

# 1000 examples of 2000 features: a linear model has a direction of its own for every example, so one
# example's presence shows in one run when the noise is too small (broken) and hides when it is right
HIGH_DIM = {"kind": "dp-audit", "design": "one-run", "model": "logistic", "canaries": 500, "seed": 0,
            "dataset": {"name": "synthetic", "options": {"n_train": 1000, "n_test": 200, "shape": [2000],
                                                         "num_classes": 4, "noise": 1.0}},
            "recipe": {"name": "fast", "epochs": 30, "lr": 0.5, "schedule": "constant", "momentum": 0.0,
                       "weight_decay": 0.0, "dp": {"epsilon": 1.0, "delta": 1.0e-5, "clip": 1.0}}}


def run(cfg: dict[str, Any], tmp_path: Path, name: str = "o") -> dict[str, Any]:
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "s.db", quiet=True).results


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("score", "runs", "at_least"), [("loss", 1, 1.5), ("gradient", 2, 1.4)])
def test_broken_dpsgd_is_refuted_from_one_run(tmp_path: Path, score: str, runs: int, at_least: float) -> None:
    """noise-over-batch claiming eps = 1, 500 mislabeled canaries, logistic regression on 2000-dimensional
    synthetic data (about 2 s a model on CPU). Black box, one model: 60 of 62 guesses right at k = 31 ->
    eps_LB 1.84. White box, two models pooled: 62 of 64 at k = 16 -> 1.85 (one model: 55 of 62, 1.10, one
    wrong guess from 1.0). The correct DP-SGD in the same settings: 0.23 and 0.20."""
    m = run(HIGH_DIM | {"broken": "noise-over-batch", "score": score, "runs": runs}, tmp_path)["metrics"]
    assert m["design"] == "one-run" and m["models"] == runs and m["m"] == 500 * runs and m["claimed_epsilon"] == 1.0
    assert m["epsilon_lower_bound"] > at_least > m["claimed_epsilon"] and m["claim_refuted"] is True
    assert m["accountant_epsilon"] <= 1.0 + 1e-6 and m["broken"] == "noise-over-batch"
    ok = run(HIGH_DIM | {"score": score, "runs": runs}, tmp_path, "ok")["metrics"]
    assert ok["epsilon_lower_bound"] < 0.5 and ok["claim_refuted"] is False


DIRAC = {"kind": "dp-audit", "design": "one-run", "dataset": "digits", "model": {"name": "mlp", "width": 64, "norm": "none"},
         "canary": "dirac", "canaries": 150, "seed": 0,
         "recipe": {"name": "fast", "dp": {"epsilon": 1.0, "delta": 1.0e-5, "clip": 1.0}}}


def test_dirac_canaries_refute_a_broken_dpsgd_from_one_run_on_digits(tmp_path: Path) -> None:
    """m Dirac gradient canaries in one run (white box), on coordinates no digits example touches (the
    first-layer weights of always-blank pixels): the noise-over-batch fixture claiming eps = 1 is refuted
    from one model; the correct DP-SGD is not, and its in-canaries still score lower on average."""
    bad = run(DIRAC | {"broken": "noise-over-batch"}, tmp_path)["metrics"]
    assert bad["canary"]["type"] == "dirac" and bad["canary"]["max_gradient_energy"] == 0.0
    assert bad["score"] == "gradient" and bad["models"] == 1 and bad["m"] == 150
    assert bad["claim_refuted"] is True and bad["epsilon_lower_bound"] > 1.0
    ok = run(DIRAC, tmp_path, "ok")["metrics"]
    assert ok["claim_refuted"] is False and ok["epsilon_lower_bound"] < 1.0
    assert ok["canary_score_in"]["mean"] < ok["canary_score_out"]["mean"]


def test_dirac_canary_set_takes_distinct_least_energy_coordinates() -> None:
    from mlaudit.audit.canaries import CANARY_SETS
    from mlaudit.data import load_dataset
    from mlaudit.models import build_model

    data = load_dataset("digits")
    cs = CANARY_SETS.get("dirac")(data.train, m=40, seed=0, model_fn=lambda: build_model(
        {"name": "mlp", "width": 16, "norm": "none"}, input_shape=data.input_shape, num_classes=10))
    keys = {(g.parameter, g.coordinate) for g in cs.gradients}
    assert len(cs) == 40 and len(keys) == 40 and [g.index for g in cs.gradients] == list(range(40))
    assert cs.details["max_gradient_energy"] <= cs.details["mean_gradient_energy"]
    with pytest.raises(ConfigError, match="trainer: mlaudit"):
        CANARY_SETS.get("dirac")(data.train, m=4, seed=0)


def test_one_run_config_end_to_end_through_the_cli(tmp_path: Path) -> None:
    """The digits config through `mlaudit run`: one model with 1000 mislabeled canaries (one second on CPU);
    the metrics, the artifacts and the report's verdict; the bound is what mlaudit.audit.one_run gives
    on the kept scores; a resume trains nothing; growing runs 1 -> 2 equals a fresh 2-run audit (one model
    per chunk, so that both train run 1 bitwise alike)."""
    cfg = tmp_path / "one.yaml"
    cfg.write_text(CONFIG)
    common = ("--device", "cpu", "--quiet", "--store", tmp_path / "s.db")
    res = cli("run", cfg, "--out", tmp_path / "o", "--set", "factory.max_chunk=1", *common)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    m = results["metrics"]
    for key in ("m", "r", "v", "k_pos", "k_neg", "epsilon_lower_bound", "best_possible_lower_bound",
                "claimed_epsilon", "accountant_epsilon", "confidence", "sweep", "level", "sample_rate"):
        assert key in m, key
    assert (m["canaries"], m["runs"], m["models"], m["m"], m["claimed_epsilon"]) == (1000, 1, 1, 1000, 1.0)
    assert m["epsilon_lower_bound"] <= m["claimed_epsilon"] and not m["claim_refuted"]
    assert len(m["sweep"]) == 7 and m["level"] == pytest.approx(1 - 0.05 / 7)
    assert m["best_possible_lower_bound"] > 5.0  # all 1000 guesses right could show it
    kept = np.load(tmp_path / "o" / "artifacts" / "canary_scores.npz")
    assert kept["score"].shape == (1, 1000) and (kept["included"][0] == draw_inclusion(1000, seed=0)).all()
    again = audit(-kept["score"], kept["included"], choices=default_choices(1000), delta=1e-5, confidence=0.95)
    assert (again.epsilon_lower_bound, again.r, again.v) == (m["epsilon_lower_bound"], m["r"], m["v"])
    assert m["included"] == int(kept["included"].sum()) == results["trials"][0]["included"]
    report = (tmp_path / "o" / "report.html").read_text()
    assert "one-run eps lower bound" in report and "vs claimed 1" in report and "One-run guesses" in report

    res = cli("run", "--resume", tmp_path / "o", *common)
    assert res.exit_code == 0, res.output
    resumed = json.loads((tmp_path / "o" / "results.json").read_text())
    assert resumed["cost"]["models_trained"] == 0 and resumed["metrics"]["v"] == m["v"]

    res = cli("run", "--resume", tmp_path / "o", "--grow", "--set", "runs=2", *common)
    assert res.exit_code == 0, res.output
    grown = json.loads((tmp_path / "o" / "results.json").read_text())
    assert (grown["cost"]["models_trained"], grown["cost"]["models_resumed"]) == (1, 1)
    assert grown["grown_from"] == {"runs": 1} and grown["metrics"]["m"] == 2000
    res = cli("run", cfg, "--out", tmp_path / "f", "--set", "runs=2", "--set", "factory.max_chunk=1", *common)
    assert res.exit_code == 0, res.output
    fresh = json.loads((tmp_path / "f" / "results.json").read_text())["metrics"]
    for key in ("epsilon_lower_bound", "r", "v", "k_pos", "sweep", "canary_score_in", "canary_score_out"):
        assert grown["metrics"][key] == fresh[key], key


@pytest.mark.parametrize(("sets", "words"), [
    (["canaries=0"], ["canaries", "got 0", "1 <= canaries"]),
    (["guesses.k_pos=900", "guesses.k_neg=200"], ["k_pos + k_neg = 900 + 200 = 1100", "<= canaries = 1000"]),
    (["confidence=1.0"], ["confidence", "got 1.0", "0.0 < confidence < 1.0"]),
    (["confidence=0"], ["confidence", "got 0", "0.0 < confidence < 1.0"]),
    (["canaries=5000"], ["canaries = 5000", "training split has 1438", "1 <= canaries <= 1438"]),
    (["canaries=3"], ["canaries = 3", "too few", "k_pos + k_neg >= 5"]),
    (["canary=gradient"], ["canary = 'gradient' has no one-run version", "mislabeled", "canary dirac"]),
    (["canary=dirac", "score=loss"], ["canary dirac has no input whose loss could be measured"]),
    (["canary=dirac", "design=game"], ["canary dirac is the one-run audit's m Dirac canaries"]),
    (["runs=0"], ["runs", "got 0"]),
    (["design=game"], ["canaries = 1000", "belong to design: one-run"]),
])
def test_bad_input_exits_2_before_writing(tmp_path: Path, sets: list[str], words: list[str]) -> None:
    cfg = tmp_path / "one.yaml"
    cfg.write_text(CONFIG.replace("guesses: sweep", "guesses: {k_pos: 10, k_neg: 10}") if "guesses" in sets[0]
                   else CONFIG)
    res = cli("run", cfg, "--out", tmp_path / "o", "--device", "cpu", "--store", tmp_path / "s.db",
              *[a for s in sets for a in ("--set", s)])
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.db").exists()


def test_config_defaults_and_the_game_unchanged() -> None:
    raw = yaml.safe_load(CONFIG)
    del raw["guesses"], raw["runs"]
    cfg = parse_config(raw)
    assert (cfg.guesses, cfg.runs, cfg.resolved_score) == ("sweep", 1, "loss")
    assert cfg.guess_choices == default_choices(1000)
    fixed = parse_config(raw | {"guesses": {"k_pos": 50, "k_neg": 0}})
    assert fixed.guess_choices == ((50, 0),)
    assert fixed.one_run_best_reachable() < cfg.one_run_best_reachable()
    game = parse_config({k: v for k, v in raw.items() if k not in ("design", "canaries")})
    assert (game.design, game.canaries, game.guesses, game.runs) == ("game", None, None, None)
    with pytest.raises(ConfigError, match="delta.*2 x canaries x runs x delta <= 1"):
        parse_config(raw | {"canaries": 1000, "runs": 60})
