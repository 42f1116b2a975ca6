"""Flower's simulation engine (``run_flower_simulation``: a ServerApp and a ClientApp through
``flwr.simulation.run_simulation``, the clients in Ray actors) with the malicious ImprintStrategy: 3 clients, 2
rounds, the candidates of each round equal ``imprint()`` on the in-process secure aggregate of the same users
(float64) in round 1, inputs alone in a bin come back verbatim in both rounds; bad input is refused before Ray
starts. (Clients that all fail raise RuntimeError, checked outside pytest: under pytest's capture Flower's own
"An error was encountered" came back and the process then hung at exit, so that path is not in the suite.) Marked ``ray``: one local Ray cluster at a time (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from test_flower import _setup  # noqa: E402

from mlaudit.attacks.federated import Observation, imprint  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.federated import secure_aggregate, user_gradients  # noqa: E402
from mlaudit.federated.flower import ImprintStrategy, TorchClient, run_flower_simulation  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.mark.slow  # ~20 s with Ray's start, which timed out once under make test's load (2 cores); make test-all
def test_the_simulation_engine_recovers_the_in_process_aggregates_candidates_each_round() -> None:
    model, public, users = _setup(1)
    users = [(x.double(), y) for x, y in users]
    strategy = ImprintStrategy(model, public, bins=32, min_clients=3, scale=1.0)
    clients = [TorchClient(strategy.client_model().double(), x, y, lr=0.5, dtype=torch.float64) for x, y in users]
    audit = run_flower_simulation(strategy, clients, rounds=2, num_cpus=2)
    assert sorted(audit.rounds) == [1, 2] and audit.seconds > 0
    mal = strategy.client_model().double()
    x, y = torch.stack([u[0] for u in users]), torch.stack([u[1] for u in users])
    want = imprint(mal, Observation(grad=ParamVector(secure_aggregate(user_gradients(mal, x, y))), users=3, batch=8,
                                    input_shape=(1, 6, 6)))
    got = audit.rounds[1].reconstruction
    assert audit.rounds[1].clients == 3 and got.info["bin_index"] == want.info["bin_index"]
    torch.testing.assert_close(got.x, want.x, rtol=1e-7, atol=1e-7)
    # round 2: the same batches, the imprint re-planted into a model FedAvg trained: the inputs alone in their bin
    # come back verbatim again (a bin shared by several inputs mixes them with the new model's weights)
    flat = x.flatten(0, 1)
    b = mal.bin_of(flat)
    alone = flat[(b >= 0) & (torch.bincount(b.clamp(min=0), minlength=32)[b.clamp(min=0)] == 1)].flatten(1)
    assert len(alone) >= 5
    for r in (1, 2):
        rec = audit.rounds[r].reconstruction.x.flatten(1)
        assert float(torch.cdist(alone, rec).min(1).values.max()) < 1e-7, r


def test_bad_input_is_refused_before_ray_starts() -> None:
    model, public, users = _setup(2)
    strategy = ImprintStrategy(model, public, bins=16, min_clients=2)
    clients = [TorchClient(strategy.client_model(), x, y, lr=0.1) for x, y in users[:2]]
    with pytest.raises(ConfigError, match="1 clients for a strategy waiting for min_clients = 2"):
        run_flower_simulation(strategy, clients[:1])
    with pytest.raises(ConfigError, match="rounds = 0"):
        run_flower_simulation(strategy, clients, rounds=0)
    with pytest.raises(ConfigError, match="client_cpus = 0"):
        run_flower_simulation(strategy, clients, client_cpus=0)
