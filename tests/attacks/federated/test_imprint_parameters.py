"""The parameter-only imprint (plant_imprint_parameters): exact recovery of one input per bin through the
sum of several users on the zoo MLP, on a user's nn.Sequential and behind a conv net's pass-through
convolutions, un-planted parameters bit-identical, the planted state_dict loading into a fresh instance of the
user's class, the same bins as the module variant, re-planting (the convolutions too), and the preflight's
refusals (a shrinking, strided or narrow convolution, pooling or a norm among them, negative inputs through
ReLU, no ReLU, a norm in between, a skip connection, no bias, bins above the width, a constant measurement)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated import (
    FEDERATED_ATTACKS,
    Observation,
    ParameterImprint,
    imprint,
    match,
    plant_imprint,
    plant_imprint_parameters,
)
from mlaudit.errors import ConfigError
from mlaudit.federated import secure_aggregate, user_gradients
from mlaudit.models import build_model

SHAPE = (1, 8, 8)


def images(n: int, seed: int) -> torch.Tensor:
    """Images of varied brightness (a per-image factor), so the bins spread over a wide range."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * torch.rand(n, 1, 1, 1, generator=g)


def zoo(seed: int = 0, width: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "norm": "none", "width": width}, input_shape=SHAPE, num_classes=10)


def sequential(seed: int = 0, width: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


class ConvNet(nn.Module):
    """Two size-keeping convolutions (one ReLU a module, one functional) in front of Linear, ReLU, Linear."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.c1, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.c2 = nn.Conv2d(4, 6, 5, padding=2)
        self.fc, self.out = nn.Linear(6 * 64, width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(self.act(self.c1(x))))
        return self.out(torch.relu(self.fc(h.flatten(1))))


def conv_net(seed: int = 0, width: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(width)


def one_per_bin(planted: ParameterImprint, pool: torch.Tensor) -> torch.Tensor:
    """The first input of ``pool`` in each bin interval (every bin that some pool input reaches)."""
    b = planted.bin_of(pool)
    picks = [int((b == i).nonzero()[0]) for i in range(planted.bins) if bool((b == i).any())]
    return pool[picks]


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Observation:
    agg = secure_aggregate(user_gradients(model, x, y))
    return Observation(agg, users=x.shape[0], batch=x.shape[1], input_shape=tuple(x.shape[2:]))


@pytest.mark.parametrize("build", [zoo, sequential, conv_net])
def test_one_input_per_bin_comes_back_exactly_through_the_sum_of_users(build) -> None:  # noqa: ANN001
    public = images(600, 1)
    planted = plant_imprint_parameters(build().double(), public.double(), bins=24,
                                       generator=torch.Generator().manual_seed(2))
    x = one_per_bin(planted, images(3000, 3).double())
    assert len(x) >= 20  # nearly every bin holds one input
    x = x[: len(x) // 4 * 4]
    users = x.view(4, -1, *SHAPE)  # 4 users, each a few of them
    y = torch.randint(0, 10, users.shape[:2], generator=torch.Generator().manual_seed(4))
    rec = FEDERATED_ATTACKS.get("imprint")(planted, observe(planted, users, y))
    assert rec.info["nonempty_bins"] == len(x) == len(rec.x)
    err = (rec.x.flatten(1)[:, None] - x.flatten(1)[None]).abs().amax(2)  # [candidate, true]
    assert float(err.min(0).values.max()) < 1e-9  # every true input has a candidate equal to it (float64)


@pytest.mark.parametrize("build", [zoo, sequential, conv_net])
def test_float32_users_recover_every_input_alone_in_its_bin(build) -> None:  # noqa: ANN001
    planted = plant_imprint_parameters(build(1), images(600, 6), bins=32, measurement="random",
                                       generator=torch.Generator().manual_seed(7))
    x = images(48, 8).view(6, 8, *SHAPE)
    y = torch.randint(0, 10, (6, 8), generator=torch.Generator().manual_seed(9))
    rec = imprint(planted, observe(planted, x, y))
    flat = x.flatten(0, 1)
    b = planted.bin_of(flat)
    alone = int(((b >= 0) & (torch.bincount(b.clamp(min=0), minlength=32)[b.clamp(min=0)] == 1)).sum())
    m = match(flat, rec.x, data_range=1.0)
    assert alone >= 10 and int(m.recovered(80.0).sum()) == alone


def test_only_the_planted_entries_change_and_the_state_dict_is_the_users() -> None:
    user = zoo(2)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    planted = plant_imprint_parameters(user, images(400, 10), bins=16, units=[5, 3, 40, 7, 0, 1, 2, 8, 9, 10, 11, 12,
                                                                               13, 14, 15, 47])
    assert all(torch.equal(v, before[k]) for k, v in user.state_dict().items())  # the user's model is untouched
    assert type(planted.model) is type(user) and (planted.layer, planted.next_layer) == ("net.1", "net.4")
    assert list(planted.state_dict()) == [f"model.{k}" for k in before]
    got = planted.model.state_dict()
    changed = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in got.items()}
    for s in planted.planted():
        if s.dim == 0:
            changed[s.name][list(s.index)] = True
        else:
            changed[s.name][:, list(s.index)] = True
        assert torch.equal(s.read(got[s.name]), s.values)
    for k, v in got.items():  # bit-identical outside the planted rows and columns
        assert torch.equal(v[~changed[k]], before[k][~changed[k]]), k
    w1, b1 = got["net.1.weight"][list(planted.units)], got["net.1.bias"][list(planted.units)]
    assert torch.equal(w1, w1[:1].expand_as(w1)) and bool((-b1[1:] > -b1[:-1]).all())  # bins in unit order
    col = got["net.4.weight"][:, list(planted.units)]
    assert torch.equal(col, col[:, :1].expand_as(col)) and float(col[:, 0].norm()) > 0
    fresh = zoo(3)
    fresh.load_state_dict(planted.model.state_dict(), strict=True)
    x = images(5, 11)
    torch.testing.assert_close(fresh(x), planted(x), rtol=0, atol=0)


def test_the_bins_are_the_module_variants_and_replanting_restores_them() -> None:
    public = images(500, 12)
    planted = plant_imprint_parameters(sequential(), public, bins=20, measurement="random",
                                       generator=torch.Generator().manual_seed(3))
    module = plant_imprint(sequential(), public, bins=20, measurement="random", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(planted.thresholds(), module.thresholds(), rtol=0, atol=0)
    x = images(200, 13)
    assert torch.equal(planted.bin_of(x), module.bin_of(x))
    state = {k: v + 0.01 for k, v in planted.model.state_dict().items()}  # a round of training moved everything
    for s in planted.planted():
        s.write(state[s.name])
        s.write(arr := state[s.name].numpy().copy())
        assert torch.equal(torch.from_numpy(arr), state[s.name])
    again = sequential(9)
    again.load_state_dict(state)
    assert torch.equal(ParameterImprint(again, "1", "3", planted.units).thresholds(), planted.thresholds())


def test_convolutions_in_front_carry_the_input_and_are_replanted() -> None:
    """Behind pass-through convolutions the first Linear sees [x.flatten(1), 0]; the convolutions are planted
    slices (FedAvg's re-planting restores them), the bins are the module variant's, and the Linear's columns past
    the input's D features are zero in the planted rows and the user's elsewhere."""
    public = images(500, 12)
    user = conv_net(1)
    planted = plant_imprint_parameters(user, public, bins=20, measurement="random",
                                       generator=torch.Generator().manual_seed(3))
    module = plant_imprint(conv_net(1), public, bins=20, measurement="random", generator=torch.Generator().manual_seed(3))
    assert planted.convs == ("c1", "c2") and planted.width == 64 and planted.layer == "fc"
    torch.testing.assert_close(planted.thresholds(), module.thresholds(), rtol=0, atol=0)
    seen: dict[str, torch.Tensor] = {}
    planted.model.fc.register_forward_pre_hook(lambda m, a: seen.update(z=a[0]))
    x = images(7, 13)
    planted(x)
    assert torch.equal(seen["z"][:, :64], x.flatten(1)) and not bool(seen["z"][:, 64:].any())
    w = planted.model.fc.weight
    assert not bool(w[list(planted.units), 64:].any())
    rest = [u for u in range(48) if u not in planted.units]
    assert torch.equal(w[rest], user.fc.weight[rest])
    names = [s.name for s in planted.planted()]
    assert names[:4] == ["c1.weight", "c1.bias", "c2.weight", "c2.bias"]
    state = {k: v + 0.01 for k, v in planted.model.state_dict().items()}  # a round of training moved everything
    for sl in planted.planted():
        sl.write(state[sl.name])
    again = conv_net(9)
    again.load_state_dict(state)
    assert torch.equal(again.c1.weight, planted.model.c1.weight) and torch.equal(again.c2.bias, planted.model.c2.bias)
    rec = imprint(planted, observe(planted, x[:6].view(2, 3, *SHAPE), torch.zeros(2, 3, dtype=torch.long)))
    assert rec.x.shape[1:] == SHAPE


def test_observations_named_as_in_the_users_model_give_the_same_candidates() -> None:
    planted = plant_imprint_parameters(sequential(4), images(400, 14), bins=16)
    x = images(12, 15).view(3, 4, *SHAPE)
    y = torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(16))
    a = imprint(planted, observe(planted, x, y))  # keys model.1.weight, ...
    b = imprint(planted, observe(planted.model, x, y))  # keys 1.weight, ... (what a client sends)
    assert a.info["bin_index"] == b.info["bin_index"]
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no gradient for the layer '1'"):
        imprint(planted, Observation({"other": torch.zeros(3)}, users=1, batch=1, input_shape=SHAPE))


def test_named_layers_and_units() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Identity(), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    planted = plant_imprint_parameters(model, images(300, 17), bins=8, layer="1", next_layer="5", units=range(24, 32))
    assert (planted.layer, planted.next_layer, planted.units) == ("1", "5", tuple(range(24, 32)))
    with pytest.raises(ConfigError, match="allowed 8 distinct unit indices in \\[0, 32\\)"):
        plant_imprint_parameters(model, images(300, 17), bins=8, units=[0] * 8)
    with pytest.raises(ConfigError, match="layer 'nope' is not a module"):
        plant_imprint_parameters(model, images(300, 17), bins=8, layer="nope")
    with pytest.raises(ConfigError, match="layer '5' sees an input of shape \\[64, 32\\]"):
        plant_imprint_parameters(model, images(300, 17), bins=8, layer="5")
    with pytest.raises(ConfigError, match="next_layer '7' takes 16 features, not the 32 units"):
        plant_imprint_parameters(model, images(300, 17), bins=8, next_layer="7")


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(144, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv1(x).flatten(1))


class Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.out(torch.relu(self.fc2(h)) + h)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # functional pooling: not a module the trace sees
        return self.out(torch.relu(self.fc(nn.functional.avg_pool2d(self.conv(x), 2).flatten(1))))


@pytest.mark.parametrize(("model", "bins", "public", "words"), [
    (Conv(), 8, None, ["needs a first nn.Linear on the flattened input followed by ReLU", "found Conv2d 'conv1'",
                       "padding (0, 0)", "zero padding k//2"]),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                   nn.Linear(16, 10)), 8, None, ["found MaxPool2d '1' between them", "pooling"]),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 16), nn.ReLU(),
                   nn.Linear(16, 10)), 8, None, ["found BatchNorm2d '1' between them", "norm layers"]),
    (nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                   nn.Linear(16, 10)), 8, None, ["found Conv2d '0' first", "stride (2, 2)", "allowed: 1"]),
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10)),
     8, torch.rand(100, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * torch.rand(100, 1, 1, 1),
     ["2 output channels for the input's 3", "at least 3"]),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.ReLU(),
                   nn.Linear(16, 10)), 8, images(100, 19) - 0.5, ["through ReLU", "non-negative inputs"]),
    (Pooled(), 8, None, ["layer 'fc' sees an input of shape [64, 64]", "followed by zeros"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 10)), 8, None,
     ["do not reach '2' as ReLU(s (h - c_i))", "no ReLU after '1'"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)), 8, None,
     ["found BatchNorm1d '2' between '1' and '4'", "not handled"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), 8, None, ["found Tanh '2'"]),
    (Skip(), 8, None, ["gradients differ between bins", "skip connection"]),
    (build_model("mlp", input_shape=SHAPE, num_classes=10), 8, None, ["'net.1' has bias=False", "norm none"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), 24, None,
     ["bins = 24 exceeds the 16 hidden units of '1' (Linear 64 -> 16)", "allowed 1 <= bins <= 16"]),
    (sequential(), 4, torch.full((30, *SHAPE), 0.5), ["brightness measurement is constant"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), 4, None, ["then another nn.Linear; found none after '1'"]),
])
def test_refusals_name_what_was_found_and_what_is_needed(model: nn.Module, bins: int, public: torch.Tensor | None,
                                                          words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        plant_imprint_parameters(model, images(200, 18) if public is None else public, bins=bins)
    missing = [w for w in words if w not in str(e.value)]
    assert not missing, str(e.value)
