"""The Flower integration (mlaudit.federated.flower): a 3-client, 2-round Flower run over gRPC on
127.0.0.1 in which the malicious ImprintStrategy reads users' inputs verbatim off the FedAvg aggregate;
the same candidates as the in-process secure aggregate; the loopback guard; bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from mlaudit.attacks.federated import Observation, imprint, match, plant_imprint  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.federated import secure_aggregate, user_gradients  # noqa: E402
from mlaudit.federated.flower import ImprintStrategy, TorchClient, check_address, run_flower_audit  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402

pytestmark = pytest.mark.xdist_group("flower")  # one gRPC run at a time


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    public = torch.rand(400, 1, 6, 6, generator=g)
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=(1, 6, 6), num_classes=4)
    users = [(torch.rand(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    return model, public, users


def test_three_clients_two_rounds_recover_inputs_verbatim_from_the_aggregate() -> None:
    model, public, users = _setup()
    strategy = ImprintStrategy(model, public, bins=64, min_clients=3)
    clients = [TorchClient(strategy.client_model(), x, y, lr=0.1) for x, y in users]
    out = run_flower_audit(strategy, clients, rounds=2)
    true = torch.cat([x for x, _ in users])
    assert sorted(out.rounds) == [1, 2]
    for r in out.rounds.values():
        assert (r.clients, r.examples) == (3, 24)
        m = match(true, r.reconstruction.x.float(), data_range=1.0)
        exact = int(m.recovered(80.0).sum())
        # the inputs alone in their bin come back (float32 weights on the wire): at least one, and as
        # many as the bin arithmetic allows
        alone = torch.bincount(strategy.malicious.bin_of(true) + 1, minlength=65)
        assert exact >= 1
        assert exact >= int((alone[strategy.malicious.bin_of(true) + 1] == 1).sum()) - 2
    # the global model moved (FedAvg ran), yet the imprint module was re-planted for round 2
    assert len(out.rounds[2].reconstruction.x) > 0


def test_the_strategy_reads_the_same_candidates_as_the_in_process_secure_aggregate() -> None:
    """Clients in float64 (model, data and wire): the candidates from Flower's FedAvg equal imprint() on
    the sum of the users' FedSGD gradients (the ratio cancels lr and the n_u / N weights)."""
    model, public, users = _setup(1)
    users = [(x.double(), y) for x, y in users]
    strategy = ImprintStrategy(model, public, bins=32, min_clients=3, scale=1.0)
    clients = [TorchClient(strategy.client_model().double(), x, y, lr=0.5, dtype=torch.float64) for x, y in users]
    got = run_flower_audit(strategy, clients, rounds=1).rounds[1].reconstruction
    mal = strategy.client_model().double()
    x = torch.stack([u[0] for u in users])
    y = torch.stack([u[1] for u in users])
    agg = secure_aggregate(user_gradients(mal, x, y))
    want = imprint(mal, Observation(grad=ParamVector(agg), users=3, batch=8, input_shape=(1, 6, 6)))
    assert got.info["bin_index"] == want.info["bin_index"]
    torch.testing.assert_close(got.x, want.x, rtol=1e-7, atol=1e-7)


def test_the_scale_option_keeps_the_bins_and_the_recovery() -> None:
    model, public, users = _setup(2)
    a = plant_imprint(model, public, bins=16)
    b = plant_imprint(model, public, bins=16, scale=1e-3)
    x = torch.cat([u[0] for u in users])
    assert torch.equal(a.bin_of(x), b.bin_of(x))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)  # the model sees the same input
    with pytest.raises(ConfigError, match="scale"):
        plant_imprint(model, public, bins=4, scale=0.0)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.org", "::"])
def test_a_non_loopback_address_needs_allow_remote(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        check_address(host, allow_remote=False)
    check_address(host, allow_remote=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_addresses_are_accepted(host: str) -> None:
    check_address(host, allow_remote=False)


def test_bad_input_is_refused_before_any_server_starts() -> None:
    model, public, users = _setup()
    with pytest.raises(ConfigError, match="no data"):
        TorchClient(model, users[0][0][:0], users[0][1][:0])
    strategy = ImprintStrategy(model, public, bins=8, min_clients=3)
    clients = [TorchClient(strategy.client_model(), x, y) for x, y in users[:2]]
    with pytest.raises(ConfigError, match="min_clients"):
        run_flower_audit(strategy, clients)
    with pytest.raises(ConfigError, match="rounds"):
        run_flower_audit(strategy, clients, rounds=0)
    with pytest.raises(ConfigError, match="loopback"):
        run_flower_audit(strategy, clients, host="0.0.0.0")
    with pytest.raises(ConfigError, match="bins"):
        ImprintStrategy(model, public[:4], bins=8)


def test_the_federated_kind_runs_its_round_through_flower(tmp_path) -> None:  # noqa: ANN001
    """``transport: flower``: the same bins as the simulated round (same seed), and the inputs alone in
    their bin come back verbatim from float32 weights on the wire."""
    from mlaudit.experiments import run_experiment

    base = {"kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32}, "recipe": "fast",
            "attack": "imprint", "users": 4, "batch": 8, "imprint": {"bins": 64}, "seed": 0}
    runs = {t: run_experiment(base | {"transport": t}, out=tmp_path / t, device="cpu", store=tmp_path / "runs.db",
                              quiet=True).results["metrics"] for t in ("simulated", "flower")}
    fl, sim = runs["flower"], runs["simulated"]
    assert fl["settings"]["transport"] == "flower" and fl["settings"]["imprint_scale"] == 1e-3
    assert fl["imprint"]["inputs_alone_in_a_bin"] == sim["imprint"]["inputs_alone_in_a_bin"] > 0
    assert fl["exact"]["k"] >= fl["imprint"]["inputs_alone_in_a_bin"] - 1



def test_clients_draw_a_fresh_batch_each_round_and_each_round_reveals_its_own_inputs() -> None:
    model, public, _ = _setup(3)
    g = torch.Generator().manual_seed(3)
    local = [(torch.rand(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]
    strategy = ImprintStrategy(model, public, bins=64, min_clients=3)
    clients = [TorchClient(strategy.client_model(), x, y, batch=4, seed=u) for u, (x, y) in enumerate(local)]
    out = run_flower_audit(strategy, clients, rounds=2)
    for c in clients:
        assert len(c.drawn) == 2 and not torch.equal(c.drawn[0], c.drawn[1])
    for r in (1, 2):
        assert out.rounds[r].examples == 12
        drawn = torch.cat([x[c.drawn[r - 1]] for c, (x, _) in zip(clients, local, strict=True)])
        other = torch.cat([x[c.drawn[2 - r]] for c, (x, _) in zip(clients, local, strict=True)])
        rec = out.rounds[r].reconstruction.x.float()
        assert int(match(drawn, rec, data_range=1.0).recovered(80.0).sum()) >= 1
        # the other round's inputs do not come back, except those drawn in this round too
        also_now = (other[:, None] == drawn[None]).flatten(2).all(2).any(1)
        assert int(match(other[~also_now], rec, data_range=1.0).recovered(80.0).sum()) == 0
    with pytest.raises(ConfigError, match="batch = 17"):
        TorchClient(model, *local[0], batch=17)


def test_the_federated_kind_runs_several_flower_rounds_and_accumulates(tmp_path) -> None:  # noqa: ANN001
    from mlaudit.experiments import run_experiment

    cfg = {"kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32}, "recipe": "fast",
           "attack": "imprint", "users": 3, "batch": 8, "imprint": {"bins": 64}, "seed": 0,
           "transport": "flower", "rounds": 3}
    m = run_experiment(cfg, out=tmp_path / "r", device="cpu", store=tmp_path / "runs.db", quiet=True).results["metrics"]
    rounds = m["imprint"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and m["exact"]["n"] == 3 * 3 * 8
    cum = [r["cumulative_exact"] for r in rounds]
    assert cum == sorted(cum) and cum[-1] > cum[0] > 0  # fresh batches reveal new inputs
    assert all(0 < r["exact"] <= 1 for r in rounds)



def _user_mlp(seed: int) -> torch.nn.Module:
    """The clients' own architecture: each client builds it from the zoo's MLP class (norm none)."""
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "norm": "none", "width": 96}, input_shape=(1, 6, 6), num_classes=4)


def test_parameter_only_variant_over_three_clients_and_two_rounds() -> None:
    """variant='parameters': the global model is the user's architecture (same state_dict keys), clients build
    their model from the user's class, the server re-plants only the planted rows and columns each round and
    reads inputs verbatim off the FedAvg aggregate of float32 weights."""
    import numpy as np

    _, public, users = _setup(4)
    user = _user_mlp(0)
    strategy = ImprintStrategy(user, public, bins=64, variant="parameters", min_clients=3)
    assert type(strategy.client_model()) is type(user)
    assert list(strategy.client_model().state_dict()) == list(user.state_dict())
    sent: list[list[np.ndarray]] = []
    configure = strategy.configure_fit

    def spy(server_round: int, parameters, client_manager):  # noqa: ANN001, ANN202
        out = configure(server_round, parameters, client_manager)
        sent.append(strategy._sent[server_round])
        return out

    strategy.configure_fit = spy  # type: ignore[method-assign]
    clients = [TorchClient(_user_mlp(10 + u), x, y, lr=0.1) for u, (x, y) in enumerate(users)]
    out = run_flower_audit(strategy, clients, rounds=2)
    true = torch.cat([x for x, _ in users])
    b = strategy.malicious.bin_of(true)
    alone = int(((b >= 0) & (torch.bincount(b.clamp(min=0), minlength=64)[b.clamp(min=0)] == 1)).sum())
    assert alone >= 5
    for r in (1, 2):
        m = match(true, out.rounds[r].reconstruction.x.float(), data_range=1.0)
        assert int(m.recovered(80.0).sum()) >= max(1, alone - 2), r
    keys = list(user.state_dict())
    for s in strategy.malicious.planted():  # round 2 sent the planted entries again, though FedAvg moved them
        i = keys.index(s.name)
        assert np.array_equal(s.read(sent[1][i]), s.values.numpy())
    w1 = keys.index("net.1.weight")
    assert not np.array_equal(sent[0][w1], sent[1][w1])  # the rest of the layer trained on


def test_parameter_only_strategy_reads_the_in_process_aggregates_candidates() -> None:
    _, public, users = _setup(5)
    users = [(x.double(), y) for x, y in users]
    strategy = ImprintStrategy(_user_mlp(1), public, bins=32, variant="parameters", min_clients=3, scale=1.0)
    clients = [TorchClient(_user_mlp(20 + u).double(), x, y, lr=0.5, dtype=torch.float64)
               for u, (x, y) in enumerate(users)]
    got = run_flower_audit(strategy, clients, rounds=1).rounds[1].reconstruction
    planted = strategy.malicious.double()
    x, y = torch.stack([u[0] for u in users]), torch.stack([u[1] for u in users])
    agg = secure_aggregate(user_gradients(planted, x, y))
    want = imprint(planted, Observation(grad=ParamVector(agg), users=3, batch=8, input_shape=(1, 6, 6)))
    assert got.info["bin_index"] == want.info["bin_index"] and len(want.x) > 0
    torch.testing.assert_close(got.x, want.x, rtol=1e-7, atol=1e-7)


def test_the_variant_option_is_checked() -> None:
    model, public, _ = _setup()
    with pytest.raises(ConfigError, match="allowed: module, parameters"):
        ImprintStrategy(model, public, bins=8, variant="rows")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layer choose"):
        ImprintStrategy(model, public, bins=8, layer="net.1")
    with pytest.raises(ConfigError, match="'net.1' has bias=False"):  # the zoo default (BatchNorm) drops the bias
        ImprintStrategy(model, public, bins=8, variant="parameters")


def _rel(a: ParamVector, b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters."""
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def test_the_curious_server_inverts_each_clients_update_and_the_aggregate_through_flower() -> None:
    """An honest-but-curious Flower server (the model sent unchanged): what it inverts is each client's FedSGD
    gradient and their sum (float32 weights on the wire), and Inverting Gradients brings each client's one
    input back from its own update."""
    from mlaudit.attacks.federated import psnr
    from mlaudit.federated.flower import CuriousStrategy

    model, _, users = _setup(4)
    users = [(x[:1], y[:1]) for x, y in users]
    strategy = CuriousStrategy(model, (1, 6, 6), lr=0.1, target="both", min_clients=3, options={"steps": 300})
    clients = [TorchClient(strategy.client_model(), x, y, lr=0.1) for x, y in users]
    r = run_flower_audit(strategy, clients, rounds=1).rounds[1]
    assert (r.clients, r.examples, r.client_examples) == (3, 3, [1, 1, 1]) and len(r.clients_x) == 3
    true = [{k: v[0] for k, v in user_gradients(model, x[None], y[None]).items()} for x, y in users]
    xs = torch.cat([x for x, _ in users])
    for rec, obs in zip(r.client_reconstructions, r.observations["clients"], strict=True):
        assert (obs.users, obs.batch) == (1, 1)
        assert min(_rel(obs.grad, t) for t in true) < 1e-3  # the update is that client's own gradient
        assert max(float(psnr(rec.x, xs[i:i + 1], data_range=1.0)[0]) for i in range(3)) > 25.0
    agg = r.observations["aggregate"]
    total = secure_aggregate(user_gradients(model, xs.view(3, 1, 1, 6, 6), torch.cat([y for _, y in users]).view(3, 1)))
    assert (agg.users, agg.batch) == (3, 1) and _rel(agg.grad, total) < 1e-3
    assert r.aggregate is not None and r.aggregate.x.shape == (3, 1, 6, 6)


def test_a_client_defence_changes_the_update_the_server_sees() -> None:
    """``TorchClient(defence=...)``: the shared update is the defended gradient (pruning: at least 90% of each
    tensor's entries arrive as exact zeros, the rest as the gradient's largest entries)."""
    from mlaudit.federated.defences import defend_updates
    from mlaudit.federated.flower import CuriousStrategy

    model, _, users = _setup(5)
    strategy = CuriousStrategy(model, (1, 6, 6), lr=0.1, target="clients", min_clients=3, options={"steps": 1})
    clients = [TorchClient(strategy.client_model(), x, y, lr=0.1, defence={"method": "prune", "prune": 0.9})
               for x, y in users]
    r = run_flower_audit(strategy, clients, rounds=1).rounds[1]
    want = [{k: v[0] for k, v in defend_updates(user_gradients(model, x[None], y[None]), method="prune",
                                                  prune=0.9).items()} for x, y in users]
    for obs in r.observations["clients"]:
        for t in obs.grad.values():
            assert int((t == 0).sum()) >= int(0.9 * t.numel())
        assert min(_rel(obs.grad, w) for w in want) < 1e-3


def test_the_curious_server_and_client_defences_refuse_bad_input() -> None:
    from mlaudit.federated.flower import CuriousStrategy

    model, _, users = _setup()
    with pytest.raises(ConfigError, match="lr > 0"):
        CuriousStrategy(model, (1, 6, 6), lr=0.0)
    with pytest.raises(ConfigError, match="target"):
        CuriousStrategy(model, (1, 6, 6), lr=0.1, target="everyone")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nope"):
        CuriousStrategy(model, (1, 6, 6), lr=0.1, attack="nope")
    x, y = users[0]
    with pytest.raises(ConfigError, match="method"):
        TorchClient(model, x, y, defence={"method": "nope"})
    with pytest.raises(ConfigError, match="prune"):
        TorchClient(model, x, y, defence={"method": "prune", "prune": 1.5})
    with pytest.raises(ConfigError, match="allowed keys"):
        TorchClient(model, x, y, defence={"method": "prune", "amount": 0.5})
