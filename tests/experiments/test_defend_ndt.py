"""The ``defend`` kind with ``defence.method: ndt`` (noise, denoise, train, classify; seed 004): a
Witches' Brew (gradient-matching) poison of digits defended by M noise-trained models, their vote
certified; the defence block's options validated (a DDPM denoiser by the certify kind's own block), errors
naming the field, the value and what is allowed. The DDPM path end to end: tests/certify/test_diffusers_pipeline.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.certify import max_radius
from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.certify_config import DDPMDenoiser
from mlaudit.headline import headline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "defend.yaml"


def cfg(defence: dict[str, Any]) -> dict[str, Any]:
    """The example config (BadNets on digits) with ``defence`` replacing its defence block."""
    return {**load_yaml(EXAMPLE), "defence": defence}


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def brew(defence: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"kind": "defend", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", "epochs": 2},
            "attack": {"method": "gradient-matching", "eps": 16, "budget": 0.01, "restarts": 1, "steps": 3},
            "defence": defence, "victims": 1, **changes}


def test_ndt_defends_a_witches_brew_poison_and_certifies(tmp_path: Path) -> None:
    c = brew({"method": "ndt", "sigma": 0.25, "models": 11, "alpha": 0.01})
    r = run_experiment(c, out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True).results
    m, d = r["metrics"], r["metrics"]["ndt"]
    assert m["defence"] == {"method": "ndt", "sigma": 0.25, "models": 11, "n0": 1, "alpha": 0.01, "denoiser": "none"}
    assert r["cost"]["models_trained"] == 1 + 1 + 11  # a crafting model, a victim, the ensemble
    cap = max_radius(sigma=0.25, n=10, alpha=0.01)
    assert d["max_radius"] == pytest.approx(cap) and d["radii"][0] == 0.0 and d["radii"][-1] <= cap
    s = d["per_set"]["s000"]
    cert = [s["certified_accuracy"][str(rr)]["value"] for rr in d["radii"]]
    assert cert == sorted(cert, reverse=True) and cert[0] <= s["ensemble_accuracy"]["value"]
    assert s["ensemble_accuracy"]["value"] > 0.7 and s["ensemble_accuracy"]["n"] == 359
    assert s["poison_l2"] > 0  # a clean-label poison: within NDT's threat model, its l2 norm is measured
    assert m["clean_accuracy"]["defence"]["mean"] == pytest.approx(s["ensemble_accuracy"]["value"])
    ens = [t for t in r["trials"] if "model" in t]
    assert sorted(t["model"] for t in ens) == list(range(11)) and len({t["seed"] for t in ens}) == 11
    assert headline("defend", {"attack_success.no_defence.mean": 0.25, "attack_success.defence.mean": 0.0,
                               "ndt.certified_against_attack": 0.0}) == "asr 25%->0% cert 0.0%"


def test_ndt_config_fills_defaults_and_round_trips() -> None:
    c = parse_config(cfg({"method": "ndt", "sigma": 0.5}))
    d = c.defence
    assert (d.models, d.n0, d.alpha, d.denoiser, d.denoiser_epochs) == (20, 1, 0.001, "none", None)
    assert parse_config(c.model_dump(mode="json")) == c
    assert parse_config(cfg({"method": "ndt", "sigma": 0.5, "denoiser": "dncnn"})).defence.denoiser_epochs == 10
    ddpm = parse_config(cfg({"method": "ndt", "sigma": 0.5, "denoiser": {"kind": "ddpm", "path": "m", "steps": 2}}))
    assert isinstance(ddpm.defence.denoiser, DDPMDenoiser) and ddpm.defence.denoiser.steps == 2
    assert ddpm.defence.denoiser.data_range == (0.0, 1.0) and ddpm.defence.denoiser_epochs is None
    assert ddpm.defence.denoiser_label == "DDPM (2 DDIM steps)" and parse_config(ddpm.model_dump(mode="json")) == ddpm


BAD = [
    (cfg({"method": "ndt"}), ["defence.sigma is required for ndt", "allowed 0 < sigma <= 10"]),
    (cfg({"method": "ndt", "sigma": -1}), ["defence.sigma", "-1", "greater than 0"]),
    (cfg({"method": "ndt", "sigma": 0.25, "models": 1}), ["defence.models", "1", "2"]),
    (cfg({"method": "ndt", "sigma": 0.25, "models": 5, "n0": 5}), ["defence.n0 = 5", "allowed 1 <= defence.n0 <= 4"]),
    (cfg({"method": "ndt", "sigma": 0.25, "alpha": 2}), ["defence.alpha", "2"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": "magic"}), ["defence.denoiser", "magic", "none", "dncnn",
                                                                  "{kind: ddpm, path: <folder>"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": {"kind": "dncnn"}}), ["defence.denoiser", "not a denoiser of ndt"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": "ddpm"}), ["defence.denoiser.path", "Field required"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": {"kind": "ddpm", "path": "m", "steps": 0}}),
     ["defence.denoiser.steps", "got 0", "1 <= defence.denoiser.steps <= 10000"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": {"kind": "ddpm", "path": "m", "epochs": 3}}),
     ["defence.denoiser.epochs", "Extra inputs"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": {"kind": "ddpm", "path": "m"}, "denoiser_epochs": 3}),
     ["defence.denoiser_epochs applies to ndt (with denoiser dncnn)"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser": {"kind": "ddpm", "path": "/nonexistent/ddpm"}}),
     ["defence.denoiser.path = '/nonexistent/ddpm' is not a folder"]),
    (cfg({"method": "ndt", "sigma": 0.25, "denoiser_epochs": 3}), ["defence.denoiser_epochs applies to ndt (with "
                                                                  "denoiser dncnn)"]),
    (cfg({"method": "ndt", "sigma": 0.25, "models": 6}), ["defence.models = 6", "5 estimation models",
                                                          "allowed defence.models >= 11"]),
    (cfg({"method": "dpa", "sigma": 0.25}), ["defence.sigma applies to ndt", "'dpa'"]),
]


@pytest.mark.parametrize(("config", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_ndt_input_exits_2_naming_the_field(tmp_path: Path, config: dict[str, Any], words: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    res = cli("run", path, "--out", tmp_path / "out", "--device", "cpu", "--store", tmp_path / "runs.db")
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.output, (w, res.output)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
