"""Decepticons under FedAvg and on a pretrained TinyGPT (``attack: decepticons`` with ``protocol: fedavg``, and
``model.init``). Each user's local training is :func:`~mlaudit.federated.round_updates`, the one user update of the
simulated rounds and the Flower client, whose next-token path is the training loop's SGD (the same minibatches and
steps, checked against :func:`~mlaudit.train.loop.train_stack` on class targets). Flower gives the simulated round's
metrics (tolerances of ``test_flower_decepticons.py``: every count equal). One local step at the FedAvg default scale
(1e-3: the server reads a difference of float32 weights) recovers what FedSGD does, more steps move the malicious
parameters and recover less; the planting overwrites the same parameters, with the same values, whatever weights the
user starts from, so a pretrained model keeps only its later blocks, final LayerNorm and head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from decepticons_checks import same_counts

from mlaudit.attacks.federated import plant_decepticon  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.federated import round_updates  # noqa: E402
from mlaudit.federated.updates import _train_sequences, _train_users  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.models.gpt import TinyGPT  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time

TEXT = {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}}
SMALL: dict[str, Any] = {
    "kind": "federated", "dataset": TEXT, "recipe": "fast", "attack": "decepticons",
    "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}}, "users": 4, "batch": 2, "seed": 3,
    "decepticons": {"tag_tokens": 2, "user_counts": [1, 4]}}
FEDAVG = {"protocol": "fedavg", "local_epochs": 2, "local_batch": 2}
"""2 local epochs of one minibatch (the user's 2 sequences): 2 local SGD steps."""


def run(config: dict[str, Any], tmp_path: Path, name: str) -> dict[str, Any]:
    return run_experiment(config, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db",
                          quiet=True).results["metrics"]


def pairs(m: dict[str, Any]) -> list[int]:
    return [p["pairs"]["k"] for p in m["decepticons"]["per_users"]]


def test_local_sgd_on_next_token_targets_is_the_training_loops_sgd() -> None:
    """The next-token path of FedAvg's local training takes the stacked training loop's minibatches and plain SGD
    steps: on class targets (which both take) the two give the same updates, with a topped-up last minibatch (5 rows
    in minibatches of 2); on a TinyGPT's [U, n, L] targets round_updates runs it."""
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "width": 16, "norm": "none"}, input_shape=(1, 6, 6), num_classes=4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 5, 1, 6, 6, generator=g), torch.randint(0, 4, (3, 5), generator=g)
    loop, steps, _ = _train_users(model, x, y, epochs=2, batch_size=2, lr=0.1, seeds=[3, 4, 5], device="cpu", classes=4)
    ours, ours_steps, _ = _train_sequences(model, x, y, epochs=2, batch_size=2, lr=0.1, seeds=[3, 4, 5])
    assert steps == ours_steps == 6
    for k in loop:
        torch.testing.assert_close(ours[k], loop[k], rtol=1e-4, atol=1e-6)
    gpt = TinyGPT(20, 8, d_model=16)
    tokens = torch.randint(0, 20, (2, 3, 8), generator=g)
    res = round_updates(gpt, tokens, tokens.roll(-1, -1), protocol="fedavg", lr=0.1, epochs=1, batch_size=2,
                        seeds=[0, 1], device="cpu")
    assert res.steps == 2 and res.updates["tok.weight"].shape == (2, 20, 16)
    assert not torch.equal(res.updates["blocks.0.fc1.weight"][0], res.updates["blocks.0.fc1.weight"][1])


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "per-user"])
def test_decepticons_under_fedavg_through_flower_matches_the_simulated_round(tmp_path: Path, secure: bool) -> None:
    """2 local SGD steps per user, the server reading the sum or each user's update: Flower (each client trains with
    round_updates, float32 weights on the wire) gives every count of the simulated round; the default scale under
    FedAvg is 1e-3 in both transports; per-user reads recover at least what the sum's read does (checked on the
    simulated pair)."""
    cfg = SMALL | FEDAVG | {"aggregation": {"secure": secure}}
    sim, fl = (run(cfg | {"transport": t}, tmp_path, t) for t in ("simulated", "flower"))
    assert sim["settings"]["scale"] == fl["settings"]["scale"] == 1e-3
    assert sim["settings"]["protocol"] == "fedavg" and sim["settings"]["local_steps"] == 2
    same_counts(sim, fl)
    assert fl["recovered"]["k"] > 0
    if not secure:
        summed = run(cfg | {"aggregation": {"secure": True}}, tmp_path, "summed")
        assert all(p >= s for p, s in zip(pairs(sim), pairs(summed), strict=True))


def test_one_fedavg_step_recovers_what_fedsgd_does_and_more_steps_less(tmp_path: Path) -> None:
    """At scale 1e-3 one local step is FedSGD's update read off float32 weights: the same pairs; 8 local steps move
    the planted codes and bins, and fewer pairs of the 4 users' sum decode."""
    fedsgd = run(SMALL | {"decepticons": SMALL["decepticons"] | {"scale": 1e-3}}, tmp_path, "fedsgd")
    one = run(SMALL | FEDAVG | {"local_epochs": 1}, tmp_path, "one")
    eight = run(SMALL | FEDAVG | {"local_epochs": 8}, tmp_path, "eight")
    assert pairs(one) == pairs(fedsgd) and pairs(one)[1] > 0
    assert eight["settings"]["local_steps"] == 8 and pairs(eight)[1] < pairs(one)[1]


def test_a_pretrained_tinygpt_from_model_init(tmp_path: Path) -> None:
    """``model.init`` gives the users' TinyGPT its (here: perturbed) weights. The planting overwrites the token and
    position embeddings and the whole first block with the same values whatever the start, and keeps the later block,
    the final LayerNorm and the head of the file bit for bit; the kind runs on it (FedAvg, both transports agree)."""
    data = load_dataset(TEXT)
    torch.manual_seed(7)
    fresh = TinyGPT(data.num_classes, 16, d_model=32)
    pretrained = TinyGPT(data.num_classes, 16, d_model=32)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.3 * torch.randn_like(p))
    public = data.test.x.round().long()
    a, b = (plant_decepticon(m, public, bins=64, scale=1e-3, tag_tokens=2, generator=torch.Generator().manual_seed(0))
            for m in (fresh, pretrained))
    sa, sb, sp = a.state_dict(), b.state_dict(), pretrained.state_dict()
    for k in sb:
        if k.startswith(("tok.", "pos.", "blocks.0.")):
            assert torch.equal(sa[k], sb[k]), k  # overwritten, independently of the start
        else:
            assert torch.equal(sb[k], sp[k]), k  # the pretrained values kept
    path = tmp_path / "gpt.pt"
    torch.save(pretrained.state_dict(), path)
    cfg = SMALL | FEDAVG | {"model": SMALL["model"] | {"init": str(path)}}
    sim, fl = (run(cfg | {"transport": t}, tmp_path, t) for t in ("simulated", "flower"))
    same_counts(sim, fl)
    assert sim["settings"]["model_init"] == str(path.resolve()) and sim["recovered"]["k"] > 0
