"""The malicious server through Flower beyond a plain FedSGD round (``transport: flower``, issue 20): the imprint
(module and parameter variants) under FedAvg local steps and client defences, and server-side ``aggregation.clip``
/ ``noise_multiplier`` (a trusted aggregator's, in the strategy's aggregate step) for the imprint and the
honest-but-curious attacks. Each newly allowed path gives the simulated path's metrics for the same seed.

Tolerances, as in ``test_flower_rounds.py``: counts (recovered, exact, alone in a bin, labels) equal; test
accuracies to one test image; PSNRs to 0.1 dB *below the exact line*: an input recovered verbatim has a PSNR of
100-150 dB that measures float rounding only (float32 gradients in process, float32 weights on the wire through
Flower), so PSNR quartiles are compared capped at 80 dB (:data:`~mlaudit.experiments.federated.EXACT_DB`), where
both transports count the input as exact.

Client noise (``noise``, ``clip-noise`` with sigma > 0) is not compared through the kind: a simulated one-round run
draws all users' defence noise from one generator, a Flower client from its own (``client_generator``), so the two
add different (equally distributed) noise. The library test below checks instead that what the Flower server reads
is the in-process aggregate of the same per-user noise (``defend_each``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from mlaudit.attacks.federated import Observation, imprint  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.experiments.federated import EXACT_DB  # noqa: E402
from mlaudit.federated import round_updates, secure_aggregate  # noqa: E402
from mlaudit.federated.defences import client_generator, defend_each  # noqa: E402
from mlaudit.federated.flower import (  # noqa: E402
    CuriousStrategy,
    ImprintStrategy,
    TorchClient,
    TrustedAggregator,
    run_flower_audit,
)
from mlaudit.federated.updates import local_seed  # noqa: E402
from mlaudit.models import build_model  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time

IMPRINT: dict[str, Any] = {
    "kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32, "norm": "none"}, "recipe": "fast",
    "attack": "imprint", "users": 3, "batch": 4, "imprint": {"bins": 32, "scale": 1e-3}, "seed": 0, "grid": 0,
    "protocol": "fedavg", "local_epochs": 2, "local_batch": 2, "local_lr": 0.1}
"""3 users x 4 images, FedAvg with 2 local epochs in minibatches of 2 (4 local steps), 32 brightness bins at the
Flower scale in both transports (the simulated default is scale 1)."""

INVERSION: dict[str, Any] = {
    "kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32, "norm": "none"}, "recipe": "fast",
    "attack": "inverting-gradients", "users": 3, "batch": 1, "seed": 0, "rounds": 2, "protocol": "fedavg",
    "local_epochs": 2, "local_batch": 1, "local_lr": 0.01, "aggregation": {"secure": False},
    "inversion": {"steps": 100}, "grid": 0}

ONE_IMAGE = 1 / 359 + 1e-9  # digits' test split has 359 images


def both(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    runs = {t: run_experiment(config | {"transport": t}, out=tmp_path / t, device="cpu", store=tmp_path / "runs.db",
                              quiet=True).results["metrics"] for t in ("simulated", "flower")}
    return runs["simulated"], runs["flower"]


def same_recovery(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    """Counts equal; PSNR quartiles to 0.1 dB, capped at the exact line (module docstring); labels equal."""
    assert fl["recovered"]["n"] == sim["recovered"]["n"]
    assert (fl["recovered"]["k"], fl["exact"]["k"]) == (sim["recovered"]["k"], sim["exact"]["k"])
    for q in ("q1", "median", "q3"):
        if q in sim["psnr"] or q in fl["psnr"]:
            assert abs(min(fl["psnr"][q], EXACT_DB) - min(sim["psnr"][q], EXACT_DB)) <= 0.1, q
    assert fl["label_accuracy"] == sim["label_accuracy"]


@pytest.mark.parametrize("variant", ["module", "parameters"])
def test_the_imprint_under_fedavg_through_flower_matches_the_simulated_round(tmp_path: Path, variant: str) -> None:
    """4 local SGD steps move the bins, so only some of the inputs alone in a bin come back verbatim and the rest
    blur: the same ones, to the same PSNR, through Flower (each client trains alone, float32 weights on the wire) as
    in process (the users trained as one vmap'd stack); the same planted model and test accuracies."""
    cfg = IMPRINT | {"imprint": {"bins": 16 if variant == "parameters" else 32, "scale": 1e-3, "variant": variant}}
    sim, fl = both(cfg, tmp_path)
    assert fl["settings"]["transport"] == "flower" and fl["settings"]["local_steps"] == sim["settings"]["local_steps"] == 4
    assert fl["imprint"]["inputs_alone_in_a_bin"] == sim["imprint"]["inputs_alone_in_a_bin"] >= 4
    assert 1 <= sim["exact"]["k"] < sim["imprint"]["inputs_alone_in_a_bin"] or variant == "parameters"
    same_recovery(sim, fl)
    assert fl["imprint"]["test_accuracy"] == sim["imprint"]["test_accuracy"]
    html = (tmp_path / "flower" / "report.html").read_text()
    assert "ImprintStrategy" in html and "4 local SGD step(s)" in html


FEDSGD = {"protocol": "fedsgd", "local_epochs": 1, "local_batch": None}


@pytest.mark.parametrize("change", [
    {"defence": {"method": "prune", "prune": 0.5}}, {"defence": {"method": "quantise", "bits": 8}},
    {"defence": {"method": "clip-noise", "clip": 0.05, "sigma": 0.0}},
    FEDSGD | {"defence": {"method": "prune", "prune": 0.5}}],
    ids=["fedavg-prune", "fedavg-quantise", "fedavg-clip", "fedsgd-prune"])
def test_a_deterministic_client_defence_on_the_imprint_through_flower_matches_the_simulated_round(
        tmp_path: Path, change: dict[str, Any]) -> None:
    """A client defence (pruning, 8-bit quantisation, clipping each update) under FedAvg, and pruning under FedSGD
    (the client defends its exact gradient, not the float32 weight difference): the attack on the defended and on
    the plain updates of the same round, and each user's update distortion, agree."""
    cfg = {k: v for k, v in (IMPRINT | change).items() if v is not None}
    sim, fl = both(cfg, tmp_path)
    same_recovery(sim, fl)
    for side in ("with", "without"):
        s, f = sim["defence"][side], fl["defence"][side]
        assert (s["recovered"]["k"], s["exact"]["k"]) == (f["recovered"]["k"], f["exact"]["k"]), side
        assert abs(min(s["psnr"]["median"], EXACT_DB) - min(f["psnr"]["median"], EXACT_DB)) <= 0.1, side
    ds, df = sim["defence"]["update_distortion"], fl["defence"]["update_distortion"]
    assert df["users"] == ds["users"] == 3 and df["mean"] > 1e-3
    assert df["mean"] == pytest.approx(ds["mean"], rel=1e-3) and df["max"] == pytest.approx(ds["max"], rel=1e-3)


def test_a_noise_defence_through_flower_is_each_users_own_noise_on_the_in_process_update() -> None:
    """What the malicious server reads through Flower under client noise (FedAvg, 3 clients, sigma 1e-4) is the
    in-process aggregate of the same users' updates (:func:`round_updates`, the client's local seed), each noised
    from the user's own generator (:func:`defend_each` with :func:`client_generator`): the same candidates."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = build_model({"name": "mlp", "width": 16, "norm": "none"}, input_shape=(1, 6, 6), num_classes=4)
    public = torch.rand(300, 1, 6, 6, generator=g)
    x, y = torch.rand(3, 4, 1, 6, 6, generator=g), torch.randint(0, 4, (3, 4), generator=g)
    defence = {"method": "noise", "sigma": 1e-4}
    strategy = ImprintStrategy(model, public, bins=16, min_clients=3)
    clients = [TorchClient(strategy.client_model(), x[u], y[u], lr=0.1, seed=20 + u, epochs=1, local_batch=2,
                           defence=defence, client_id=u) for u in range(3)]
    got = run_flower_audit(strategy, clients, rounds=1).rounds[1].reconstruction
    mal = strategy.client_model()
    res = round_updates(mal, x, y, protocol="fedavg", lr=0.1, epochs=1, batch_size=2,
                        seeds=[local_seed(20 + u, 1) for u in range(3)], device="cpu")
    noised = defend_each(res.updates, [client_generator(20 + u) for u in range(3)], **defence)
    want = imprint(mal, Observation(grad=secure_aggregate(noised), users=3, batch=4, input_shape=(1, 6, 6)))
    plain = imprint(mal, Observation(grad=secure_aggregate(res.updates), users=3, batch=4, input_shape=(1, 6, 6)))
    assert got.info["bin_index"] == want.info["bin_index"] and len(want.x) > 0
    # the noise changed what the server reads (here it makes every bin's bias difference non-zero)
    assert want.info["bin_index"] != plain.info["bin_index"] or not torch.allclose(want.x, plain.x, atol=1e-3)
    torch.testing.assert_close(got.x.float(), want.x.float(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("change", [
    FEDSGD | {"aggregation": {"clip": 0.5, "noise_multiplier": 1e-4}},
    {"local_epochs": 1, "aggregation": {"clip": 0.5, "noise_multiplier": 1e-5}, "defence": {"method": "prune", "prune": 0.3}},
], ids=["fedsgd-clip-noise", "fedavg-clip-noise-prune"])
def test_server_side_clipping_and_noise_on_the_imprint_through_flower_match_the_simulated_round(
        tmp_path: Path, change: dict[str, Any]) -> None:
    """``aggregation.clip`` and ``noise_multiplier`` through Flower: the strategy clips each client's update and
    noises their sum with the kind's code and the simulated round's generator seed, so the server reads the same
    noised aggregate (and, with a defence, the plain comparison replays the same noise)."""
    cfg = {k: v for k, v in (IMPRINT | change).items() if v is not None}
    sim, fl = both(cfg, tmp_path)
    assert fl["settings"]["clip"] == 0.5 and fl["settings"]["noise_multiplier"] > 0
    same_recovery(sim, fl)
    assert fl["exact"]["k"] < fl["imprint"]["inputs_alone_in_a_bin"]  # the noise costs the attack its exact inputs
    if "defence" in cfg:
        for side in ("with", "without"):
            s, f = sim["defence"][side], fl["defence"][side]
            assert s["recovered"]["k"] == f["recovered"]["k"], side
            assert abs(min(s["psnr"]["median"], EXACT_DB) - min(f["psnr"]["median"], EXACT_DB)) <= 0.1, side


@pytest.mark.parametrize("secure", [False, True], ids=["per-client-noise", "noise-on-the-sum"])
def test_server_side_clipping_and_noise_under_an_inversion_attack_through_flower_match_the_simulated_rounds(
        tmp_path: Path, secure: bool) -> None:
    """Inverting Gradients over 2 FedAvg rounds with the server clipping every update and adding noise (to each
    update without secure aggregation, once to the sum with it): the same recovery and the same global model's
    test accuracy after each round (the model steps on the noised sum in both transports)."""
    cfg = INVERSION | {"aggregation": {"secure": secure, "clip": 1.0, "noise_multiplier": 0.01}}
    if secure:
        cfg |= {"batch": 2, "local_batch": 2}
    sim, fl = both(cfg, tmp_path)
    same_recovery(sim, fl)
    for a, b in zip(sim["training"]["rounds"], fl["training"]["rounds"], strict=True):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= ONE_IMAGE and a["recovered"] == b["recovered"]
        assert abs(a["psnr_median"] - b["psnr_median"]) <= 0.1


def test_several_fedavg_imprint_rounds_through_flower_accumulate(tmp_path: Path) -> None:
    """``rounds: 3`` under FedAvg through Flower: each client draws a fresh batch and trains 2 local steps per round,
    the strategy re-plants its bins (the rest of the model trains on); every round recovers inputs."""
    cfg = IMPRINT | {"local_epochs": 1, "rounds": 3, "transport": "flower"}
    m = run_experiment(cfg, out=tmp_path / "r", device="cpu", store=tmp_path / "runs.db", quiet=True).results["metrics"]
    rounds = m["imprint"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and m["exact"]["n"] == 3 * 3 * 4
    cum = [r["cumulative_exact"] for r in rounds]
    assert cum == sorted(cum) and cum[-1] > cum[0] > 0 and all(r["exact"] > 0 for r in rounds)


def test_the_trusted_aggregator_refuses_bad_input() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "width": 8, "norm": "none"}, input_shape=(1, 6, 6), num_classes=4)
    public = torch.rand(100, 1, 6, 6)
    with pytest.raises(ConfigError, match=r"clip = 0.0; allowed: a finite clip > 0"):
        TrustedAggregator(0.0)
    with pytest.raises(ConfigError, match=r"noise_multiplier = -1.0; allowed: a finite noise_multiplier >= 0"):
        TrustedAggregator(1.0, -1.0)
    with pytest.raises(ConfigError, match=r"needs the clients' lr > 0 .* got lr=None"):
        ImprintStrategy(model, public, bins=8, aggregator=TrustedAggregator(1.0))
    with pytest.raises(ConfigError, match=r"target = 'both' with an aggregator's noise.*allowed: one of those targets"):
        CuriousStrategy(model, (1, 6, 6), lr=0.1, target="both", aggregator=TrustedAggregator(1.0, 0.5))
