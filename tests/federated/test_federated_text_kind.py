"""Experiment kind ``federated`` with ``attack: decepticons`` on text (Fowl et al. 2022, "Decepticons"): the
pydoc-text source, the kind against the library calls on the same round (same seed), the example through the
CLI with its escaped samples, resume reading each trial's kept result, and bad input refused before anything
is written, naming the field."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from decepticons_checks import refused_before_anything_is_written
from typer.testing import CliRunner

from mlaudit.attacks.federated import (
    Observation,
    decepticons,
    plant_decepticon,
    text_inversion,
    text_recovery,
)
from mlaudit.attacks.federated.decepticons import bag_of_tokens, pair_recovery, sequences
from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.data import load_dataset
from mlaudit.data.sources.pydoc_text import pydoc_text
from mlaudit.experiments import run_experiment
from mlaudit.experiments.base import Stream
from mlaudit.experiments.federated_config import FederatedConfig, user_shares
from mlaudit.experiments.federated_text import md_escape
from mlaudit.federated import local_batches, secure_aggregate, user_gradients
from mlaudit.models.registry import build_model
from mlaudit.query import ParamVector
from mlaudit.train.loop import init_models

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federated_text.yaml"
TEXT = {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}}
SMALL: dict[str, Any] = {"kind": "federated", "dataset": TEXT, "recipe": "fast", "attack": "decepticons",
                         "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}},
                         "users": 4, "batch": 2, "decepticons": {"tag_tokens": 2, "user_counts": [1, 4]}, "seed": 3}


def go(config: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True, **kw).results


def test_pydoc_text_windows_are_text_and_the_next_character() -> None:
    data = load_dataset(TEXT)
    text, vocab = pydoc_text(100_000), data.train.classes
    assert data.input_shape == (16,) and data.num_classes == len(vocab) == len(set(pydoc_text()))
    assert len(data.train) + len(data.test) == 100_000 // 17 and data.meta["text"] is True
    for split in (data.train, data.test):
        for i in (0, len(split) - 1):
            window = "".join(vocab[int(t)] for t in split.x[i]) + vocab[int(split.y[i])]
            assert window in text
    again = load_dataset({**TEXT, "seed": 1})
    assert not torch.equal(again.test.x, data.test.x)  # the split follows the spec's seed


def library_round(cfg: FederatedConfig) -> tuple[Any, torch.Tensor, torch.Tensor, torch.nn.Module, torch.Generator]:
    """Trial 0's round through the library calls: (data, tokens [U, B, L], next-token targets, the global model
    at its initialisation, the generator the attack then draws from)."""
    data = load_dataset(TEXT)
    parts, gen = user_shares(cfg, data, 0)
    x, y, _ = local_batches(data.train, parts, batch=2, generator=gen)
    tokens = x.long()
    targets = torch.cat([tokens[..., 1:], y[..., None]], -1)
    model = init_models(lambda: build_model(cfg.model, input_shape=(16,), num_classes=data.num_classes),
                        [cfg.trial_seed(0)])[0]
    return data, tokens, targets, model, gen


def test_the_kind_recovers_what_the_library_recovers_on_the_same_round(tmp_path: Path) -> None:
    r = go(SMALL, tmp_path / "o")
    m = r["metrics"]
    per = {row["users"]: row for row in m["decepticons"]["per_users"]}
    assert sorted(per) == [1, 4] and m["recovered"] == per[4]["pairs"] and m["secure_aggregation"] is True
    # the same round through the library calls: partition, batches, init, plant, FedSGD sum, attack
    cfg = FederatedConfig.model_validate(SMALL)
    data, tokens, targets, model, gen = library_round(cfg)
    mal = plant_decepticon(model, data.test.x.long(), bins=128, tag_tokens=2, generator=gen)
    for n in (1, 4):
        agg = secure_aggregate(ParamVector({k: v[:n] for k, v in user_gradients(mal, tokens, targets).items()}))
        rec = decepticons(mal, Observation(grad=agg, users=n, batch=2, input_shape=(16,)))
        true = tokens[:n].flatten(0, 1)
        want, got = pair_recovery(true, rec.x), per[n]["pairs"]
        assert got["n"] == true.numel() and abs(got["value"] - want) <= 1.5 / true.numel(), (n, got, want)
        assert abs(per[n]["in_sequence"] - sequences(true, rec.x)["tokens_in_sequence"]) <= 1.5 / true.numel()
        honest = secure_aggregate(ParamVector({k: v[:n] for k, v in user_gradients(model, tokens, targets).items()}))
        bag = set(bag_of_tokens(model, honest) or [])
        assert per[n]["bag_of_tokens_recall"] == pytest.approx(len(bag & set(true.flatten().tolist())) / len(set(true.flatten().tolist())))
    assert per[1]["pairs"]["value"] >= 0.6 and per[1]["pairs"]["value"] > per[4]["pairs"]["value"]
    assert per[4]["bag_of_tokens_recall"] == 1.0 and r["cost"]["models_trained"] == 0


def test_example_runs_through_the_cli_with_escaped_samples(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(EXAMPLE), "--set", "trials=1", "--out", str(tmp_path / "run"),
                                   "--device", "cpu", "--store", str(tmp_path / "runs.db")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    per = r["metrics"]["decepticons"]["per_users"]
    cfg = load_yaml(EXAMPLE)
    assert [p["users"] for p in per] == cfg["decepticons"]["user_counts"] and per[-1]["occurrences"] == 8 * 32
    assert per[0]["pairs"]["value"] > per[-1]["pairs"]["value"] > 0.1
    md = (tmp_path / "run" / "artifacts" / "decepticons.md").read_text()
    rows = [line for line in md.splitlines() if re.match(r"^\| \d+ \| ", line)]
    samples = [line for line in rows if "%" not in line]
    assert len(samples) == cfg["decepticons"]["samples"]
    for line in samples:  # every | of the text escaped: exactly the 4 cell borders are bare
        assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Recovered vs true sequences" in html and "Decepticons" in html


def test_markdown_escape() -> None:
    assert md_escape("a|b<i>*_`x`") == "a\\|b\\<i\\>\\*\\_\\`x\\`"
    assert md_escape("tab\there") == "tab\\\\x09here"


def test_resume_reads_each_trials_kept_round(tmp_path: Path) -> None:
    cfg = {**SMALL, "trials": 2, "decepticons": {"tag_tokens": 2}}
    out = tmp_path / "o"
    first = go(cfg, out)
    cache = out / "artifacts" / "cache"
    kept = sorted(p.name for p in cache.iterdir())
    assert kept == ["decepticons-round-0000.json", "decepticons-round-0000.pt", "decepticons-round-0001.json",
                    "decepticons-round-0001.pt"]
    stamp = (cache / "decepticons-round-0000.pt").stat().st_mtime_ns
    for p in cache.glob("decepticons-round-0001.*"):  # as if killed before trial 1's result was kept
        p.unlink()
    again = go(cfg, out, resume=True)
    assert (cache / "decepticons-round-0000.pt").stat().st_mtime_ns == stamp  # read back, not attacked again
    assert (cache / "decepticons-round-0001.pt").is_file()
    strip = ("seconds",)
    assert {k: v for k, v in again["metrics"].items() if k not in strip} == \
        {k: v for k, v in first["metrics"].items() if k not in strip}
    assert [t["pairs_recovered"] for t in again["trials"]] == pytest.approx([t["pairs_recovered"] for t in first["trials"]])


def _bad(**change: Any) -> dict[str, Any]:
    return copy.deepcopy(SMALL) | change


USER_MODELS = ("import torch\nfrom torch import nn\nfrom mlaudit.models.gpt import TinyGPT\n\n"
               "def gpt(num_classes, input_shape):\n    return TinyGPT(num_classes, input_shape[0], d_model=32)\n\n"
               "class Classifier(nn.Module):\n    def __init__(self, num_classes, input_shape):\n        super().__init__()\n"
               "        self.lin = nn.Linear(input_shape[0], num_classes)\n\n"
               "    def forward(self, x):\n        return self.lin(x.float())\n\n"
               "class LookAlike(nn.Module):  # sequence logits, but not a TinyGPT\n"
               "    def __init__(self, num_classes, input_shape):\n        super().__init__()\n"
               "        self.emb = nn.Embedding(num_classes, num_classes)\n\n"
               "    def forward(self, x):\n        return self.emb(x.long()).transpose(1, 2)\n")


@pytest.mark.parametrize("change,words", [
    ({"dataset": "digits"}, ["dataset.name = 'digits'", "not a text source", "pydoc-text"]),
    ({"model": "mlp"}, ["model.name = 'mlp'", "zoo classifier", "mlaudit.models.gpt:tiny_gpt"]),
    ({"decepticons": {"bins": 1000}}, ["decepticons.bins = 1000", "1 <= bins <= 128"]),
    ({"decepticons": {"tag_tokens": 5}}, ["decepticons.tag_tokens = 5", "1 <= tag_tokens <= 4"]),
    ({"decepticons": {"user_counts": [0, 9]}}, ["decepticons.user_counts = [0, 9]", "users = 4"]),
    ({"pretrain": True}, ["pretrain = True", "allowed: pretrain false", "model.init"]),
    ({"protocol": "fedavg", "local_epochs": 2, "model": {"name": "mlaudit.models.gpt:tiny_gpt",
                                                         "kwargs": {"d_model": 32, "activation": "gelu"}}},
     ["protocol = 'fedavg'", "'gelu' TinyGPT", "allowed: activation 'relu' with protocol fedavg, or protocol fedsgd"]),
    ({"defence": {"method": "prune"}}, ["defence.prune is required", "0 <= prune < 1"]),
    ({"attack": "sneaky"}, ["attack", "sneaky", "decepticons", "imprint"]),
    ({"model": {"name": "dc_user:gpt", "kwargs": {}}, "decepticons": {"bins": 200}},
     ["decepticons", "bins = 200", "1 <= bins <= 128"]),
    ({"model": "dc_user:Classifier"}, ["dc_user:Classifier", "next-token logits [N, V, L]"]),
    ({"model": "dc_user:LookAlike"}, ["dc_user:LookAlike", "built a LookAlike", "TinyGPT"]),
    ({"dataset": {"name": "pydoc-text", "options": {"length": 1}}}, ["length", "greater than or equal to 2"]),
    ({"attack": "imprint", "dataset": "digits", "model": "mlp", "decepticons": {},
      "text_inversion": {"run": True}}, ["text_inversion (run)", "attack = 'imprint'",
                                         "allowed: attack text-inversion or decepticons"]),
    ({"text_inversion": {"run": True, "l1": 0.1}}, ["text_inversion.l1 = 0.1", "distance = 'cosine'", "distance: l2+l1"]),
    ({"text_inversion": {"run": True, "distance": "l1"}}, ["text_inversion.distance", "l1", "cosine", "l2+l1"]),
    ({"text_inversion": {"run": True, "steps": 0}}, ["text_inversion.steps", "greater than or equal to 1"]),
    ({"text_inversion": {"run": True, "candidates": "all"}}, ["text_inversion.candidates", "'all'", "bag", "vocabulary"]),
    ({"text_inversion": {"run": True, "embedding_reg": -1}}, ["text_inversion.embedding_reg", "greater than or equal to 0"]),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         change: dict[str, Any], words: list[str]) -> None:
    (tmp_path / "dc_user.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    refused_before_anything_is_written(_bad(**change), tmp_path, words, "dc_user.py")


def test_a_users_own_tinygpt_by_import_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dc_user.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = go({**SMALL, "model": "dc_user:gpt"}, tmp_path / "o")["metrics"]
    assert m["settings"]["d_model"] == 32 and m["settings"]["bins"] == 128 and m["recovered"]["k"] > 0


def test_the_honest_inversion_in_the_kind_is_the_library_call_on_the_same_round(tmp_path: Path) -> None:
    inv = {"run": True, "steps": 60, "refine": 20, "embedding_reg": 0.1, "match_embedding": True}
    m = go({**SMALL, "text_inversion": inv}, tmp_path / "o")["metrics"]
    per = {row["users"]: row for row in m["decepticons"]["per_users"]}
    assert m["settings"]["text_inversion"]["steps"] == 60 and m["settings"]["text_inversion"]["match_embedding"] and m["seconds"]["inversion"] > 0
    cfg = FederatedConfig.model_validate({**SMALL, "text_inversion": inv})
    _, tokens, targets, model, _ = library_round(cfg)
    for n in (1, 4):
        honest = secure_aggregate(ParamVector({k: v[:n] for k, v in user_gradients(model, tokens, targets).items()}))
        rec = text_inversion(model, Observation(honest, users=n, batch=2, input_shape=(16,)), steps=60, refine=20,
                             embedding_reg=0.1, match_embedding=True, generator=torch.Generator().manual_seed(cfg.trial_seed(0, stream=Stream.ATTACK) + 2 + n))
        want, got = text_recovery(tokens[:n].flatten(0, 1), rec.x), per[n]["inversion"]
        assert abs(got["pairs"]["value"] - want["pairs"]) <= 1.5 / (n * 32), (n, got, want)
        assert got["tokens"]["n"] == n * 32 and abs(got["tokens"]["value"] - want["tokens"]) <= 1.5 / (n * 32)
        assert got["whole"] == want["whole"]
    md = (tmp_path / "o" / "artifacts" / "decepticons.md").read_text()
    assert "honest inversion: pairs" in md and "honest inversion: bigrams (ROUGE-2)" in md


@pytest.mark.parametrize("defence,stops", [({"method": "prune", "prune": 0.9}, True),
                                           ({"method": "quantise", "bits": 32}, False)])
def test_a_client_defence_against_decepticons(tmp_path: Path, defence: dict[str, Any], stops: bool) -> None:
    """``defence:`` with ``attack: decepticons``: each user's update is defended before the secure sum, and the
    same round is attacked without it. Pruning 90% of each tensor's entries breaks the planted codes; 32-bit
    quantisation changes next to nothing and Decepticons recovers as much as without it."""
    m = go({**SMALL, "defence": defence}, tmp_path / "o")["metrics"]
    d = m["defence"]
    plain = go(SMALL, tmp_path / "plain")["metrics"]
    assert d["without"]["k"] == plain["recovered"]["k"] > 0  # the same round as a run without the defence
    assert d["with"]["k"] == m["recovered"]["k"] and [p["users"] for p in d["per_users"]] == [1, 4]
    if stops:
        assert d["with"]["value"] < 0.5 * d["without"]["value"] and d["update_distortion"]["mean"] > 0.1
    else:
        assert d["with"]["k"] == d["without"]["k"] and d["update_distortion"]["mean"] < 1e-6
