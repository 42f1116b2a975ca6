"""Poisoning victims in the fine-tuning and transfer-learning settings (``victim.model: {init, train}``):
the backdoor and targeted-poison kinds end to end with a transfer victim (frozen pretrained features,
classifier retrained on the poisoned set), the crafting model defaulting to the victims' pretrained
model, the setting in metrics and report, and refusals before anything is written."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError, DataError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.models.registry import build_model
from mlaudit.train import init_models, train_stack
from mlaudit.train.checkpoint import sha256_file
from mlaudit.train.recipe import resolve_recipe


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An mlp (width 64, BatchNorm) trained 3 epochs on the clean digits training split."""
    data = load_dataset("digits")
    fn = functools.partial(build_model, {"name": "mlp", "width": 64}, input_shape=data.input_shape,
                           num_classes=data.num_classes)
    out = train_stack(init_models(fn, [11]), data.train, resolve_recipe({"name": "fast", "epochs": 3}), seeds=[11],
                      lr=0.05, device=torch.device("cpu"))[0]
    path = tmp_path_factory.mktemp("pre") / "mlp_digits.pt"
    torch.save(out.state_dict, path)
    return path, sha256_file(path)


def _victim(pre: tuple[Path, str], train: str = "head", **extra: Any) -> dict[str, Any]:
    return {"model": {"name": "mlp", "width": 64, "init": str(pre[0]), "init_sha256": pre[1], "train": train,
                      **extra}}


def _go(cfg: dict[str, Any], tmp_path: Path, name: str = "run") -> dict[str, Any]:
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db", quiet=True).results


BACKDOOR = {"kind": "backdoor", "dataset": "digits", "model": {"name": "mlp", "width": 64},
            "recipe": {"name": "fast", "epochs": 3}, "victims": 2, "seed": 0,
            "attack": {"method": "badnets", "budget": 0.03, "target_class": 0,
                       "trigger": {"type": "patch", "size": 2, "location": "bottom-right", "pattern": "checkerboard"}}}


def test_backdoor_with_a_transfer_victim_reports_the_setting(tmp_path: Path, pretrained: tuple[Path, str]) -> None:
    r = _go({**BACKDOOR, "victim": _victim(pretrained, reset_head=True)}, tmp_path)
    m = r["metrics"]
    v = m["victim"]
    assert v["setting"] == "transfer" and v["train"] == "head" and v["reset_head"] is True
    assert v["init_sha256"] == pretrained[1]
    assert v["frozen_parameters"] == v["parameters"] - (64 * 10 + 10) > 0
    assert m["clean_accuracy"]["mean"] > 0.8  # the pretrained features are good; the new classifier learns
    html = (tmp_path / "run" / "report.html").read_text()
    assert "transfer learning: only the classifier retrained (re-initialised)" in html
    assert f"{v['frozen_parameters']:,} of {v['parameters']:,} parameters frozen" in html


def test_backdoor_hidden_trigger_crafts_against_the_pretrained_model(tmp_path: Path,
                                                                     pretrained: tuple[Path, str]) -> None:
    """No crafting block: the attacker's model is the victims' pretrained file (no crafter trained)."""
    attack = {"method": "hidden-trigger", "budget": 0.09, "eps": 64, "steps": 20, "target_class": 0,
              "trigger": {"type": "patch", "size": 3}}
    r = _go({**BACKDOOR, "attack": attack, "victims": 1, "victim": _victim(pretrained)}, tmp_path)
    m = r["metrics"]
    assert m["victim"]["setting"] == "transfer"
    assert m["crafting_models"] == {"count": 1, "source": "victim model.init"}
    assert not [t for t in r["trials"] if t["trial_id"].startswith("crafter-")]


def test_targeted_poison_with_transfer_and_fine_tuned_victims(tmp_path: Path, pretrained: tuple[Path, str]) -> None:
    base = {"kind": "targeted-poison", "dataset": "digits", "model": {"name": "mlp", "width": 64},
            "recipe": {"name": "fast", "epochs": 2}, "scenarios": 1, "victims": 2, "seed": 0,
            "attack": {"method": "bullseye", "eps": 32, "budget": 0.01, "restarts": 1, "steps": 20}}
    r = _go({**base, "victim": _victim(pretrained)}, tmp_path, "transfer")
    m = r["metrics"]
    assert m["victim"]["setting"] == "transfer" and m["victim"]["frozen_parameters"] > 0
    assert m["crafting_models"][0]["source"] == "victim model.init"
    assert 0.0 <= m["poison_success"]["mean"] <= 1.0 and m["victim_accuracy"]["mean"] > 0.8
    assert "transfer learning: only the classifier retrained on the frozen features" in (
        tmp_path / "transfer" / "report.html").read_text()
    ft = _go({**base, "victim": _victim(pretrained, train="all")}, tmp_path, "ft")["metrics"]
    assert ft["victim"]["setting"] == "fine-tuned" and ft["victim"]["frozen_parameters"] == 0


def test_crafting_default_only_when_crafting_is_unset(pretrained: tuple[Path, str]) -> None:
    cfg = parse_config({**BACKDOOR, "victim": _victim(pretrained)})
    path, sha, spec = cfg.crafting_checkpoint
    assert path == pretrained[0].resolve() and sha == pretrained[1] and spec.train == "all" and spec.init is None
    assert parse_config({**BACKDOOR, "victim": _victim(pretrained),
                         "crafting": {"recipe": {"name": "fast", "epochs": 1}}}).crafting_checkpoint is None
    assert parse_config(BACKDOOR).crafting_checkpoint is None


def test_refusals_before_anything_is_written(tmp_path: Path, pretrained: tuple[Path, str]) -> None:
    bad = {**BACKDOOR, "victim": {"model": {"name": "mlp", "width": 64, "init": str(pretrained[0]),
                                            "init_sha256": "0" * 64, "train": "head"}}}
    with pytest.raises(DataError, match="sha256"):
        _go(bad, tmp_path, "hash")
    assert not (tmp_path / "hash").exists()
    conv = {**BACKDOOR, "victim": {"model": {"name": "tests.models.test_model_freeze:NoLinear", "train": "head"}}}
    with pytest.raises(ConfigError, match="model.train = 'head'.*has no nn.Linear"):
        _go(conv, tmp_path, "nolinear")
    assert not (tmp_path / "nolinear").exists()
