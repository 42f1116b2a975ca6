"""Robbing the Fed's imprint module: bins at the measurement's quantiles, exact recovery of an input alone in
its bin through secure aggregation, the count of exact recoveries equal to the count of inputs alone in a
bin, and the refusals (too many bins, a constant measurement, coinciding quantiles, the wrong model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated import (
    FEDERATED_ATTACKS,
    ImprintedModel,
    Observation,
    imprint,
    match,
    plant_imprint,
)
from mlaudit.errors import ConfigError
from mlaudit.federated import secure_aggregate, user_gradients


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Observation:
    """The server's view of a FedSGD round: x [U, B, ...], y [U, B] -> the sum of the users' gradients."""
    agg = secure_aggregate(user_gradients(model, x, y))
    return Observation(agg, users=x.shape[0], batch=x.shape[1], input_shape=tuple(x.shape[2:]))


@pytest.mark.parametrize(("measurement", "cdf"), [("brightness", "empirical"), ("random", "empirical"),
                                                  ("brightness", "gaussian")])
def test_bins_sit_at_the_quantiles_of_the_public_measurement(measurement: str, cdf: str) -> None:
    public = images(4000, 1)
    mal = plant_imprint(net(), public, bins=8, measurement=measurement, cdf=cdf)
    c = mal.thresholds()
    assert c.shape == (8,) and bool((c[1:] > c[:-1]).all())
    w = mal.imprint.weight.detach()
    assert torch.equal(w, w[:1].expand_as(w))  # every bin measures the same direction
    h = mal.measure(public)
    assert bool((h > c[0]).all())  # bin 0 catches every public input
    share = torch.bincount(mal.bin_of(public), minlength=8).float() / len(public)
    assert torch.allclose(share, torch.full((8,), 1 / 8), atol=0.02 if cdf == "empirical" else 0.04)
    if measurement == "brightness":
        torch.testing.assert_close(h, public.flatten(1).mean(1), rtol=1e-5, atol=1e-6)


def test_an_input_alone_in_its_bin_is_recovered_exactly_through_secure_aggregation() -> None:
    public = images(500, 2)
    mal = plant_imprint(net().double(), public.double(), bins=32).double()
    x = images(12, 3).double().view(4, 3, 1, 8, 8)  # 4 users of 3
    y = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(4))
    rec = imprint(mal, observe(mal, x, y))
    flat = x.flatten(0, 1)
    b = mal.bin_of(flat)
    count = torch.bincount(b, minlength=32)
    alone = [j for j in range(len(flat)) if count[b[j]] == 1]
    assert alone, "the draw must leave some input alone in its bin"
    for j in alone:
        err = (rec.x - flat[j]).flatten(1).abs().amax(1)
        assert float(err.min()) < 1e-9  # bit-for-bit up to float64 rounding
    assert rec.info["nonempty_bins"] == int((count > 0).sum())


@pytest.mark.parametrize(("users", "per_user", "bins"), [(1, 16, 64), (8, 4, 32), (16, 8, 64)])
def test_exact_recoveries_equal_the_inputs_alone_in_a_bin(users: int, per_user: int, bins: int) -> None:
    public = images(1000, 5)
    mal = plant_imprint(net(1), public, bins=bins, measurement="random",
                        generator=torch.Generator().manual_seed(6))
    x = images(users * per_user, 7).view(users, per_user, 1, 8, 8)
    y = torch.randint(0, 10, (users, per_user), generator=torch.Generator().manual_seed(8))
    rec = FEDERATED_ATTACKS.get("imprint")(mal, observe(mal, x, y))
    flat = x.flatten(0, 1)
    b = mal.bin_of(flat)
    alone = int((torch.bincount(b, minlength=bins)[b] == 1).sum())
    m = match(flat, rec.x, data_range=1.0)
    assert int(m.recovered(80.0).sum()) == alone  # float32 users: exact means PSNR >= 80 dB
    assert int(m.recovered(30.0).sum()) >= alone


def test_imprint_refuses_what_cannot_work() -> None:
    public = images(20, 9)
    with pytest.raises(ConfigError, match="bins = 21 exceeds the 20 public inputs"):
        plant_imprint(net(), public, bins=21)
    with pytest.raises(ConfigError, match="constant"):
        plant_imprint(net(), torch.full((30, 1, 8, 8), 0.5), bins=4)
    two = torch.cat([torch.zeros(15, 1, 8, 8), torch.ones(15, 1, 8, 8)])
    with pytest.raises(ConfigError, match="only 2 distinct values"):
        plant_imprint(net(), two, bins=8)
    with pytest.raises(ConfigError, match="allowed bins >= 1"):
        plant_imprint(net(), public, bins=0)
    mal = plant_imprint(net(), public, bins=4)
    obs = observe(mal, images(4, 1).view(1, 4, 1, 8, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="ImprintedModel"):
        imprint(net(), obs)
    assert isinstance(mal, ImprintedModel) and mal.bins == 4


def test_building_the_module_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ImprintedModel(nn.Identity(), torch.ones(4, 64), torch.zeros(4), torch.zeros(64))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("bins", [16, 64])
def test_on_discrete_data_no_offset_sits_on_a_value_and_the_scale_keeps_every_bin(bins: int) -> None:
    """Digits-like images (17 grey levels): empirical quantiles of the brightness are observed values; the
    offsets move to the middle of their gap, so no public input lies on a knee and the planted scale (1e-3
    through Flower) leaves every public input, and every other input off an offset, in the same bin."""
    g = torch.Generator().manual_seed(5)
    public, private = (torch.randint(0, 17, (n, 1, 8, 8), generator=g).float() / 16 for n in (400, 300))
    a = plant_imprint(net(), public, bins=bins)
    b = plant_imprint(net(), public, bins=bins, scale=1e-3)
    h, hp = (x.flatten(1).double().mean(1) for x in (public, private))
    c = a.thresholds().double()
    # no offset within a quarter grey-level step of the brightness (1 / (16 * 64)) of a public value
    assert float((h[:, None] - c[None, 1:]).abs().min()) > 0.24 / 1024
    assert torch.equal(a.bin_of(public), b.bin_of(public))
    off = (hp[:, None] - c[None, 1:]).abs().min(1).values > 1e-6
    assert int(off.sum()) >= 0.9 * len(hp)
    assert torch.equal(a.bin_of(private)[off], b.bin_of(private)[off])
    # the shares stay near the quantiles (snapping moves no public input across an offset it did not cross)
    share = torch.bincount(a.bin_of(public), minlength=bins).float() / len(public)
    assert float((share - 1 / bins).abs().max()) < 0.05
