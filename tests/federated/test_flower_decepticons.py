"""Decepticons through Flower (``attack: decepticons`` with ``transport: flower``): per user count a Flower server
sends the planted TinyGPT as parameter values (each client builds the TinyGPT from the config's factory and loads
them) and one sends the unmodified model; both read the FedAvg aggregate of float32 weights. With the bins at scale
1e-3 in both transports (the Flower default) the kind's metrics equal the simulated round's for the same seed:
every count (pairs, tokens, sequences, non-empty and rejected bins, the honest bag of tokens), with a
deterministic client defence (its plain comparison and distortion too) and with server-side clipping and noise (the
same draws). Client noise is not compared: the simulated round draws all users' noise from one generator, a Flower
client from its own (test_flower_imprint.py checks the per-user noise on the imprint). ``attack: text-inversion``
through Flower (the honest server's round) inverts to the simulated round's sequences, with and without secure
aggregation and a client defence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from decepticons_checks import same_counts, same_defence

from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time

TEXT = {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}}
SMALL: dict[str, Any] = {"kind": "federated", "dataset": TEXT, "recipe": "fast", "attack": "decepticons",
                         "model": {"name": "mlaudit.models.gpt:tiny_gpt", "kwargs": {"d_model": 32}},
                         "users": 4, "batch": 2, "seed": 3,
                         "decepticons": {"tag_tokens": 2, "user_counts": [1, 4], "scale": 1e-3}}


def both(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    runs = {t: run_experiment(config | {"transport": t}, out=tmp_path / t, device="cpu", store=tmp_path / "runs.db",
                              quiet=True).results["metrics"] for t in ("simulated", "flower")}
    return runs["simulated"], runs["flower"]


def test_decepticons_through_flower_gives_the_simulated_rounds_metrics(tmp_path: Path) -> None:
    sim, fl = both(SMALL, tmp_path)
    assert fl["settings"]["transport"] == "flower" and fl["settings"]["scale"] == 1e-3
    same_counts(sim, fl)
    assert fl["recovered"]["k"] == sim["recovered"]["k"] >= 40  # most of 4 users x 2 x 16 tokens come back
    assert fl["seconds"]["flower_runs"] > 0
    assert "The round ran through Flower" in (tmp_path / "flower" / "report.html").read_text()


def test_flower_uses_scale_1e_3_by_default_and_the_bins_are_the_simulated_ones(tmp_path: Path) -> None:
    """Without ``decepticons.scale`` the Flower round plants at 1e-3 (float32 weights on the wire), the simulated one
    at 1: the same bins fire (ReLU), so the same pairs come back."""
    cfg = SMALL | {"decepticons": {"tag_tokens": 2}}
    sim, fl = both(cfg, tmp_path)
    assert (sim["settings"]["scale"], fl["settings"]["scale"]) == (None, 1e-3)
    same_counts(sim, fl)


@pytest.mark.parametrize("change", [{"defence": {"method": "prune", "prune": 0.5}},
                                    {"aggregation": {"secure": True, "clip": 0.5, "noise_multiplier": 1e-6}}],
                         ids=["client-prune", "server-clip-noise"])
def test_a_defence_on_decepticons_through_flower_gives_the_simulated_rounds_metrics(
        tmp_path: Path, change: dict[str, Any]) -> None:
    sim, fl = both(SMALL | change, tmp_path)
    same_counts(sim, fl)
    if "defence" in change:
        same_defence(sim, fl)
    else:
        assert 0 < fl["recovered"]["k"] < 61  # the noise costs some pairs, not all


def test_a_gelu_model_is_refused_through_flower_before_anything_is_written(tmp_path: Path) -> None:
    cfg = SMALL | {"transport": "flower", "model": {"name": "mlaudit.models.gpt:tiny_gpt",
                                                    "kwargs": {"d_model": 32, "activation": "gelu"}}}
    with pytest.raises(ConfigError, match=r"transport = 'flower' with attack = 'decepticons' and a 'gelu' TinyGPT .*"
                                          r"allowed: activation 'relu' with transport flower, or transport simulated"):
        run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change", [pytest.param({}, marks=pytest.mark.slow),  # ~7 s; make test-all runs it
                                    {"aggregation": {"secure": False}, "defence": {"method": "prune", "prune": 0.5}}],
                         ids=["secure", "per-client-prune"])
def test_the_text_inversion_through_flower_gives_the_simulated_rounds_metrics(tmp_path: Path, change: dict[str, Any]
                                                                              ) -> None:
    """``attack: text-inversion`` through Flower: the honest server's round over gRPC (the FedAvg aggregate, or each
    client's own update, a client defence and its plain comparison) inverts to the simulated round's sequences."""
    cfg = {k: v for k, v in SMALL.items() if k != "decepticons"} | {
        "attack": "text-inversion", "text_inversion": {"steps": 30, "refine": 10, "user_counts": [1, 4]}} | change
    sim, fl = both(cfg, tmp_path)
    assert fl["settings"]["transport"] == "flower" and fl["seconds"]["flower_runs"] > 0
    for s, f in zip(sim["text_inversion"]["per_users"], fl["text_inversion"]["per_users"], strict=True):
        assert (f["users"], f["pairs"]["k"], f["tokens"]["k"], f["bag_of_tokens_recall"]) == \
            (s["users"], s["pairs"]["k"], s["tokens"]["k"], s["bag_of_tokens_recall"])
    if "defence" in change:
        assert fl["defence"]["without"]["k"] == sim["defence"]["without"]["k"]
        assert fl["defence"]["update_distortion"]["mean"] == pytest.approx(sim["defence"]["update_distortion"]["mean"],
                                                                            rel=1e-4)
