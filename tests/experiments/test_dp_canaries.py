"""dp-audit with its canaries and scores (the canaries and scores themselves: tests/audit/):
``score: loss | gradient`` validation, the white-box audit that catches a deliberately broken
DP-SGD with few models while the correct one stays below its claim, and the crafted canary through
a user trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlaudit.experiments.dp_audit  # noqa: F401  (registers the kind)
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.stats import eps_lower_bound

# A recipe in which the canary is sampled in every model (q = 256/1438, 36 steps: P(never) < 0.1% per model)
# and every sample moves the weights the same amount (constant lr).
RECIPE = {"name": "fast", "epochs": 6, "batch_size": 256, "schedule": "constant",
          "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}}


def audit(tmp_path: Path, name: str = "o", **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": "dp-audit", "dataset": "digits", "model": "logistic", "recipe": RECIPE,
                           "canary": "gradient", "models_per_side": 40, "seed": 0}
    cfg.update(changes)
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "s.db", quiet=True).results


def test_white_box_gradient_canary_catches_broken_dpsgd_and_not_the_correct_one(tmp_path: Path) -> None:
    """Noise divided by qN a second time (fixture ``noise-over-batch``), claiming eps = 1: the Dirac
    canary's update separates the 40 + 40 models perfectly, so eps_LB = 1.597 (the most 20 + 20
    held-out models can show) > 1. The correct DP-SGD gives eps_LB = 0 < 1 with the same models."""
    r = audit(tmp_path, broken="noise-over-batch")
    m = r["metrics"]
    assert m["score"] == "gradient" and m["broken"] == "noise-over-batch" and m["claimed_epsilon"] == 1.0
    assert (m["fp"], m["fn"], m["n_neg"], m["n_pos"]) == (0, 0, 20, 20)
    assert m["epsilon_lower_bound"] == pytest.approx(eps_lower_bound(0, 0, 20, 20, delta=1e-5, alpha=0.05))
    assert m["claim_refuted"] and m["accountant_epsilon"] <= 1.0 + 1e-6  # the accountant does not see the bug
    assert m["canary"]["parameter"] == "net.1.weight" and m["canary_sampled_steps"]["min"] >= 1
    assert m["canary_score_in"]["max"] < m["threshold"] < m["canary_score_out"]["min"]
    assert "canary_loss_in" not in m and "DELIBERATELY BROKEN" in (tmp_path / "o" / "report.html").read_text()
    rows = r["trials"]
    assert {"canary_score", "dp_canary_sampled"} <= set(rows[0]) and "dp_canary_sampled" not in rows[-1]
    npz = np.load(tmp_path / "o" / "artifacts" / "canary_scores.npz")
    assert npz["score_in"].shape == (40,) and str(npz["score"]) == "gradient"
    assert "White-box canary score" in (tmp_path / "o" / "report.html").read_text()

    ok = audit(tmp_path, "ok")["metrics"]
    assert ok["broken"] is None and ok["epsilon_lower_bound"] < 1.0 and not ok["claim_refuted"]
    # the correct run's Dirac updates are buried in noise: the sides overlap
    assert ok["canary_score_in"]["min"] < ok["canary_score_out"]["max"]


def test_crafted_canary_through_a_user_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crafted canary is appended to D for a user trainer and scored black box: a noiseless
    full-batch trainer claiming eps = 1 is caught by the loss on it (FP = FN = 0 on 20 + 20
    held-out models)."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "dpc_user_trainer.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def train(dataset, seed):\n"
        "    torch.manual_seed(seed)\n"
        "    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
        "    nn.init.zeros_(m[1].weight)  # only the bias init is random: the canary's pixels start at 0\n"
        "    opt = torch.optim.SGD(m.parameters(), lr=2.0)\n"
        "    for _ in range(20):\n"
        "        opt.zero_grad()\n"
        "        nn.functional.cross_entropy(m(dataset.x), dataset.y).backward()\n"
        "        opt.step()\n"
        "    return m\n\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(mod))
    cfg = {"kind": "dp-audit", "dataset": "digits", "model": "dpc_user_trainer:Net", "recipe": "fast", "canary": "crafted",
           "models_per_side": 40, "trainer": "dpc_user_trainer:train", "claimed_epsilon": 1.0, "seed": 0}
    m = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True).results["metrics"]
    assert m["score"] == "loss" and m["canary"]["type"] == "crafted" and "quotient" in m["canary"]
    assert (m["fp"], m["fn"]) == (0, 0) and m["epsilon_lower_bound"] > 1.5 and m["claim_refuted"]


BASE = {"kind": "dp-audit", "dataset": "digits", "model": "logistic", "recipe": RECIPE, "models_per_side": 40}


@pytest.mark.parametrize(("changes", "match"), [
    ({"canary": "gradient", "score": "loss"}, "canary gradient has no input whose loss could be measured"),
    ({"canary": "gradient", "trainer": "pkg.mod:train", "claimed_epsilon": 1.0},
     "canary gradient with score gradient needs trainer: mlaudit"),
    ({"canary": "crafted", "score": "gradient", "trainer": "pkg.mod:train", "claimed_epsilon": 1.0},
     "canary crafted with score gradient needs trainer: mlaudit"),
    ({"broken": "no-clip", "trainer": "pkg.mod:train", "claimed_epsilon": 1.0}, "broken: no-clip needs trainer"),
    ({"broken": "typo"}, "audit fixtures noise-over-batch, no-clip; got 'typo'"),
    ({"score": "white"}, "score"),
])
def test_bad_canary_and_score_combinations_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(BASE | changes)


def test_score_auto_resolves_by_canary() -> None:
    assert parse_config(BASE | {"canary": "gradient"}).resolved_score == "gradient"
    assert parse_config(BASE | {"canary": "crafted"}).resolved_score == "loss"
    assert parse_config(BASE | {"canary": "mislabeled", "score": "gradient"}).resolved_score == "gradient"


@pytest.mark.slow
def test_black_box_crafted_canary_sees_a_broken_dpsgd(tmp_path: Path) -> None:
    """Black box only (final-model loss on the crafted canary), with a recipe in which one example
    matters (batch 16, 12 epochs): the broken DP-SGD is distinguished better than chance with
    60 + 60 models (eps_LB > 0), the correct one is not refuted."""
    recipe = {"name": "fast", "epochs": 12, "batch_size": 16, "lr": 0.5, "momentum": 0.0, "schedule": "constant",
              "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}}
    bad = audit(tmp_path, "bad", canary="crafted", recipe=recipe, models_per_side=60, broken="noise-over-batch")
    assert bad["metrics"]["epsilon_lower_bound"] > 0.0
    assert bad["metrics"]["canary_loss_in"]["mean"] < bad["metrics"]["canary_loss_out"]["mean"]
    ok = audit(tmp_path, "ok", canary="crafted", recipe=recipe, models_per_side=60)
    assert not ok["metrics"]["claim_refuted"]


def test_white_box_scores_come_from_training_and_equal_the_checkpoint_scores(tmp_path: Path) -> None:
    """The Dirac canary's score theta_T[j] - theta_0[j] is reported by training (``hooks.watch``), so no model is
    saved by default; with ``save_models`` the same numbers come back from the checkpoints (update_scores)."""
    from mlaudit.audit.scores import update_scores
    from mlaudit.data import DatasetSpec, load_dataset
    from mlaudit.experiments.dp_audit import _model_fn
    from mlaudit.train.checkpoint import load_checkpoint

    r = audit(tmp_path, models_per_side=11, save_models=True)
    rows = r["trials"]
    cfg = parse_config(r["config"])
    data = load_dataset(DatasetSpec(name="digits"))
    canary = type("C", (), {"gradient": type("G", (), {"parameter": r["metrics"]["canary"]["parameter"],
                                                        "coordinate": r["metrics"]["canary"]["coordinate"]})()})()
    paths = [tmp_path / "o" / t["checkpoint"] for t in rows]
    from_weights = update_scores(_model_fn(cfg, data), [t["seed"] for t in rows], lambda i: load_checkpoint(paths[i]),
                                 canary, device="cpu")  # type: ignore[arg-type]
    np.testing.assert_allclose([t["canary_score"] for t in rows], from_weights, rtol=0, atol=1e-12)
    bare = audit(tmp_path, "bare", models_per_side=11)
    assert not (tmp_path / "bare" / "artifacts" / "models").exists() or not any(
        (tmp_path / "bare" / "artifacts" / "models").iterdir())  # nothing saved: the score needs no weights
    # the same seeds give the same scores without any weights saved
    assert [t["canary_score"] for t in bare["trials"]] == [t["canary_score"] for t in rows]
    assert all(t["checkpoint"] is None for t in bare["trials"])
