"""Experiment kind ``backdoor``: the example config end to end through the CLI (BadNets at 3% of digits
backdoors an MLP: attack success rate far above the clean victims'), BadNets at 2%, the blended and
label-consistent attacks, the hidden-trigger attacks (Hidden Trigger Backdoor, Sleeper Agent), the
Python entry point, resume and growth, and bad input refused with exit 2 before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.experiments import run_experiment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "backdoor.yaml"


def cfg(attack: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """The example config with ``attack`` entries merged into its attack block."""
    c = load_yaml(EXAMPLE)
    c["attack"] = {**c["attack"], **(attack or {})}
    return {**c, **changes}


def go(config: dict[str, Any], tmp_path: Path, name: str = "run", **kw: Any) -> dict[str, Any]:
    return run_experiment(config, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db", quiet=True,
                          **kw).results


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_example_config_runs_through_the_cli_and_backdoors_the_victims(tmp_path: Path) -> None:
    """BadNets, 2x2 checkerboard, 3% of digits (43 of 1438 rows of classes 1-9 relabelled 0), MLP victims
    (measured 2026-12: ASR 0.978 / 0.991 against 0.0 for the clean victims; clean accuracy 0.979)."""
    res = cli("run", EXAMPLE, "--out", tmp_path / "run", "--device", "cpu", "--store", tmp_path / "runs.db", "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m = r["metrics"]
    assert m["poisons"] == 43 == int(0.03 * 1438) and m["poison_rate"] == 43 / 1438 and m["train_size"] == 1438
    assert m["attack"]["relabelled"] == 43 and m["attack"]["source_classes"] == list(range(1, 10))
    for key in ("attack_success_rate", "clean_accuracy", "baseline_attack_success_rate", "baseline_clean_accuracy"):
        assert set(m[key]) >= {"mean", "se", "n"} and m[key]["n"] == 2
    assert m["attack_success_rate"]["mean"] > 0.9 > 0.05 > m["baseline_attack_success_rate"]["mean"]
    assert m["asr_gain"]["mean"] == pytest.approx(m["attack_success_rate"]["mean"]
                                                  - m["baseline_attack_success_rate"]["mean"])
    assert m["clean_accuracy"]["mean"] > 0.9 and abs(m["clean_accuracy_drop"]["mean"]) < 0.05
    assert m["asr_test_inputs"] == 359 - 36  # every test digit that is not a 0
    seeds = {(t["view"], t["victim"]): t["seed"] for t in r["trials"]}
    assert seeds[("clean", 0)] == seeds[("poisoned", 0)] != seeds[("clean", 1)] == seeds[("poisoned", 1)]
    html = (tmp_path / "run" / "report.html").read_text()
    verdict = html.index('class="headline"')
    assert "attack success rate" in html[verdict:verdict + 200] and html.count("data:image/png") == 3
    assert not list((tmp_path / "run" / "artifacts" / "models").glob("*.pt"))  # weights released, ASR kept


def test_badnets_at_two_percent_and_blended_backdoor_the_victims(tmp_path: Path) -> None:
    """28 poisons (2%): measured ASR 0.95-0.97 over seeds 0-2 (clean victims <= 0.002); blended noise
    at alpha 0.2, 3%: 0.97-1.0."""
    m = go(cfg({"budget": 0.02}), tmp_path, "badnets")["metrics"]
    assert m["poisons"] == 28
    assert m["attack_success_rate"]["mean"] > m["baseline_attack_success_rate"]["mean"] + 0.7
    b = go(cfg({"method": "blended", "trigger": {"type": "blend", "alpha": 0.2}}, victims=1, baseline=False),
           tmp_path, "blended")["metrics"]
    assert b["attack_success_rate"]["mean"] > 0.8 and "baseline_attack_success_rate" not in b
    assert b["attack"]["trigger_text"] == "noise blend, alpha 0.2"


def test_label_consistent_keeps_labels_and_plants_a_weaker_backdoor(tmp_path: Path) -> None:
    """129 of the 142 training 0s made hard within eps 64/255 (digits have 16 grey levels: eps 16 barely
    moves them) by 10 PGD steps on an MLP crafting model, then triggered (3x3); labels kept. Measured
    ASR 0.39-0.62 over seeds 0-2 against 0.0 for the clean victims."""
    r = go(cfg({"method": "label-consistent", "budget": 0.09, "eps": 64, "steps": 10, "trigger": {"size": 3}}),
           tmp_path)
    m = r["metrics"]
    a = m["attack"]
    assert m["poisons"] == 129 and a["relabelled"] == 0 and a["eps_255"] == 64
    assert a["crafter_accuracy_perturbed"] < 0.5 < a["crafter_accuracy_clean"]
    assert a["max_abs_perturbation"] <= 64 / 255 + 1e-6
    assert m["crafting_models"]["count"] == 1
    assert m["attack_success_rate"]["mean"] > m["baseline_attack_success_rate"]["mean"] + 0.2


@pytest.mark.parametrize(("method", "extra", "gain"), [("hidden-trigger", {}, 0.1),
                                                      ("sleeper-agent", {"retrain_rounds": 0}, 0.3)])
def test_hidden_trigger_methods_plant_a_backdoor_without_a_trigger_on_the_poisons(tmp_path: Path, method: str,
                                                                                  extra: dict, gain: float) -> None:
    """129 of the 142 training 0s crafted within eps 64/255 (digits have 16 grey levels: eps 16 barely moves
    them) by 60 signed-Adam steps against an MLP crafting model (sleeper-agent without its retraining, to
    stay fast); no trigger on them, labels kept; one poisoned and one clean victim. Measured 2026-12-02 on
    the 2-core CPU, seeds 0-3 (victims: 1): ASR hidden-trigger 0.26 / 0.23 / 0.07 / 0.44, sleeper-agent
    0.63 / 0.64 / 0.42 / 0.57; clean victims 0.0."""
    r = go(cfg({"method": method, "budget": 0.09, "eps": 64, "steps": 60, "trigger": {"size": 3}, **extra},
               victims=1), tmp_path)
    m = r["metrics"]
    a = m["attack"]
    assert m["poisons"] == 129 and a["relabelled"] == 0 and a["eps_255"] == 64 and a["eps"] == 64 / 255
    assert a["max_abs_perturbation"] <= 64 / 255 + 1e-6  # every pixel, the trigger's too: none is stamped
    assert m["crafting_models"]["count"] == 1
    assert m["attack_success_rate"]["mean"] > m["baseline_attack_success_rate"]["mean"] + gain
    assert abs(m["clean_accuracy_drop"]["mean"]) < 0.05
    assert "with no trigger on them" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.slow  # ~10 s on 2 cores: the methods' default crafting (250 steps; sleeper-agent retrains 4 times)
def test_hidden_trigger_methods_at_their_default_crafting_settings(tmp_path: Path) -> None:
    """eps 64/255, 9% of digits, 3x3 trigger, 2 poisoned + 2 clean victims, the methods' defaults otherwise.
    Measured 2026-12-02 (CPU), seeds 0-2: hidden-trigger ASR 0.30 / 0.31 / 0.23, sleeper-agent (4
    retrainings with the crafting recipe) 0.93 / 0.97 / 0.86; clean victims 0.0."""
    base = {"budget": 0.09, "eps": 64, "trigger": {"size": 3}}
    ht = go(cfg({"method": "hidden-trigger", **base}), tmp_path, "ht")["metrics"]
    sa = go(cfg({"method": "sleeper-agent", **base}), tmp_path, "sa")["metrics"]
    assert ht["attack_success_rate"]["mean"] > ht["baseline_attack_success_rate"]["mean"] + 0.15
    assert sa["attack_success_rate"]["mean"] > sa["baseline_attack_success_rate"]["mean"] + 0.6
    assert sa["attack"]["retrain_rounds"] == 4 and sa["attack"]["retrain_recipe"]["name"] == "fast"
    assert sa["attack"]["alignment_end"] > sa["attack"]["alignment_start"]
    assert ht["attack"]["feature_distance_end"] < ht["attack"]["feature_distance_start"]


def test_hidden_trigger_methods_default_to_eps_16_and_their_crafting_settings() -> None:
    from mlaudit.experiments.backdoor import BackdoorConfig

    for method, augment in (("hidden-trigger", False), ("sleeper-agent", True)):
        a = BackdoorConfig.model_validate(cfg({"method": method})).attack
        assert (a.eps, a.steps, a.optimizer, a.restarts, a.augment) == (16.0, 250, "signed-adam", 1, augment)
    a = BackdoorConfig.model_validate(cfg({"method": "sleeper-agent", "retrain_rounds": 2, "selection": "random"})).attack
    assert (a.options.retrain_rounds, a.options.selection, a.options.retrain_recipe) == (2, "random", None)


def test_python_entry_point(tmp_path: Path) -> None:
    import mlaudit.poison

    r = mlaudit.poison.backdoor(model="mlp", data="digits", out=tmp_path / "api", device="cpu", victims=1,
                                store=tmp_path / "runs.db", baseline=False,
                                attack={"method": "badnets", "budget": 0.03, "target_class": 7,
                                        "source_classes": [1, 2], "trigger": {"size": 2, "location": "top-left"}})
    assert r.metrics["poisons"] == 43 and r.metrics["attack"]["source_classes"] == [1, 2]
    assert r.metrics["asr_test_inputs"] == 36 + 35  # the test 1s and 2s
    assert 0.0 <= r.metrics["attack_success_rate"]["mean"] <= 1.0


def test_resume_reuses_the_poison_and_growth_equals_a_fresh_run(tmp_path: Path) -> None:
    short = {"name": "fast", "epochs": 4}
    first = go(cfg(victims=1, recipe=short), tmp_path)
    again = go(cfg(victims=1, recipe=short), tmp_path, resume=True)
    assert again["cost"]["models_trained"] == 0 and again["metrics"] == first["metrics"]
    grown = go(cfg(victims=2, recipe=short), tmp_path, resume=True, grow=True)
    assert grown["grown_from"] == {"victims": 1} and grown["cost"]["models_trained"] == 2
    assert grown["metrics"]["attack"]["poison_seconds"] == first["metrics"]["attack"]["poison_seconds"]
    fresh = go(cfg(victims=2, recipe=short), tmp_path, "fresh")
    for key in ("attack_success_rate", "clean_accuracy", "baseline_attack_success_rate", "asr_gain"):
        assert grown["metrics"][key] == fresh["metrics"][key], key


@pytest.mark.parametrize(("attack", "changes", "words"), [
    ({"trigger": {"size": 9}}, {}, ["attack.trigger.size = 9 is larger than the 8x8 images",
                                    "allowed 1 <= attack.trigger.size <= 8"]),
    ({"trigger": {"size": 3, "location": [7, 0]}}, {}, ["attack.trigger.location = [7, 0]", "rows 0..5"]),
    ({"budget": 0.0005}, {}, ["attack.budget = 0.0005 of 1438 training examples gives 0 poisons",
                              "smallest rate that yields one poison is 1/1438 = 0.000695"]),
    ({"method": "label-consistent", "budget": 0.2}, {}, ["asks for 287 poisons", "142 target-class",
                                                         "allowed attack.budget <= 142/1438"]),
    ({"target_class": 3, "source_classes": [3, 5]}, {}, ["attack.source_classes: target_class = 3 is also in "
                                                         "source_classes = [3, 5]"]),
    ({"trigger": {"type": "blend", "alpha": 0}}, {}, ["attack.trigger.alpha", "got 0", "0.0 < attack.trigger.alpha <= 1.0"]),
    ({"trigger": {"type": "blend", "alpha": 1.5}}, {}, ["attack.trigger.alpha", "got 1.5"]),
    ({"target_class": 10}, {}, ["target_class = 10 is not a class", "target_class <= 9"]),
    ({"eps": 8}, {}, ["attack.eps = 8", "leave attack.eps out"]),
    ({"method": "voodoo"}, {}, ["unknown backdoor poisoning method 'voodoo'", "badnets", "sleeper-agent"]),
    ({"method": "hidden-trigger", "pairing": "closest"}, {}, ["attack.pairing", "'closest'", "'nearest' or 'random'"]),
    ({"method": "sleeper-agent", "budget": 0.2}, {}, ["asks for 287 poisons", "142 target-class"]),
    ({"method": "sleeper-agent", "retrain_rounds": -2}, {}, ["attack.retrain_rounds", "got -2"]),
    ({"pairing": "nearest"}, {}, ["method badnets does not use attack.pairing", "hidden-trigger"]),
    ({}, {"crafting": {"ensemble": 2}}, ["uses no model"]),
    ({}, {"victims": 0}, ["victims"]),
])
def test_bad_input_exits_2_naming_the_field_before_anything_is_written(tmp_path: Path, attack: dict, changes: dict,
                                                                       words: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg(attack, **changes)))
    res = cli("run", path, "--out", tmp_path / "out", "--device", "cpu", "--store", tmp_path / "runs.db")
    assert res.exit_code == 2, res.output
    text = " ".join(res.stderr.split())
    for w in words:
        assert w in text, text
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
