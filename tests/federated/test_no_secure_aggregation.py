"""A malicious server without secure aggregation (``aggregation.secure: false``), through Flower and in process: the
imprint's ``ImprintStrategy(target="clients")`` and Decepticons' ``CuriousStrategy(target="clients")`` read each
client's own update with the one read-out (``imprint()``, ``decepticons()``). Flower gives the simulated round's
metrics for the same seed (tolerances of ``test_flower_imprint.py``: counts equal, PSNR quartiles to 0.1 dB capped at
80 dB), and on the same round the per-user reads recover at least what the read of the users' sum does: an input
alone in its bin among all users' inputs is alone among its own user's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from decepticons_checks import same_counts, same_defence

from mlaudit.attacks.federated import Observation, imprint  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.experiments.federated import EXACT_DB  # noqa: E402
from mlaudit.federated import user_gradients  # noqa: E402
from mlaudit.federated.flower import ImprintStrategy, TorchClient, TrustedAggregator, run_flower_audit  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time

IMPRINT: dict[str, Any] = {
    "kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32, "norm": "none"}, "recipe": "fast",
    "attack": "imprint", "users": 3, "batch": 4, "imprint": {"bins": 32, "scale": 1e-3}, "seed": 0, "grid": 0,
    "protocol": "fedavg", "local_epochs": 2, "local_batch": 2, "local_lr": 0.1}
FEDSGD: dict[str, Any] = {"protocol": "fedsgd", "local_epochs": None, "local_batch": None}
TEXT = {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}}
DECEPTICONS: dict[str, Any] = {
    "kind": "federated", "dataset": TEXT, "recipe": "fast", "attack": "decepticons",
    "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}}, "users": 4, "batch": 2, "seed": 3,
    "decepticons": {"tag_tokens": 2, "user_counts": [1, 4], "scale": 1e-3}}


def run(config: dict[str, Any], tmp_path: Path, name: str) -> dict[str, Any]:
    cfg = {k: v for k, v in config.items() if v is not None}
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db",
                          quiet=True).results["metrics"]


def same_recovery(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    assert (fl["recovered"]["n"], fl["recovered"]["k"], fl["exact"]["k"]) == (
        sim["recovered"]["n"], sim["recovered"]["k"], sim["exact"]["k"])
    for q in ("q1", "median", "q3"):
        if q in sim["psnr"] or q in fl["psnr"]:
            assert abs(min(fl["psnr"][q], EXACT_DB) - min(sim["psnr"][q], EXACT_DB)) <= 0.1, q


@pytest.mark.parametrize("change", [{}, FEDSGD], ids=["fedavg-4-steps", "fedsgd"])
def test_the_imprint_without_secure_aggregation_through_flower_reads_each_client_as_in_process(
        tmp_path: Path, change: dict[str, Any]) -> None:
    """The server reads each of the 3 clients' updates alone: Flower gives the simulated round's recovery, and on
    the same round (same batches, same bins) the per-user reads recover at least what the sum's read does. Under
    FedSGD every input alone in its bin among its own user's comes back verbatim (more than from the sum); after 4
    local steps the bins have moved and fewer do."""
    runs = {(t, secure): run(IMPRINT | change | {"transport": t, "aggregation": {"secure": secure}}, tmp_path,
                             f"{t}-{secure}")
            for t in ("simulated", "flower") for secure in (True, False)}
    for secure in (True, False):
        same_recovery(runs["simulated", secure], runs["flower", secure])
    per_user, summed = runs["flower", False], runs["flower", True]
    assert per_user["secure_aggregation"] is False and per_user["settings"]["inputs_per_update"] == 4
    assert per_user["imprint"]["inputs_alone_in_a_bin"] >= summed["imprint"]["inputs_alone_in_a_bin"]
    assert per_user["exact"]["k"] >= summed["exact"]["k"] and per_user["recovered"]["k"] >= summed["recovered"]["k"]
    if change:  # FedSGD: every input alone in its own user's bin, verbatim
        assert per_user["exact"]["k"] == per_user["imprint"]["inputs_alone_in_a_bin"] > summed["exact"]["k"]


@pytest.mark.parametrize("change", [{"aggregation": {"secure": False, "clip": 0.5, "noise_multiplier": 1e-4}},
                                    {"aggregation": {"secure": False}, "defence": {"method": "prune", "prune": 0.5}}],
                         ids=["server-clip-noise-per-client", "client-prune"])
def test_defences_on_the_imprint_without_secure_aggregation_through_flower_match_the_simulated_round(
        tmp_path: Path, change: dict[str, Any]) -> None:
    """Server-side clipping and noise on each client's update (the strategy's aggregator, drawing in client order as
    the simulated round draws in user order), and a client's pruning with its plain comparison: the same metrics."""
    sim, fl = (run(IMPRINT | change | {"transport": t}, tmp_path, t) for t in ("simulated", "flower"))
    same_recovery(sim, fl)
    if "defence" in change:
        for side in ("with", "without"):
            s, f = sim["defence"][side], fl["defence"][side]
            assert (s["recovered"]["k"], s["exact"]["k"]) == (f["recovered"]["k"], f["exact"]["k"]), side
        assert fl["defence"]["without"]["exact"]["k"] > fl["defence"]["with"]["exact"]["k"]
    else:
        assert fl["exact"]["k"] < fl["imprint"]["inputs_alone_in_a_bin"]  # the noise costs verbatim inputs


def test_the_strategy_reads_each_clients_update_as_imprint_on_its_in_process_gradient() -> None:
    """``ImprintStrategy(target="both")`` in float64: each client's candidates equal ``imprint()`` on that user's
    FedSGD gradient in process (to 1e-7), and the aggregate's stay as before; bad targets are refused."""
    g = torch.Generator().manual_seed(1)
    public = torch.rand(400, 1, 6, 6, generator=g)
    torch.manual_seed(1)
    model = build_model("mlp", input_shape=(1, 6, 6), num_classes=4)
    users = [(torch.rand(8, 1, 6, 6, generator=g).double(), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    strategy = ImprintStrategy(model, public, bins=32, min_clients=3, scale=1.0, target="both")
    clients = [TorchClient(strategy.client_model().double(), x, y, lr=0.5, dtype=torch.float64, client_id=u)
               for u, (x, y) in enumerate(users)]
    r = run_flower_audit(strategy, clients, rounds=1).rounds[1]
    assert r.reconstruction is not None and len(r.client_reconstructions) == 3
    mal = strategy.client_model().double()
    for u, (x, y) in enumerate(users):
        grad = ParamVector({k: v[0] for k, v in user_gradients(mal, x[None], y[None]).items()})
        want = imprint(mal, Observation(grad=grad, users=1, batch=8, input_shape=(1, 6, 6)))
        got = r.client_reconstructions[[m["client_id"] for m in r.client_metrics].index(u)]
        assert got.info["bin_index"] == want.info["bin_index"] and len(want.x) > 0
        torch.testing.assert_close(got.x, want.x, rtol=1e-7, atol=1e-7)
    with pytest.raises(ConfigError, match=r"target = 'users'; allowed: aggregate, clients, both"):
        ImprintStrategy(model, public, bins=8, target="users")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"target = 'both' with an aggregator's noise"):
        ImprintStrategy(model, public, bins=8, target="both", aggregator=TrustedAggregator(1.0, 0.5), lr=0.1)


def test_decepticons_without_secure_aggregation_through_flower_reads_each_client_as_in_process(tmp_path: Path) -> None:
    """The server reads each of the first n users' updates alone and pools the rows: Flower (one run per model, every
    client's update) gives the simulated metrics at 1 and 4 users, and the per-user reads recover at least the
    pairs the sum's read does on the same round (at 4 users clearly more: fewer tokens share a bin)."""
    runs = {(t, secure): run(DECEPTICONS | {"transport": t, "aggregation": {"secure": secure}}, tmp_path,
                             f"{t}-{secure}")
            for t in ("simulated", "flower") for secure in (True, False)}
    for secure in (True, False):
        same_counts(runs["simulated", secure], runs["flower", secure])
    per_user, summed = runs["flower", False], runs["flower", True]
    assert per_user["secure_aggregation"] is False and per_user["settings"]["secure_aggregation"] is False
    for p, s in zip(per_user["decepticons"]["per_users"], summed["decepticons"]["per_users"], strict=True):
        assert p["pairs"]["k"] >= s["pairs"]["k"] and p["in_sequence"] >= s["in_sequence"] - 1e-12
        assert p["bag_of_tokens_recall"] == s["bag_of_tokens_recall"] == 1.0
    assert per_user["decepticons"]["per_users"][0]["pairs"]["k"] == summed["decepticons"]["per_users"][0]["pairs"]["k"]
    assert per_user["recovered"]["k"] > summed["recovered"]["k"]
    assert "updates alone (no secure aggregation)" in (tmp_path / "flower-False" / "report.html").read_text()


@pytest.mark.parametrize("change", [{"defence": {"method": "prune", "prune": 0.5}},
                                    {"aggregation": {"secure": False, "clip": 0.5, "noise_multiplier": 1e-6}}],
                         ids=["client-prune", "server-clip-noise-per-client"])
def test_defences_on_decepticons_without_secure_aggregation_through_flower_match_the_simulated_round(
        tmp_path: Path, change: dict[str, Any]) -> None:
    cfg = DECEPTICONS | {"aggregation": {"secure": False}} | change
    sim, fl = (run(cfg | {"transport": t}, tmp_path, t) for t in ("simulated", "flower"))
    same_counts(sim, fl)
    if "defence" in change:
        same_defence(sim, fl)
    else:
        assert fl["recovered"]["k"] > 0
