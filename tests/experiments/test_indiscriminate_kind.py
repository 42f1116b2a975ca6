"""Experiment kind ``indiscriminate-poison`` (seed 001): the contract config end to end (metrics,
tau, artifacts, report), a reachable target reached by victims retrained from scratch, label flip
and parameter corruption runs, and bad inputs refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import mlaudit.experiments.indiscriminate  # noqa: F401  (registers the kind)
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment

CONTRACT = """\
kind: indiscriminate-poison
dataset: digits
model: logistic
recipe: fast
attack: {method: gradient-canceling, eps_d: 0.1}              # also label-flip, param-corruption
victims: 2
seed: 0
"""


def cfg(**changes: Any) -> dict[str, Any]:
    c = yaml.safe_load(CONTRACT)
    c.update(changes)
    return c


def run(tmp_path: Path, c: dict[str, Any]) -> dict[str, Any]:
    res = run_experiment(c, out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["method"] == c["attack"]["method"]
    return res.results


def test_contract_config_reports_accuracy_drop_and_tau(tmp_path: Path) -> None:
    r = run(tmp_path, cfg())
    m = r["metrics"]
    for key in ("clean_accuracy", "poisoned_accuracy", "drop"):
        assert set(m[key]) >= {"mean", "se", "n"} and m[key]["n"] == 2
    assert m["drop"]["mean"] == pytest.approx(m["clean_accuracy"]["mean"] - m["poisoned_accuracy"]["mean"], abs=1e-6)
    assert m["poisons"] == round(0.1 * 1438) and m["eps_d_actual"] == pytest.approx(m["poisons"] / 1438)
    assert isinstance(m["tau"], float) and m["tau_exact"] is True
    assert m["reachable"] == (m["eps_d_actual"] >= m["tau"])
    t = m["targets"][0]
    assert t["distance"] <= 1.0 + 1e-5 and t["train_loss_target"] > t["train_loss_clean"]
    assert m["target_accuracy"]["mean"] < m["crafting_accuracy"]["mean"]
    assert m["objective"] < m["objective_init"] and m["residual_norm"] < m["clean_grad_norm"]
    assert m["reached"] == (m["relative_residual"] <= 0.1)
    seeds = {row["trial_id"]: row["seed"] for row in r["trials"] if row["role"].startswith("victim")}
    assert seeds["clean-v000"] == seeds["poisoned-v000"] and seeds["clean-v001"] == seeds["poisoned-v001"]
    manifest = json.loads((tmp_path / "run" / "artifacts" / "poisons" / "manifest.json").read_text())
    assert "inserted" in json.dumps(manifest)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Gradient canceling Acc/Drop" in html and "Clean Acc" in html


def test_reachable_target_is_reached_by_victims_trained_to_convergence(tmp_path: Path) -> None:
    # logistic regression with weight decay 0.01 and 40 epochs converges; GradPC eps_w = 0.5 gives tau < 1.
    # ||w_victim - w_t|| ~ ||residual|| / (curvature ~ weight decay): the residual must be far below 0.1
    c = cfg(recipe={"name": "fast", "epochs": 40, "weight_decay": 0.01, "batch_size": 256, "lr": 0.2}, victims=1,
            attack={"method": "gradient-canceling", "eps_d": 1.0, "eps_w": 0.5})
    m = run(tmp_path, c)["metrics"]
    assert m["tau"] < 1.0 and m["reachable"] and m["reached"]
    assert m["relative_residual"] < 0.02
    d = m["target_distance"]
    assert d["poisoned"]["mean"] < 0.3 * d["clean"]["mean"]  # victims land at the target, not at w_c
    assert m["poisoned_accuracy"]["mean"] == pytest.approx(m["target_accuracy"]["mean"], abs=0.02)
    assert m["drop"]["mean"] > 0.03


@pytest.mark.parametrize("flip", ["random", "loss-max"])
def test_label_flip_inserts_poisons_and_trains_victims(tmp_path: Path, flip: str) -> None:
    c = cfg(recipe={"name": "fast", "epochs": 4}, victims=1, attack={"method": "label-flip", "eps_d": 0.5, "flip": flip})
    r = run(tmp_path, c)
    m = r["metrics"]
    assert m["poisons"] == 719 and m["strategy"] == flip and "tau" not in m
    assert m["crafting_loss_of_poisons"] > 1.0  # wrong labels are costly for the clean model
    assert {row["role"] for row in r["trials"]} == {"crafter", "victim-clean", "victim-poisoned"}


def test_param_corruption_judges_the_corrupted_models_directly(tmp_path: Path) -> None:
    c = cfg(crafting={"ensemble": 2}, attack={"method": "param-corruption", "eps_w": 0.5})
    r = run(tmp_path, c)
    m = r["metrics"]
    assert {row["role"] for row in r["trials"]} == {"crafter", "corrupted"}
    assert m["clean_accuracy"] == m["crafting_accuracy"] and m["poisoned_accuracy"] == m["target_accuracy"]
    assert m["drop"]["n"] == 2 and m["drop"]["mean"] > 0
    crafted = [row["test_accuracy"] for row in r["trials"] if row["role"] == "crafter"]
    corrupted = [row["test_accuracy"] for row in r["trials"] if row["role"] == "corrupted"]
    for t, a, b in zip(m["targets"], crafted, corrupted, strict=True):
        assert t["distance"] <= 0.5 + 1e-5 and t["drop"] == pytest.approx(a - b) and t["accuracy"] == b
    assert m["reachable"] is None and isinstance(m["tau"], float)


@pytest.mark.parametrize("changes, match", [
    ({"attack": {"method": "gradient-canceling", "eps_d": -0.1}}, "attack.eps_d"),
    ({"attack": {"method": "gradient-canceling", "eps_d": 0}}, "attack.eps_d"),
    ({"attack": {"method": "label-flip", "eps_d": 0.0001}}, "rounds to 0 poison points"),
    ({"attack": {"method": "label-flip"}}, "give attack.eps_d"),
    ({"attack": {"method": "gradient-canceling", "eps_d": 0.1, "eps_w": 0}}, "attack.eps_w"),
    ({"attack": {"method": "param-corruption", "eps_w": -1}}, "attack.eps_w"),
    ({"attack": {"method": "gradient-canceling", "eps_d": 0.1, "flip": "random"}}, "does not use attack.flip"),
    ({"attack": {"method": "shuffle", "eps_d": 0.1}}, "valid methods: gradient-canceling, label-flip"),
    ({"model": "mlp"}, "needs a model without BatchNorm"),
    ({"model": "fastcnn", "attack": {"method": "param-corruption"}}, "norm: none"),
    ({"crafting": {"ensemble": 2}}, "crafting.ensemble"),
    ({"victims": 0}, "victims"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path, changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_experiment(cfg(**changes), out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs.db").exists()


def test_label_flip_with_batchnorm_model_is_allowed(tmp_path: Path) -> None:
    c = cfg(model="mlp", recipe={"name": "fast", "epochs": 2}, victims=1,
            attack={"method": "label-flip", "eps_d": 0.05})
    assert run(tmp_path, c)["metrics"]["poisons"] == 72


def test_an_interrupted_run_resumes_and_rewrites_its_own_poison_export(tmp_path: Path) -> None:
    """A run killed after its poisons were exported (results.json not yet written) resumes: the
    crafting is repeated (seeded, so the same poison), the run's own export folder is replaced rather
    than refused, no victim is retrained, and the metrics equal the uninterrupted run's."""
    c = cfg(victims=1)
    first = run(tmp_path, c)
    (tmp_path / "run" / "results.json").unlink()  # as if killed before the end
    manifest = (tmp_path / "run" / "artifacts" / "poisons" / "manifest.json").read_bytes()
    again = run_experiment(c, out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True,
                           resume=True).results
    assert again["cost"]["models_trained"] == 0
    assert again["metrics"]["poisoned_accuracy"] == first["metrics"]["poisoned_accuracy"]
    assert (tmp_path / "run" / "artifacts" / "poisons" / "manifest.json").read_bytes() == manifest
    assert again["metrics"]["export_digests"] == first["metrics"]["export_digests"]  # same content, same digest
