"""Experiment kind ``federated`` with ``attack: text-inversion``: the honest-but-curious text inversion (TAG / LAMP
style) as an attack of its own, on a user's own causal language model given by import string (the byo example's,
its own embedding names, nn.MultiheadAttention, an untied head) and on TinyGPT. The kind equals the library calls on the same round
(same seed); a client defence is compared with the same round without it; without secure aggregation each user's
update is inverted alone; through Flower the round gives the simulated one's metrics; resume reads each trial's kept
result; bad input is refused before anything is written, naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from decepticons_checks import refused_before_anything_is_written

from mlaudit.attacks.federated import Observation, text_inversion, text_recovery
from mlaudit.data import load_dataset
from mlaudit.experiments import run_experiment
from mlaudit.experiments.base import Stream
from mlaudit.experiments.federated_config import FederatedConfig, user_shares
from mlaudit.federated import local_batches, secure_aggregate, user_gradients
from mlaudit.models.registry import build_model
from mlaudit.query import ParamVector
from mlaudit.train.loop import init_models

TEXT = {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}}
OWN_LM = '''from torch import nn

from mlaudit.examples.byo.text_inversion import OwnLM


class Hidden(OwnLM):  # no get_input_embeddings: two nn.Embedding, the attack is told which (text_inversion.embedding)
    get_input_embeddings = None


def build(num_classes, input_shape):
    return Hidden(num_classes, input_shape)


class Plain(nn.Module):  # a classifier's output, not next-token logits
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.lin = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        return self.lin(x.float())
'''
SMALL: dict[str, Any] = {"kind": "federated", "dataset": TEXT, "recipe": "fast", "attack": "text-inversion",
                         "model": "ti_user:build", "users": 4, "batch": 2, "seed": 3,
                         "text_inversion": {"steps": 40, "refine": 20, "user_counts": [1, 4], "embedding": "words"}}


@pytest.fixture
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "ti_user.py").write_text(OWN_LM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def go(config: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True, **kw).results


def test_the_kind_inverts_what_the_library_inverts_on_the_same_round(own: Path) -> None:
    r = go(SMALL, own / "o")
    m = r["metrics"]
    per = {row["users"]: row for row in m["text_inversion"]["per_users"]}
    assert sorted(per) == [1, 4] and m["recovered"] == per[4]["pairs"] and r["cost"]["models_trained"] == 0
    assert m["settings"]["embedding"] == "words.weight" and m["settings"]["architecture"] == "Hidden"
    assert not m["settings"]["tied_embedding"] and m["seconds"]["inversion"] > 0
    cfg = FederatedConfig.model_validate(SMALL)
    data = load_dataset(TEXT)
    parts, _ = user_shares(cfg, data, 0)
    x, y, _ = local_batches(data.train, parts, batch=2, generator=user_shares(cfg, data, 0)[1])
    tokens = x.long()
    targets = torch.cat([tokens[..., 1:], y[..., None]], -1)
    model = init_models(lambda: build_model(cfg.model, input_shape=(16,), num_classes=data.num_classes),
                        [cfg.trial_seed(0)])[0]
    for n in (1, 4):
        honest = secure_aggregate(ParamVector({k: v[:n] for k, v in user_gradients(model, tokens, targets).items()}))
        rec = text_inversion(model, Observation(honest, users=n, batch=2, input_shape=(16,)), steps=40, refine=20,
                             embedding="words",
                             generator=torch.Generator().manual_seed(cfg.trial_seed(0, stream=Stream.ATTACK) + 2 + n))
        true = tokens[:n].flatten(0, 1)
        want, got = text_recovery(true, rec.x), per[n]
        assert got["pairs"]["n"] == true.numel() and abs(got["pairs"]["value"] - want["pairs"]) <= 1.5 / true.numel()
        assert abs(got["tokens"]["value"] - want["tokens"]) <= 1.5 / true.numel() and got["whole"] == want["whole"]
        bag = set((honest["words.weight"].abs().sum(1) > 0).nonzero()[:, 0].tolist())
        typed = set(true.flatten().tolist())
        assert got["bag_of_tokens_recall"] == pytest.approx(len(bag & typed) / len(typed))
    # the bag of tokens restricts the candidates, so nearly every typed token comes back somewhere; a pair counts
    # when any sequence holds it, so the chance level (the true tokens shuffled) grows with the users
    assert per[4]["tokens"]["value"] > 0.6 and per[1]["pairs"]["value"] > per[1]["chance_pairs"] + 0.1
    assert 0 < per[1]["chance_pairs"] < per[4]["chance_pairs"] < 1
    md = (own / "o" / "artifacts" / "text_inversion.md").read_text()
    assert "Honest-but-curious text inversion on pydoc\\-text" in md and md.count("\n| ") >= 2 + 1 + 4
    html = (own / "o" / "report.html").read_text()
    assert "closest recovered sequence" in html


def test_a_client_defence_is_compared_with_the_same_round_without_it(own: Path) -> None:
    plain = go(SMALL, own / "plain")["metrics"]
    m = go(copy.deepcopy(SMALL) | {"defence": {"method": "noise", "sigma": 10.0}}, own / "noisy")["metrics"]
    d = m["defence"]
    assert d["without"]["k"] == plain["recovered"]["k"] > 0  # the plain side is the run without the defence
    assert d["with"]["k"] == m["recovered"]["k"] < plain["recovered"]["k"] and d["update_distortion"]["mean"] > 10
    assert [p["users"] for p in d["per_users"]] == [1, 4]
    assert [p["without"]["k"] for p in d["per_users"]] == [p["pairs"]["k"] for p in plain["text_inversion"]["per_users"]]


def test_each_users_update_alone_without_secure_aggregation_on_tinygpt(tmp_path: Path) -> None:
    cfg = copy.deepcopy(SMALL) | {"model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}},
                                  "aggregation": {"secure": False}}
    cfg["text_inversion"] = {"steps": 40, "refine": 20, "user_counts": [1, 2]}
    m = go(cfg, tmp_path / "o")["metrics"]
    per = m["text_inversion"]["per_users"]
    assert m["settings"]["embedding"] == "tok.weight" and m["secure_aggregation"] is False
    assert [p["occurrences"] for p in per] == [32, 64]
    # user 0's update is inverted once and counted in both rows: its pairs are part of the 2-user row
    assert per[1]["pairs"]["k"] >= per[0]["pairs"]["k"] > 0


def test_resume_reads_each_trials_kept_round(own: Path) -> None:
    cfg = copy.deepcopy(SMALL) | {"trials": 2}
    out = own / "o"
    first = go(cfg, out)
    cache = out / "artifacts" / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [f"text-inversion-round-000{i}.{e}" for i in (0, 1)
                                                      for e in ("json", "pt")]
    stamp = (cache / "text-inversion-round-0000.pt").stat().st_mtime_ns
    for p in cache.glob("text-inversion-round-0001.*"):
        p.unlink()
    again = go(cfg, out, resume=True)
    assert (cache / "text-inversion-round-0000.pt").stat().st_mtime_ns == stamp
    strip = ("seconds",)
    assert {k: v for k, v in again["metrics"].items() if k not in strip} == \
        {k: v for k, v in first["metrics"].items() if k not in strip}


def _bad(**change: Any) -> dict[str, Any]:
    return copy.deepcopy(SMALL) | change


@pytest.mark.parametrize("change,words", [
    ({"dataset": "digits"}, ["attack = 'text-inversion'", "dataset.name = 'digits'", "not a text source"]),
    ({"model": "mlp"}, ["model.name = 'mlp'", "zoo classifier", "package.module:factory"]),
    ({"model": "ti_user:Plain"}, ["ti_user:Plain", "next-token logits [N, V, L]"]),
    ({"text_inversion": {"run": False}}, ["text_inversion.run = false", "the inversion is the attack"]),
    ({"text_inversion": {"user_counts": [2, 5]}}, ["text_inversion.user_counts = [2, 5]", "users = 4"]),
    ({"text_inversion": {"embedding": "where"}}, ["text_inversion.embedding = 'where'", "fewer than the 76 tokens"]),
    ({"text_inversion": {"embedding": "out"}}, ["text_inversion.embedding = 'out'", "not an nn.Embedding",
                                                "allowed: words, where"]),
    ({"text_inversion": {}}, ["text_inversion.embedding = None", "2 nn.Embedding modules", "embedding="]),
    ({"decepticons": {"bins": 8}}, ["decepticons (bins)", "attack = 'text-inversion'", "the server is honest"]),
    ({"pretrain": True}, ["attack = 'text-inversion' with pretrain = True", "model.init"]),
    ({"lpips": {"backbone": "a", "lin": "b"}}, ["lpips", "attack = 'text-inversion' recovers tokens"]),
    ({"rounds": 2}, ["rounds = 2", "attack = 'text-inversion'"]),
    ({"attack": "imprint", "dataset": "digits", "model": "mlp"},
     ["text_inversion (embedding, refine, steps, user_counts)", "attack = 'imprint'", "does not apply"]),
    ({"attack": "decepticons", "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}},
      "text_inversion": {"run": True, "user_counts": [1]}},
     ["text_inversion.user_counts = [1]", "attack = 'decepticons'", "decepticons.user_counts"]),
])
def test_bad_input_is_refused_before_anything_is_written(own: Path, change: dict[str, Any], words: list[str]) -> None:
    refused_before_anything_is_written(_bad(**change), own, words, "ti_user.py")


@pytest.mark.parametrize("config", [SMALL, {**SMALL, "attack": "decepticons", "text_inversion": {"run": True},
                                            "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}}}],
                         ids=["text-inversion", "decepticons-with-inversion"])
def test_the_config_survives_a_round_trip_through_a_dict_of_every_field(config: dict[str, Any]) -> None:
    """A dumped config (every field, defaults included: what a run folder's config.json holds) validates again to
    the same config: "set or not" is judged against the defaults, not the fields given."""
    from mlaudit.experiments.base import config_to_dict, parse_config

    cfg = parse_config(config)
    assert parse_config(config_to_dict(cfg)) == cfg
