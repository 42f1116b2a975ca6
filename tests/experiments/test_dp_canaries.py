"""dp-audit canaries and scores: the crafted (ClipBKD-style) input canary, the white-box Dirac
gradient canary, ``score: loss | gradient`` validation, and the white-box audit that catches a
deliberately broken DP-SGD with few models while the correct one stays below its claim."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mlaudit.experiments.dp_audit  # noqa: F401  (registers the kind)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.audit.canaries import CANARIES, crafted_canary, gradient_canary, second_moment_quotient, with_canary
from mlaudit.audit.scores import update_scores
from mlaudit.models.registry import build_model
from mlaudit.stats import eps_lower_bound

# A recipe in which the canary is sampled in every model (q = 256/1438, 36 steps: P(never) < 0.1% per model)
# and every sample moves the weights the same amount (constant lr).
RECIPE = {"name": "fast", "epochs": 6, "batch_size": 256, "schedule": "constant",
          "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}}


@functools.lru_cache(maxsize=1)
def digits():
    return load_dataset("digits")


def logistic_fn():
    return functools.partial(build_model, "logistic", input_shape=(1, 8, 8), num_classes=10)


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


def test_gradient_canary_picks_a_coordinate_the_data_never_moves() -> None:
    """Pixels 0, 32 and 39 are 0 in every digits training image: the weights on them get no data
    gradient, and the canary's coordinate is one of those 30 (seeded choice among the ties)."""
    b = digits()
    assert (b.train.x.flatten(1)[:, [0, 32, 39]] == 0).all()
    picks = set()
    for seed in range(4):
        c = gradient_canary(b.train, seed=seed, model_fn=logistic_fn())
        assert c.gradient is not None and not c.has_input
        assert c.gradient.index == len(b.train) and c.gradient.parameter == "net.1.weight"
        assert c.gradient.coordinate % 64 in (0, 32, 39)
        assert c.details["gradient_energy"] == 0.0 and c.details["tied_coordinates"] == 30
        picks.add(c.gradient.coordinate)
    assert len(picks) > 1
    with pytest.raises(ConfigError, match="needs trainer: mlaudit"):
        gradient_canary(b.train, seed=0)
    with pytest.raises(ConfigError, match="no input"):
        with_canary(b.train, c)


def test_crafted_canary_lies_where_the_data_has_no_energy() -> None:
    """ClipBKD-style: the crafted input's second-moment quotient is < 3% of a training image's; it is a
    valid image with its brightest pixel at 1; the same seed gives the same canary."""
    b = digits()
    c = crafted_canary(b.train, seed=0)
    assert c.x.shape == (1, 1, 8, 8) and float(c.x.min()) >= 0.0 and float(c.x.max()) == 1.0
    q = float(second_moment_quotient(c.x, b.train.x))
    images = float(second_moment_quotient(b.train.x[:200], b.train.x).mean())
    assert q < 0.03 * images and c.details["quotient"] == pytest.approx(q, rel=1e-3)
    assert c.source_index == -1 and 0 <= c.y < 10 and c.has_input
    again = crafted_canary(b.train, seed=0)
    assert torch.equal(c.x, again.x) and c.y == again.y
    assert CANARIES.get("crafted") is crafted_canary


def test_update_scores_of_an_input_canary_follow_its_gradient() -> None:
    """score = <theta_T - theta_0, g / ||g||>: a final model moved against the canary gradient by t has
    score -t; one moved along it, +t."""
    b = digits()
    c = crafted_canary(b.train, seed=1)
    fn = logistic_fn()
    from mlaudit.train.loop import init_models

    m0 = init_models(fn, [7])[0]
    loss = torch.nn.functional.cross_entropy(m0(c.x), torch.tensor([c.y]))
    grads = torch.autograd.grad(loss, list(m0.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    finals = [{n: p.detach() + s * 0.3 * g / norm for (n, p), g in zip(m0.named_parameters(), grads)} for s in (-1, 1)]
    scores = update_scores(fn, [7, 7], lambda i: finals[i], c)
    np.testing.assert_allclose(scores, [-0.3, 0.3], rtol=1e-5)


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
