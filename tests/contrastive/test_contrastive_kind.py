"""Experiment kind ``contrastive``: the example config end to end through the CLI (the backdoor with 32 poisons
sends triggered digits to the target far above the clean models' rate), targeted poisoning and a user's own
dual encoder through the Python entry point, resume, and bad input refused with exit 2 before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.experiments import run_experiment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "contrastive.yaml"


def cfg(attack: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    c = load_yaml(EXAMPLE)
    c["attack"] = {**c["attack"], **(attack or {})}
    return {**c, **changes}


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_example_config_runs_and_the_backdoor_beats_the_clean_models(tmp_path: Path) -> None:
    """Measured 2026-12-02 (CPU): ASR 0.2% clean, 10% at 2, 71% at 8, 99% at 32 poisons; zero-shot accuracy 97%."""
    res = cli("run", EXAMPLE, "--out", tmp_path / "run", "--device", "cpu", "--store", tmp_path / "runs.db", "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    curve = {c["poisons"]: c for c in r["metrics"]["curve"]}
    assert sorted(curve) == [0, 2, 8, 32] and r["metrics"]["train_pairs"] == 1438
    assert curve[32]["rate"] == pytest.approx(32 / 1438)
    clean, hit = curve[0]["success"]["mean"], curve[32]["success"]["mean"]
    assert clean < 0.05 and hit > 0.8 and hit > clean + 0.5
    assert curve[32]["target_rank"]["mean"] < 1.5 < curve[0]["target_rank"]["mean"]
    z = [curve[p]["z_score"]["mean"] for p in (0, 2, 8, 32)]  # the trigger pulls triggered images together
    assert z[0] < z[3] and z[3] > 1.0, z
    assert all("z_score" in t for t in r["trials"])
    assert all(c["zero_shot_accuracy"]["mean"] > 0.85 for c in curve.values())
    assert len(r["trials"]) == 8 and (tmp_path / "run" / "report.html").is_file()
    assert r["metrics"]["most_poisons"]["poisons"] == 32
    listed = cli("runs", "list", "--store", tmp_path / "runs.db")
    assert listed.exit_code == 0 and "asr" in listed.output and "@32" in listed.output, listed.output
    # resume: every model is in the store, nothing is trained again
    again = run_experiment(cfg(), out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True,
                           resume=True).results
    assert again["cost"]["models_trained"] == 0 and again["metrics"]["curve"] == r["metrics"]["curve"]


def test_targeted_poisoning_moves_the_target_image(tmp_path: Path) -> None:
    c = cfg({"method": "targeted", "poisons": [8], "trials": 2, "target_class": None}, baseline=False,
            recipe={"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0, "epochs": 10, "batch_size": 128,
                    "schedule": "cosine", "augment": "none"})
    r = run_experiment(c, out=tmp_path / "t", device="cpu", store=tmp_path / "runs.db", quiet=True).results
    (point,) = r["metrics"]["curve"]
    assert point["poisons"] == 8 and point["success"]["mean"] == 1.0 and point["target_rank"]["mean"] == 1.0
    assert all(t["image_class"] != t["target"] for t in r["trials"])


class TinyDual(nn.Module):
    """A user's dual encoder with open_clip's interface (linear towers)."""

    def __init__(self, input_shape: tuple[int, ...], vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), embed_dim))
        self.words = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean", padding_idx=0)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        return self.visual(x)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.words(tokens)


def test_a_users_dual_encoder_plugs_in_by_import_string(tmp_path: Path) -> None:
    c = cfg({"poisons": [32], "trials": 1}, baseline=False, encoder={"dual": f"{__name__}:TinyDual", "embed_dim": 32})
    r = run_experiment(c, out=tmp_path / "u", device="cpu", store=tmp_path / "runs.db", quiet=True).results
    (point,) = r["metrics"]["curve"]
    assert point["zero_shot_accuracy"]["mean"] > 0.5 and 0.0 <= point["success"]["mean"] <= 1.0


@pytest.mark.parametrize("attack,changes,words", [
    ({"rates": [0.0001], "poisons": None}, {}, ["attack.rates[0] = 0.0001 yields 0 poisons", "1/1438"]),
    ({"target_class": 10}, {}, ["attack.target_class = 10", "attack.target_class <= 9"]),
    ({"trigger": {"type": "patch", "size": 9}}, {}, ["attack.trigger.size = 9", "1 <= attack.trigger.size <= 8"]),
    ({"poisons": [0, 4]}, {}, ["attack.poisons"]),
    ({"poisons": [5000]}, {}, ["attack.poisons = 5000", "1438"]),
    ({"rates": [0.1]}, {}, ["not both"]),
    ({"method": "clean-label"}, {}, ["attack.method", "'targeted' or 'backdoor'"]),
    ({}, {"encoder": {"dual": "not an import"}}, ["encoder.dual", "package.module:attribute"]),
    ({}, {"recipe": {"epochs": 0}}, ["recipe.epochs"]),
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


class CharDual(TinyDual):
    """TinyDual over a fixed character vocabulary (the user's own tokenizer below)."""

    def __init__(self, input_shape: tuple[int, ...], embed_dim: int) -> None:
        super().__init__(input_shape, 128, embed_dim)


def char_tokenize(captions: list[str]) -> Tensor:
    """A user's tokenizer whose context length (20) differs from the built-in word tokenizer's: character codes."""
    out = torch.zeros(len(captions), 20, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = [min(ord(ch), 127) for ch in c[:20]]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("method", ["backdoor", "targeted"])
def test_a_users_tokenizer_tokenizes_the_poisons_too(method: str, tmp_path: Path) -> None:
    """``encoder.tokenizer``: the poisons' captions are tokenized by the user's tokenizer, like the clean ones (a
    tokenizer with another context length than the built-in one used to fail when the poisons were inserted)."""
    attack = {"method": method, "poisons": [8], "trials": 1} | ({"target_class": None} if method == "targeted" else {})
    c = cfg(attack, baseline=False, recipe={"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0, "epochs": 2,
                                            "batch_size": 128, "schedule": "cosine", "augment": "none"},
            encoder={"dual": f"{__name__}:CharDual", "tokenizer": f"{__name__}:char_tokenize", "embed_dim": 16})
    r = run_experiment(c, out=tmp_path / method, device="cpu", store=tmp_path / "runs.db", quiet=True).results
    (point,) = r["metrics"]["curve"]
    assert point["poisons"] == 8 and 0.0 <= point["success"]["mean"] <= 1.0
