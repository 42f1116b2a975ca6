"""Experiment kind ``membership-inference``: inclusion design, config and data checks before
anything is written, the pool run end to end (results keys, report, honoured masks), Truth Serum,
external targets, memorization estimates and NaN handling."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mlaudit.attacks.membership import (
    ATTACKS,
    MembershipAttack,
    Observations,
    inclusion_matrix,
    score_all_targets,
)
from mlaudit.cli import app
from mlaudit.data import load_dataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError, DataError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.context import RunContext
from mlaudit.experiments.membership_report import score_pool
from mlaudit.models import build_model
from mlaudit.train import train
from mlaudit.train.checkpoint import load_checkpoint, save_checkpoint

CONTRACT = """\
kind: membership-inference
dataset: digits
model: mlp
recipe: fast
pool: {models: 16, keep: 0.5}
attacks: [loss, shokri, lira-online, lira-offline]
seed: 0
"""
SYNTH = {"name": "synthetic", "options": {"n_train": 160, "n_test": 64, "shape": [12], "noise": 2.0}}


def tiny(**changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": "membership-inference", "name": "tiny-mi", "seed": 0, "model": "mlp",
                           "dataset": SYNTH, "recipe": {"name": "fast", "epochs": 6, "batch_size": 32},
                           "pool": {"models": 8, "keep": 0.5}, "attacks": ["loss", "lira-online", "lira-offline"],
                           "n_boot": 20}
    cfg.update(changes)
    return cfg


def spy_jobs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    jobs: list[Any] = []
    original = RunContext.train

    def train_spy(self: RunContext, job: Any, **kw: Any) -> Any:
        jobs.append(job)
        return original(self, job, **kw)

    monkeypatch.setattr(RunContext, "train", train_spy)
    return jobs


def check_attack_metrics(m: dict[str, Any]) -> None:
    for key in ("auc", "balanced_accuracy"):
        assert {"value", "lo", "hi"} <= set(m[key]) and m[key]["lo"] <= m[key]["value"] <= m[key]["hi"]
    assert set(m["tpr_at_fpr"]) == {"0", "1e-05", "0.0001", "0.001", "0.01"}
    for v in m["tpr_at_fpr"].values():
        assert {"value", "lo", "hi", "clopper_pearson"} <= set(v) and 0.0 <= v["value"] <= 1.0


# ---------------------------------------------------------------- config checks
@pytest.mark.parametrize(("change", "pattern"), [
    ({"attacks": ["loss", "lira-onlin"]}, r"unknown membership attack 'lira-onlin'; valid .*lira-online.*shokri"),
    ({"pool": {"models": 8, "keep": 1.0}}, r"pool.keep"),
    ({"pool": {"models": 8, "keep": 0.0}}, r"pool.keep"),
    ({"pool": {"models": 3, "keep": 0.2}}, r"int\(keep \* models\)"),
    ({"pool": {"models": 1}}, r"pool.models"),
    ({"attack_options": {"shokri": {"hidden": 4}}}, r"not in attacks"),
    ({"attack_options": {"loss": {"bound": 2.0}}}, r"loss does not take; it takes none"),
    ({"queries": ["flip"]}, r"must include 'identity'"),
    ({"queries": ["identity", "zoom"]}, r"unknown query kind 'zoom'"),
    ({"fpr_targets": [-0.1, 0.01]}, r"fpr_targets"),
    ({"pool": {"models": 8, "query_precision": "fp16"}}, r"pool.query_precision.*'float32' or 'bf16'"),
    ({"pool": {"models": 8, "accuracy": "tta"}}, r"pool.accuracy.*'recipe' or 'test-logits'"),
])
def test_bad_configs_are_refused(change: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config(tiny(**change))


def test_pool_too_small_for_online_lira_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        run_experiment(tiny(pool={"models": 2, "keep": 0.5}), out=tmp_path / "o", device="cpu",
                       store=tmp_path / "s.db", quiet=True)
    msg = str(e.value)
    assert "lira-online" in msg and "160 of 160 examples lack IN shadows" in msg and "fewest: 0 IN" in msg
    assert "pool.models >= 4" in msg
    assert not (tmp_path / "o").exists()
    per_example = tiny(pool={"models": 4, "keep": 0.5}, attack_options={"lira-offline": {"variance": "per-example"}})
    with pytest.raises(ConfigError, match=r"lira-offline needs >= 0 IN and >= 2 OUT .*pool.models >= 5 or "
                                          r"attack_options: \{lira-offline: \{variance: fixed\}\}"):
        run_experiment(per_example, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    assert not (tmp_path / "o").exists()


def test_data_mismatches_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"augment images, but synthetic holds vectors"):
        run_experiment(tiny(queries=["identity", "flip"]), out=tmp_path / "o", device="cpu", quiet=True)
    with pytest.raises(ConfigError, match=r"variance='bogus' is not allowed"):
        run_experiment(tiny(attack_options={"lira-online": {"variance": "bogus"}}), out=tmp_path / "o", quiet=True)
    with pytest.raises(ConfigError, match=r"pool.size = 500 exceeds the 160 examples"):
        run_experiment(tiny(pool={"models": 4, "size": 500}), out=tmp_path / "o", device="cpu", quiet=True)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(tiny(model="resnet18")))
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet",
                                   "--store", str(tmp_path / "s.db")])
    assert res.exit_code == 2 and "needs image inputs" in res.output
    assert not (tmp_path / "o").exists()


def test_target_checkpoint_that_fails_to_load(tmp_path: Path) -> None:
    bad = tmp_path / "target.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"target.pt.*could not be loaded"):
        run_experiment(tiny(target={"checkpoint": str(bad)}), out=tmp_path / "o", device="cpu", quiet=True)
    other = build_model("mlp", input_shape=(7,), num_classes=4)
    save_checkpoint(other.state_dict(), bad)
    with pytest.raises(ConfigError, match=r"target checkpoint .*target.pt' does not fit model 'mlp'"):
        run_experiment(tiny(target={"checkpoint": str(bad)}), out=tmp_path / "o", device="cpu", quiet=True)
    with pytest.raises(DataError, match=r"does not match its recorded sha256"):
        run_experiment(tiny(target={"checkpoint": str(bad), "sha256": "0" * 64}), out=tmp_path / "o",
                       device="cpu", quiet=True)
    res = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet",
                                   str(_yaml(tmp_path, tiny(target={"checkpoint": str(tmp_path / "nope.pt")})))])
    assert res.exit_code == 2 and "nope.pt" in res.output and "does not exist" in res.output
    assert not (tmp_path / "o").exists()


def _yaml(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ---------------------------------------------------------------- non-finite values
def _nan_attack(obs: Observations, target: int) -> torch.Tensor:
    """Test-only: a ramp over the examples, with NaN for example 0 and +inf for example 1."""
    s = torch.linspace(0.0, 1.0, obs.num_examples, dtype=torch.float64) + target
    s[0], s[1] = float("nan"), float("inf")
    return s


def test_nonfinite_logits_and_scores_are_clipped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # registered for this test only, so tests that iterate over every attack never see it
    monkeypatch.setitem(ATTACKS._items, "test-nan-scores", MembershipAttack("test-nan-scores", _nan_attack))
    g = torch.Generator().manual_seed(0)
    m, n = 6, 40
    logits = torch.randn(m, n, 1, 3, generator=g)
    logits[0, 3, 0, 1] = float("nan")
    logits[2, 5, 0, 0] = float("inf")
    keep = inclusion_matrix(m, n, keep=0.5, seed=0)
    obs = Observations(logits, torch.randint(0, 3, (n,), generator=g), keep)
    with pytest.warns(RuntimeWarning, match="2 of 240 model outputs have NaN/inf logits"):
        scores, diag = score_pool(obs, ("loss", "lira-online", "test-nan-scores"),
                                  options={"lira-online": {"variance": "fixed"}})
    assert diag["nonfinite_logit_rows"] == 2 and diag["logit_rows"] == m * n
    assert diag["nonfinite_scores"] == {"loss": 0, "lira-online": 0, "test-nan-scores": 2 * m}
    for s in scores.values():
        assert s.shape == (m, n) and bool(torch.isfinite(s).all())
    fin = scores["test-nan-scores"][:, 2:]
    assert torch.equal(scores["test-nan-scores"][:, 0], torch.full((m,), float(fin.min()), dtype=torch.float64))


# ---------------------------------------------------------------- end to end
def test_pool_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = spy_jobs(monkeypatch)
    cfg = tiny(pool={"models": 8, "keep": 0.5, "size": 120}, truth_serum={"targets": 16, "copies": 8})
    res = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    out, m = tmp_path / "o", res.results["metrics"]
    for name in cfg["attacks"]:
        check_attack_metrics(m[name])
    keep = torch.from_numpy(np.load(out / "artifacts" / "inclusion.npy"))
    rows = torch.from_numpy(np.load(out / "artifacts" / "pool_indices.npy"))
    assert keep.shape == (8, 120) and rows.shape == (120,) and torch.equal(keep.sum(0), torch.full((120,), 4))
    assert m["pool"]["inclusion_sha256"] and m["pool"]["attack_options"]["lira-online"] == {"variance": "fixed", "seed": 0}
    pool_job, serum_job = jobs
    for job, extra in ((pool_job, 0), (serum_job, 16 * 8)):
        for t in job.trials:
            want = torch.zeros(160 + extra, dtype=torch.bool)
            want[rows[keep[t.tags["model"]]]] = True
            want[160:] = True
            assert torch.equal(t.mask, want), t.trial_id
    assert [t.seed for t in pool_job.trials] == [t.seed for t in serum_job.trials]
    assert [r["pool_members"] for r in res.results["trials"][:8]] == keep.sum(1).tolist()
    ts = m["truth_serum"]
    assert ts["pairs"] == 8 * 16 and ts["members"] == 4 * 16
    for name in cfg["attacks"]:
        assert ts[name]["before"]["n_pos"] == 64 and ts[name]["after"]["n_neg"] == 64
    # poisoning separates the targets' IN and OUT scores (measured: lira-online AUC 0.72 -> 0.98)
    assert ts["lira-online"]["after"]["separation"] > ts["lira-online"]["before"]["separation"] + 0.2
    assert ts["lira-online"]["after"]["auc"]["value"] > ts["lira-online"]["before"]["auc"]["value"]
    mem = m["memorization"]
    assert len(mem["top"]) == 10 and -1 <= mem["spearman_vs_lira"]["rho"] <= 1
    assert np.load(out / "artifacts" / "influence.npy").shape == (120, 64)
    assert set(np.load(out / "artifacts" / "scores.npz").files) == set(cfg["attacks"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "in the form of Carlini et al. 2022, Table I" in html
    assert "Truth Serum: the same attacks" in html and "TPR @ 0.1% FPR (%)" in html
    assert m["diagnostics"]["nonfinite_clipped"]["nonfinite_logit_rows"] == 0


def test_pool_logits_reported_in_training_equal_the_checkpoint_queries(tmp_path: Path) -> None:
    """Each pool model reports its logits before it leaves the device (no weights saved by default); with
    ``pool.save_models`` the weights are kept and querying them gives the same logits, and a resumed run
    reads the kept logits without retraining."""
    from mlaudit.experiments.membership import load_pool
    from mlaudit.query import logits_from_checkpoints
    from mlaudit.query.load import model_template

    data = load_dataset(SYNTH)
    cfg = tiny(memorization=True, attacks=["loss", "lira-offline", "rmia-offline"])
    a = run_experiment(cfg, out=tmp_path / "a", device="cpu", store=tmp_path / "s.db", quiet=True).results
    assert not (tmp_path / "a" / "artifacts" / "models").exists()
    assert len(list((tmp_path / "a" / "artifacts" / "queries").glob("*.pt"))) == 8
    # the folder alone gives back the pool the run scored: rescoring it reproduces the run's scores
    kept, pool = torch.load(tmp_path / "a" / "artifacts" / "logits.pt", weights_only=True), load_pool(tmp_path / "a")
    assert torch.equal(pool.logits, kept["logits"]) and torch.equal(pool.population_logits, kept["population_logits"])
    assert torch.equal(pool.keep, kept["keep"]) and torch.equal(pool.population_labels, kept["population_labels"])
    scores = np.load(tmp_path / "a" / "artifacts" / "scores.npz")
    np.testing.assert_allclose(score_all_targets("rmia-offline", pool, **a["metrics"]["pool"]["attack_options"]
                                                 ["rmia-offline"]).double().numpy(), scores["rmia-offline"], rtol=1e-6)
    cfg = tiny(memorization=True, pool={"models": 8, "keep": 0.5, "save_models": True})
    res = run_experiment(cfg, out=tmp_path / "b", device="cpu", store=tmp_path / "s2.db", quiet=True).results
    kept = torch.load(tmp_path / "b" / "artifacts" / "logits.pt", weights_only=True)
    paths = [tmp_path / "b" / t["checkpoint"] for t in res["trials"]]
    want = logits_from_checkpoints(lambda: model_template("mlp", data), paths, data.train.x)
    torch.testing.assert_close(kept["logits"], want, rtol=1e-5, atol=1e-5)
    again = run_experiment(cfg, out=tmp_path / "b", device="cpu", store=tmp_path / "s2.db", quiet=True, resume=True)
    assert again.results["cost"]["models_trained"] == 0
    assert again.results["metrics"]["lira-online"]["auc"] == res["metrics"]["lira-online"]["auc"]


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_query_precision_reaches_every_query_plan(precision: str) -> None:
    """``pool.query_precision`` sets the autocast of every logits plan the pool models report (pool, RMIA's
    population, the test split for memorization); float32 by default."""
    from mlaudit.experiments.membership import pool_plans

    cfg = parse_config(tiny(memorization=True, attacks=["loss", "rmia-offline"],
                            pool={"models": 8, "keep": 0.5, "query_precision": precision}))
    data = load_dataset(SYNTH)
    plans = pool_plans(cfg, data, torch.arange(len(data.train)))
    assert set(plans) == {"pool", "population", "test"}
    assert all(p.bf16 is (precision == "bf16") for p in plans.values())
    assert parse_config(tiny()).pool.query_precision == "float32"


def test_pool_accuracy_from_test_logits_matches_the_recipe_evaluation(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``pool.accuracy: test-logits`` skips the evaluation pass (the job says so, no model records a test accuracy)
    and reads each model's accuracy off its identity test logits: with a recipe without test-time augmentation the
    same models score what the recipe's evaluation gave them; the Truth Serum pool reads its accuracy the same way."""
    jobs = spy_jobs(monkeypatch)
    runs = {}
    for how in ("recipe", "test-logits"):
        cfg = tiny(memorization=False, pool={"models": 4, "keep": 0.5, "accuracy": how},
                   truth_serum={"targets": 4, "copies": 2}, attacks=["loss"])
        runs[how] = run_experiment(cfg, out=tmp_path / how, device="cpu", store=tmp_path / "s.db", quiet=True)
    assert [j.evaluate for j in jobs] == [True, True, False, False]
    assert not any("test_accuracy" in r for r in runs["test-logits"].results["trials"])
    assert all(0.0 < r["test_accuracy"] <= 1.0 for r in runs["recipe"].results["trials"])
    for key in ("pool", "truth_serum"):
        m = {how: r.results["metrics"][key] for how, r in runs.items()}
        acc = {how: v.get("test_accuracy", v.get("poisoned_test_accuracy"))["mean"] for how, v in m.items()}
        assert 0.3 < acc["recipe"] == pytest.approx(acc["test-logits"], abs=1e-6)
    assert runs["test-logits"].results["metrics"]["pool"]["test_accuracy_from"] == "test-logits"
    # the test logits the models reported are those the accuracy was read from
    files = sorted((tmp_path / "test-logits" / "artifacts" / "queries").glob("pool-*.pt"))
    data = load_dataset(SYNTH)
    per_model = [float((load_checkpoint(f)["test"][:, 0].argmax(-1) == data.test.y).double().mean())
                 for f in files]
    assert len(per_model) == 4
    pool = runs["test-logits"].results["metrics"]["pool"]["test_accuracy"]
    assert pool["n"] == 4 and np.mean(per_model) == pytest.approx(pool["mean"], abs=1e-9)


def test_pool_with_a_user_trainer_reports_its_logits(tmp_path: Path) -> None:
    """The user's training function path (factory/user.py) reports the same query logits."""
    from mlaudit.membership import audit

    data = load_dataset(SYNTH)
    r = audit(model="mlp", data=((data.train.x, data.train.y), (data.test.x, data.test.y)), trainer=f"{__name__}:plain_trainer", out=tmp_path / "o",
              store=tmp_path / "s.db", models=4, attacks=("loss", "lira-offline"), device="cpu",
              attack_options={"lira-offline": {"variance": "fixed"}}, n_boot=10)
    assert len(list((tmp_path / "o" / "artifacts" / "queries").glob("*.pt"))) == 4
    assert 0.0 <= r.results["metrics"]["loss"]["auc"]["value"] <= 1.0


def plain_trainer(model: torch.nn.Module, train_set: Any, *, seed: int, device: str) -> torch.nn.Module:
    """A user's plain loop (a test fixture for the trainer path): 3 epochs of Adam."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def test_external_target_audited_against_the_pool(tmp_path: Path) -> None:
    data = load_dataset(SYNTH)
    members = inclusion_matrix(2, 160, keep=0.5, seed=7)[0]
    torch.manual_seed(3)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes)
    train(model, data, {"name": "fast", "epochs": 6, "batch_size": 32}, seed=3,
          view=DataView.identity(data.train).with_keep(members))
    ck = tmp_path / "target.pt"
    sha = save_checkpoint(model.state_dict(), ck)
    np.save(tmp_path / "members.npy", members.numpy())
    cfg = tiny(memorization=False, target={"checkpoint": str(ck), "sha256": sha, "members": str(tmp_path / "members.npy")})
    r = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True).results
    t = r["metrics"]["target"]
    assert t["members_known"] and t["sha256"] == sha
    for name in cfg["attacks"]:
        check_attack_metrics(t[name])
        assert t[name]["n_pos"] == int(members.sum())
    assert np.load(tmp_path / "o" / "artifacts" / "target_scores.npy").shape == (3, 160)
    np.save(tmp_path / "members.npy", np.ones(5, dtype=bool))
    with pytest.raises(DataError, match=r"one entry per training example \(160\)"):
        run_experiment(cfg, out=tmp_path / "o2", device="cpu", quiet=True)


def test_contract_fast_variant(tmp_path: Path) -> None:
    """The contract config shrunk (3 epochs, 300 pool examples, logistic Shokri); same output keys."""
    raw = yaml.safe_load(CONTRACT)
    raw.update(recipe={"name": "fast", "epochs": 3}, n_boot=30, pool={**raw["pool"], "size": 300},
               attack_options={"shokri": {"classifier": "logistic", "max_train": 1000}})
    res = run_experiment(raw, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    m = res.results["metrics"]
    for name in raw["attacks"]:
        check_attack_metrics(m[name])
    assert m["pool"]["queries"] == ["identity"] and m["pool"]["models"] == 16
    assert (tmp_path / "o" / "artifacts" / "logits.pt").is_file()


@pytest.mark.slow
def test_contract_config_as_written(tmp_path: Path) -> None:
    """The contract YAML as written (about 45 s single-threaded on a 2-core CPU, most of it Shokri)."""
    (tmp_path / "c.yaml").write_text(CONTRACT)
    from mlaudit.config import load_yaml

    res = run_experiment(load_yaml(tmp_path / "c.yaml"), out=tmp_path / "o", device="cpu", store=tmp_path / "s.db",
                         quiet=True)
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    m = r["metrics"]
    for name in ("loss", "shokri", "lira-online", "lira-offline"):
        check_attack_metrics(m[name])
    # measured: AUC loss 0.545, shokri 0.589, lira-online 0.644, lira-offline 0.623;
    # TPR@1% FPR: 1.0%, 1.9%, 8.3%, 5.8%
    assert m["lira-online"]["auc"]["lo"] > 0.5 and m["loss"]["auc"]["lo"] > 0.5
    assert m["lira-online"]["tpr_at_fpr"]["0.01"]["value"] > m["loss"]["tpr_at_fpr"]["0.01"]["value"]
    assert np.load(tmp_path / "o" / "artifacts" / "inclusion.npy").shape == (16, 1438)
    html = (tmp_path / "o" / "report.html").read_text()
    assert re.search(r"ROC curve, log-log scale", html) and "data:image/png;base64," in html
    assert res.results["cost"]["models_trained"] == 16


def test_all_attack_metrics_in_threads_equal_one_analysis_after_the_other() -> None:
    """The pool's ROC analyses run up to ROC_THREADS at once; each draws from its own seeded generator, so every
    attack's metrics and curve are those of attack_metrics called alone (CPU: the same draws, bitwise), and the
    progress callback sees every attack once."""
    from mlaudit.experiments.membership import MembershipConfig
    from mlaudit.experiments.membership_report import all_attack_metrics, attack_metrics

    config = parse_config(tiny())
    assert isinstance(config, MembershipConfig)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(8, 40, generator=g) < 0.5
    scores = {f"a{i}": torch.randn(8, 40, generator=g, dtype=torch.float64) + keep * 0.3 * i for i in range(6)}
    seen: list[str] = []
    metrics, curves = all_attack_metrics(scores, keep, config, on_attack=seen.append)
    assert sorted(seen) == sorted(scores) and list(metrics) == list(scores)
    for name, s in scores.items():
        m, c = attack_metrics(s, keep, config)
        assert json.dumps(metrics[name], sort_keys=True) == json.dumps(m, sort_keys=True)
        np.testing.assert_array_equal(curves[name][0], c[0])
        np.testing.assert_array_equal(curves[name][1], c[1])
    assert all_attack_metrics({}, keep, config) == ({}, {})


@pytest.mark.parametrize("attacks", [["loss"], ["loss", "rmia-offline"]])
def test_each_query_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attacks: list[str]) -> None:
    """A pool whose accuracy comes from the test logits (and, with RMIA, which scores against a population) reads
    every model's query file once: the pool, test and population logits come out of one pass
    (RunContext.query_logits' prefetch), and they are the logits the files hold."""
    from mlaudit.experiments import context

    reads: list[str] = []
    real = context.load_checkpoint

    def spy(path: Any, **kw: Any) -> Any:
        if "queries" in Path(path).parts:
            reads.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(context, "load_checkpoint", spy)
    cfg = tiny(memorization=False, attacks=attacks, pool={"models": 4, "keep": 0.5, "accuracy": "test-logits"})
    res = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    files = sorted((tmp_path / "o" / "artifacts" / "queries").glob("pool-*.pt"))
    assert len(files) == 4 and sorted(reads) == sorted(f.name for f in files)
    data = load_dataset(SYNTH)
    acc = [float((real(f)["test"][:, 0].argmax(-1) == data.test.y).double().mean()) for f in files]
    assert res.results["metrics"]["pool"]["test_accuracy"]["mean"] == pytest.approx(np.mean(acc), abs=1e-9)
