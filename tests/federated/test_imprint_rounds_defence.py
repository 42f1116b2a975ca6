"""The imprint repeated over several rounds with a client defence (``attack: imprint``, ``rounds`` > 1, ``defence:``),
in process and through Flower. Each round the server re-plants its bins and reads that round's (defended) aggregate;
every user defends each round's update with its own noise generator, its stream continuing from round to round (as
in the inversion attacks' rounds); the same rounds' plain updates are read too (``metrics.defence.without`` and each
round's ``without``).

Several imprint rounds are not the same computation in the two transports (before the defence too): in process the
global model stays as it is and the bins are planted anew every round (a random measurement is drawn again), each
user's batch drawn from the trial's generator; through Flower FedAvg trains the model between rounds, the strategy
re-writes the same bins, and each client draws its batch with its own generator. So each transport is checked against
itself: the plain comparison is the undefended run of the same rounds, and (in process) round 1 is the one-round
defended run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from mlaudit.experiments import run_experiment  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time

IMPRINT: dict[str, Any] = {
    "kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32, "norm": "none"}, "recipe": "fast",
    "attack": "imprint", "users": 3, "batch": 4, "imprint": {"bins": 32, "scale": 1e-3}, "seed": 0, "grid": 0}
PRUNE = {"defence": {"method": "prune", "prune": 0.5}}


def run(config: dict[str, Any], tmp_path: Path, name: str) -> dict[str, Any]:
    return run_experiment(config, out=tmp_path / name, device="cpu", store=tmp_path / "runs.db",
                          quiet=True).results["metrics"]


@pytest.mark.parametrize("transport", ["simulated", "flower"])
def test_a_client_defence_over_several_imprint_rounds(tmp_path: Path, transport: str) -> None:
    """3 FedSGD rounds with pruning 50%: the attack on the same rounds' plain updates is the undefended 3-round run
    (per round and pooled), the defence costs verbatim inputs, and the distortion covers every user's update of every
    round. In process, round 1 of the defended run is the one-round defended run (pruning is deterministic)."""
    cfg = IMPRINT | {"transport": transport, "rounds": 3}
    plain, pruned = run(cfg, tmp_path, "plain"), run(cfg | PRUNE, tmp_path, "pruned")
    d, rounds = pruned["defence"], pruned["imprint"]["rounds"]
    assert (d["without"]["recovered"]["k"], d["without"]["exact"]["k"]) == (plain["recovered"]["k"], plain["exact"]["k"])
    assert [r["without"]["exact"] for r in rounds] == [r["exact"] for r in plain["imprint"]["rounds"]]
    assert [r["without"]["cumulative_exact"] for r in rounds] == [r["cumulative_exact"] for r in plain["imprint"]["rounds"]]
    assert d["with"]["exact"]["k"] == pruned["exact"]["k"] < plain["exact"]["k"]
    assert d["update_distortion"]["users"] == 3 * 3 and d["update_distortion"]["mean"] > 0.1
    cum = [r["cumulative_exact"] for r in rounds]
    assert cum == sorted(cum) and all(r["cumulative_exact"] <= r["without"]["cumulative_exact"] for r in rounds)
    if transport == "simulated":
        one = run(IMPRINT | PRUNE, tmp_path, "one")
        assert rounds[0]["exact"] * 12 == pytest.approx(one["exact"]["k"]) and one["exact"]["k"] > 0


def test_client_noise_over_several_imprint_rounds_leaves_nothing_verbatim(tmp_path: Path) -> None:
    """Noise 1e-4 on every round's update (each user's stream continuing): no input comes back verbatim in any round,
    some still above 30 dB; the plain updates of the same rounds give the undefended run."""
    cfg = IMPRINT | {"rounds": 3}
    plain = run(cfg, tmp_path, "plain")
    noised = run(cfg | {"defence": {"method": "noise", "sigma": 1e-4}}, tmp_path, "noised")
    assert noised["exact"]["k"] == 0 and noised["recovered"]["k"] > 0
    assert all(r["exact"] == 0 for r in noised["imprint"]["rounds"])
    assert noised["defence"]["without"]["exact"]["k"] == plain["exact"]["k"] > 0
