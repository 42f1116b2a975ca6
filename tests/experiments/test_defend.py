"""Experiment kind ``defend``: the example config end to end through the CLI (BadNets at 3% of digits,
spectral signatures at 25% of each class: every poison removed, the backdoor gone), Deep Partition
Aggregation on the same poison, DP-SGD victims, a targeted attack with the kNN filter, resume and growth, and
bad input refused with exit 2 before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.headline import headline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "defend.yaml"


def cfg(defence: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """The example config with ``defence`` replacing its defence block."""
    c = load_yaml(EXAMPLE)
    if defence is not None:
        c["defence"] = defence
    return {**c, **changes}


def go(config: dict[str, Any], tmp_path: Path, name: str = "run", **kw: Any) -> dict[str, Any]:
    return run_experiment(config, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db", quiet=True,
                          **kw).results


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_example_runs_through_the_cli_and_spectral_signatures_remove_the_backdoor(tmp_path: Path) -> None:
    """Measured (2026-12, CPU): spectral removed 43/43 poisons (random filtering: 10.7, P = 6e-39) and 316
    clean rows; ASR 98.5% ± 0.6 -> 0.0%; clean accuracy 97.9% -> 93.5%."""
    res = cli("run", EXAMPLE, "--out", tmp_path / "run", "--device", "cpu", "--store", tmp_path / "runs.db", "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m = r["metrics"]
    rm = m["removal"]
    assert m["poisons"] == rm["poisons"] == 43 and m["train_size"] == 1438
    assert rm["removed"] == 359  # round(0.25 * n_c) of every class once poisoned (1481 rows; 46 of class 0)
    assert rm["poisons_removed"] == 43 and rm["clean_removed"] == rm["removed"] - 43
    assert rm["random_poisons_removed"] == pytest.approx(46 * 43 / 185)  # class 0 holds the poisons: 46 of 185 removed
    assert rm["rate_times_poisons"] == pytest.approx(0.25 * 43) and rm["p_value"] < 1e-20
    assert rm["per_set"]["poisoned"]["feature_model"] == "poisoned-v000"
    a, acc = m["attack_success"], m["clean_accuracy"]
    assert a["no_defence"]["mean"] > 0.9 and a["defence"]["mean"] < 0.05 and a["defence"]["n"] == 2
    assert acc["defence"]["mean"] > 0.85 and m["attack_success_drop"]["mean"] > 0.85
    assert m["defence"] == {"method": "spectral", "rate": 0.25}
    assert len(r["trials"]) == 4 and {t["defence"] for t in r["trials"]} == {"none", "spectral"}
    seeds = {(t["defence"], t["victim"]): t["seed"] for t in r["trials"]}
    assert seeds[("none", 0)] == seeds[("spectral", 0)] != seeds[("none", 1)] == seeds[("spectral", 1)]
    assert headline("defend", {"attack_success.no_defence.mean": a["no_defence"]["mean"],
                               "attack_success.defence.mean": a["defence"]["mean"], "removal.poisons_removed": 43,
                               "removal.poisons": 43}) == "asr 98%->0% rm 43/43"
    html = (tmp_path / "run" / "report.html").read_text()
    verdict = html.index('class="headline"')
    assert "rm 43/43" in html[verdict:verdict + 400] and "spectral removed 43/43 poisons (random filtering: 10.7)" in html
    assert (tmp_path / "run" / "artifacts" / "defences" / "poisoned.pt").is_file()
    assert not list((tmp_path / "run" / "artifacts" / "models").glob("*.pt"))  # weights released, success kept
    again = go(load_yaml(EXAMPLE), tmp_path, "run", resume=True)
    assert again["cost"]["models_trained"] == 0 and again["metrics"] == m


def test_dpa_trains_k_partition_models_and_certifies(tmp_path: Path) -> None:
    """k = 10 partitions of the BadNets-poisoned digits (about 144 rows each). Measured: ensemble accuracy
    94.4% (partition models 89.3%), ASR 98.5% -> 30.3%; certified accuracy 94.4/91.1/88.3/83.6/74.4/8.6% at
    r = 0..5; the poison (43 modified rows = 86 insertions + removals) touches all 10 partitions, so no
    attacked input is certified against it."""
    r = go(cfg({"method": "dpa", "k": 10}, recipe={"name": "fast", "epochs": 12}), tmp_path)
    m, d = r["metrics"], r["metrics"]["dpa"]
    assert r["cost"]["models_trained"] == 2 + 10 and m["defence"] == {"method": "dpa", "k": 10}
    s = d["per_set"]["poisoned"]
    assert d["k"] == 10 and d["radii"] == list(range(6)) and list(s["certified_accuracy"]) == [str(i) for i in range(6)]
    cert = [s["certified_accuracy"][str(i)]["value"] for i in range(6)]
    assert cert[0] == s["ensemble_accuracy"]["value"] and cert == sorted(cert, reverse=True)
    assert s["ensemble_accuracy"]["value"] > 0.85 and s["ensemble_accuracy"]["n"] == 359
    assert s["attack_size"] == 86 and 1 <= s["partitions_touched"] <= 10
    assert s["certified_against_attack"]["value"] == 0.0  # 86 > k / 2: no certificate reaches this poison
    assert m["attack_success"]["defence"]["mean"] == pytest.approx(s["ensemble_attack_success"]["value"])
    assert m["attack_success"]["defence"]["mean"] < 0.8
    assert m["attack_success"]["no_defence"]["mean"] > 0.9
    parts = [t for t in r["trials"] if "partition" in t]
    assert sorted(t["partition"] for t in parts) == list(range(10)) and sum(t["size"] for t in parts) == 1438
    assert len({t["seed"] for t in parts}) == 10
    assert headline("defend", {"attack_success.no_defence.mean": 0.98, "attack_success.defence.mean": 0.3,
                               "dpa.certified_against_attack": 0.0}) == "asr 98%->30% cert 0.0%"


def test_targeted_attack_with_the_knn_filter(tmp_path: Path) -> None:
    """Two gradient-matching scenarios (14 poisons each), deep kNN's own rule (k = 5): success is mean ± SE
    over scenarios; each scenario is filtered with its own first victim."""
    c = {"kind": "defend", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 4},
         "attack": {"method": "gradient-matching", "eps": 16, "budget": 0.01, "restarts": 1, "steps": 5},
         "defence": {"method": "knn", "k": 5}, "scenarios": 2, "victims": 2}
    r = go(c, tmp_path)
    m = r["metrics"]
    assert m["poisons"] == [14, 14] and m["attack"]["poisoned_sets"] == 2 and len(m["attack"]["scenarios"]) == 2
    assert set(m["removal"]["per_set"]) == {"s000", "s001"} and m["removal"]["rate"] is None
    assert m["removal"]["per_set"]["s001"]["feature_model"] == "s001-v000"
    assert m["attack_success"]["no_defence"]["n"] == 2 == m["attack_success"]["defence"]["n"]  # scenarios
    assert r["cost"]["models_trained"] == 1 + 2 * 2 * 2  # a crafting model, victims without and with the filter
    assert {t["view"] for t in r["trials"]} == {"s000", "s001"}


def test_dpa_interrupted_between_partition_models_resumes_to_the_same_result(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed (as by Ctrl-C) at the fourth model commit, inside the partition job: the resumed run trains
    only the partition models that were not committed and certifies exactly as an uninterrupted run."""
    from mlaudit.store import RunStore

    c = cfg({"method": "dpa", "k": 4}, recipe={"name": "fast", "epochs": 2}, factory={"max_chunk": 1})
    whole = go(c, tmp_path, "whole")
    commit, calls = RunStore.commit_trial, {"n": 0}

    def interrupting(self: RunStore, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # two victims and one partition model committed
            raise KeyboardInterrupt
        commit(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "commit_trial", interrupting)
    with pytest.raises(KeyboardInterrupt):
        go(c, tmp_path, "cut")
    monkeypatch.setattr(RunStore, "commit_trial", commit)
    resumed = go(c, tmp_path, "cut", resume=True)
    assert resumed["cost"]["models_resumed"] == 3 and resumed["cost"]["models_trained"] == 3
    for key in ("attack_success", "clean_accuracy", "dpa"):
        assert resumed["metrics"][key] == whole["metrics"][key], key


def test_dp_sgd_victims_against_badnets(tmp_path: Path) -> None:
    """defence dp-sgd: the victims retrained with DP-SGD (the victims' recipe plus defence.dp, the same seeds as
    the undefended ones); the accountant's epsilon is reported and DP costs clean accuracy."""
    r = go(cfg({"method": "dp-sgd", "dp": {"noise_multiplier": 2.0, "clip": 1.0}}, model={"name": "mlp", "norm": "none"}),
           tmp_path)
    m = r["metrics"]
    dp = m["dp_sgd"]
    assert dp["noise_multiplier"] == 2.0 and dp["clip"] == 1.0 and 0 < dp["epsilon"] < float("inf")
    assert m["defence"] == {"method": "dp-sgd", "dp": {"clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5,
                                                       "accountant": "rdp", "allow_large_delta": False,
                                                       "clipping": "auto"}}
    a, acc = m["attack_success"], m["clean_accuracy"]
    assert set(a) == {"no_defence", "defence"} and a["defence"]["n"] == 2
    assert acc["defence"]["mean"] < acc["no_defence"]["mean"]  # the noise costs accuracy (95.3% -> 88.3% measured)
    assert a["defence"]["mean"] < a["no_defence"]["mean"] - 0.3  # and stops most of the backdoor (89.2% -> 9.8%)
    rows = {(t["defence"], t["victim"]): t for t in r["trials"]}
    assert {d for d, _ in rows} == {"none", "dp-sgd"} and rows[("dp-sgd", 0)]["dp_epsilon"] == pytest.approx(dp["epsilon"])
    assert rows[("none", 1)]["seed"] == rows[("dp-sgd", 1)]["seed"]
    assert "DP-SGD victims" in (tmp_path / "run" / "report.html").read_text()


def test_python_entry_point(tmp_path: Path) -> None:
    import mlaudit.poison

    r = mlaudit.poison.defend(model="mlp", data="digits", out=tmp_path / "api", device="cpu", victims=1,
                              store=tmp_path / "runs.db", recipe={"name": "fast", "epochs": 4},
                              attack={"method": "badnets", "budget": 0.03, "target_class": 0},
                              defence={"method": "outlier", "rate": 0.25})
    assert r.metrics["defence"] == {"method": "outlier", "rate": 0.25} and r.metrics["removal"]["poisons"] == 43
    assert r.metrics["removal"]["poisons_removed"] > r.metrics["removal"]["random_poisons_removed"]


USER = """
import torch
import torch.nn.functional as F

CALLS = []


def fit(model, train_set, *, seed, device):
    x, y = train_set.tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def first_fails(model, train_set, *, seed, device):
    CALLS.append(seed)
    if len(CALLS) == 1:
        raise FloatingPointError("boom on the first model")
    return fit(model, train_set, seed=seed, device=device)
"""


def test_a_failed_feature_model_stops_the_filter_and_a_resume_gives_the_whole_run(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    """Victim 0 of the poisoned set is the defender's feature model: when it fails the run stops naming it
    (other victims are independent and would be left out); a resume trains it and filters as a run in which
    nothing failed."""
    from mlaudit.errors import TrialError

    (tmp_path / "defend_user.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    c = cfg(victims=2)
    with pytest.raises(TrialError, match="the defender's feature model poisoned-v000 failed to train") as e:
        go({**c, "trainer": "defend_user:first_fails"}, tmp_path, "cut")
    assert e.value.trial_id == "poisoned-v000"
    resumed = go({**c, "trainer": "defend_user:first_fails"}, tmp_path, "cut", resume=True)
    whole = go({**c, "trainer": "defend_user:fit"}, tmp_path, "whole")
    assert resumed["cost"]["models_resumed"] == 1 and "failed_trials" not in resumed["metrics"]
    for key in ("attack_success", "clean_accuracy", "removal"):
        assert resumed["metrics"][key] == whole["metrics"][key], key


def test_growth_equals_a_fresh_run(tmp_path: Path) -> None:
    short = {"name": "fast", "epochs": 4}
    go(cfg(victims=1, recipe=short), tmp_path)
    grown = go(cfg(victims=2, recipe=short), tmp_path, resume=True, grow=True)
    assert grown["grown_from"] == {"victims": 1} and grown["cost"]["models_trained"] == 2
    fresh = go(cfg(victims=2, recipe=short), tmp_path, "fresh")
    for key in ("attack_success", "clean_accuracy", "removal"):
        assert grown["metrics"][key] == fresh["metrics"][key], key


def test_config_round_trips_and_fills_defaults() -> None:
    c = parse_config(cfg({"method": "activation-clustering"}))
    assert c.defence.components == 10 and c.defence.size_threshold == 0.35 and c.defence.rate is None
    assert parse_config(c.model_dump(mode="json")) == c
    assert parse_config(cfg({"method": "dpa"})).defence.k == 50
    assert parse_config(cfg("none")).defence.method == "none"
    t = parse_config({**cfg(), "attack": {"method": "poison-frogs", "budget": 0.01}, "scenarios": 3})
    assert t.family == "targeted" and t.study().kind == "targeted-poison" and t.study().scenarios == 3
    assert parse_config(t.model_dump(mode="json")) == t
    b = parse_config(cfg()).study()
    assert b.kind == "backdoor" and not b.baseline and b.victim_seed(1) == parse_config(cfg()).victim_seed(1)


BAD = [
    (cfg({"method": "spectral", "rate": 1.5}), ["defence.rate", "1.5", "allowed 0.0 < defence.rate < 1.0"]),
    (cfg({"method": "spectral", "rate": 0}), ["defence.rate", "allowed 0.0 < defence.rate < 1.0"]),
    (cfg({"method": "spectral"}), ["defence.rate is required for spectral", "0 < rate < 1"]),
    (cfg({"method": "dpa", "k": 1}), ["defence.k", "got 1", "allowed 2 <= defence.k"]),
    (cfg({"method": "dpa", "k": 2000}), ["defence.k = 2000 partitions exceeds the 1438 training rows",
                                         "2 <= defence.k <= 1438"]),
    (cfg({"method": "dpa", "k": 1400}), ["defence.k = 1400 leaves", "partitions of the 1438 training rows", "empty"]),
    (cfg({"method": "knn", "k": 1438}), ["defence.k = 1438 neighbours", "allowed 2 <= defence.k <= 1437"]),
    (cfg({"method": "dpa", "rate": 0.1}), ["defence.rate applies to the filtering defences", "'dpa'"]),
    (cfg({"method": "spectral", "rate": 0.1, "k": 5}), ["defence.k applies to knn (neighbours) and dpa"]),
    (cfg({"method": "knn", "components": 3}), ["defence.components applies to activation-clustering"]),
    (cfg({"method": "spectral", "rate": 0.1, "recipe": "fast"}), ["defence.recipe applies to dpa"]),
    (cfg({"method": "magic", "rate": 0.1}), ["defence.method = 'magic' is not a defence", "spectral", "dpa", "dp-sgd"]),
    (cfg({"method": "dp-sgd"}), ["defence.dp is required for dp-sgd", "noise_multiplier"]),
    (cfg({"method": "spectral", "rate": 0.1, "dp": {"epsilon": 8.0}}), ["defence.dp applies to dp-sgd"]),
    (cfg({"method": "dp-sgd", "dp": {"epsilon": 8.0}}, model={"name": "fastcnn"}),
     ["defence.method dp-sgd trains the victims with DP-SGD", "BatchNorm", "norm: group"]),
    (cfg({"method": "dp-sgd", "dp": {"epsilon": 8.0}}, trainer="pkg.mod:fit"),
     ["defence.method dp-sgd trains the victims with mlaudit's DP-SGD", "trainer is 'pkg.mod:fit'"]),
    (cfg({"method": "dp-sgd", "dp": {"epsilon": 8.0}}, recipe="airbench-muon"),
     ["defence.dp cannot run with the victims' recipe", "optimizer sgd or adam"]),
    (cfg({"method": "spectral", "rate": 0.002}), ["defence.rate = 0.002 removes no row of class 0 (185 rows",
                                                  "spectral could not remove a single poison"]),
    (cfg(attack={"method": "unicorn"}), ["attack.method = 'unicorn'", "badnets", "gradient-matching"]),
    (cfg(scenarios=2), ["scenarios apply to targeted attacks", "badnets is a backdoor"]),
    (cfg(attack={"method": "badnets", "budget": 0.95}), ["attack.budget = 0.95 asks for 1366 poisons", "1296"]),
    (cfg(attack={"method": "badnets", "bogus": 1}), ["attack"]),
    ({k: v for k, v in cfg().items() if k != "defence"}, ["defence", "Field required"]),
]


@pytest.mark.parametrize(("config", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_exits_2_before_anything_is_written(tmp_path: Path, config: dict[str, Any], words: list[str]
                                                      ) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    res = cli("run", path, "--out", tmp_path / "out", "--device", "cpu", "--store", tmp_path / "runs.db")
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.output, (w, res.output)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
