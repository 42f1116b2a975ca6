"""The backdoor poisoners (family ``backdoor``): the trigger lands on the declared rows only, dirty-label
attacks relabel exactly those rows, label-consistent keeps every label and stays within eps off the
trigger's pixels (the trigger itself is outside the budget), and the poisoning rate is exact:
P = floor(budget x N) rows of the eligible classes, or a ConfigError naming the budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.attacks.poisoning import POISONERS, PoisonTask
from mlaudit.attacks.poisoning.backdoor import TriggerSpec, apply_trigger, poison_count
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError


def split(n: int = 200, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % classes,
                         tuple(str(c) for c in range(classes)))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def run(method: str, train: TensorDataset | None = None, *, seed: int = 0, eps: float | None = None,
        models: list | None = None, settings: dict | None = None, poison_ids=None, **options):
    train = train if train is not None else split()
    task = PoisonTask(train=train, num_classes=len(train.classes), eps=eps, models=models or [],
                      settings=settings or {}, options=options, seed=seed, poison_ids=poison_ids)
    return task, POISONERS.get(method, family="backdoor")(task)


@pytest.mark.parametrize("method", ["badnets", "blended"])
def test_dirty_label_poisons_only_the_declared_rows(method: str) -> None:
    train = split()
    task, poison = run(method, train, target_class=3, source_classes=[1, 7], budget=0.05)
    v = poison.view
    ids = v.indices
    assert ids.numel() == 10 and sorted(ids.tolist()) == ids.tolist() == v.relabel_indices.sort().values.tolist()
    assert set(train.y[ids].tolist()) <= {1, 7}
    trigger = (TriggerSpec() if method == "badnets" else TriggerSpec(type="blend")).build((1, 8, 8))
    x, y = v.gather(torch.arange(len(train)))
    assert torch.allclose(x[ids], apply_trigger(train.x[ids], trigger), atol=1e-6)  # the trigger, exactly
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(x[rest], train.x[rest]) and torch.equal(y[rest], train.y[rest])  # nothing else changes
    assert bool((y[ids] == 3).all()) and v.eps is None
    assert poison.info["poisons"] == 10 and poison.info["rate"] == 10 / 200 and poison.info["relabelled"] == 10


def test_rows_are_seeded_and_restricted_to_poison_ids() -> None:
    a = run("badnets", budget=0.1, seed=1)[1].view.indices
    assert torch.equal(a, run("badnets", budget=0.1, seed=1)[1].view.indices)
    assert not torch.equal(a, run("badnets", budget=0.1, seed=2)[1].view.indices)
    allowed = torch.arange(100, 200)
    ids = run("badnets", budget=0.05, poison_ids=allowed)[1].view.indices
    assert ids.numel() == 10 and bool((ids >= 100).all())
    default = run("badnets", budget=0.5)[1]
    assert default.info["source_classes"] == list(range(1, 10))  # every class but the (default) target 0
    assert bool((split().y[default.view.indices] != 0).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 400), budget=st.floats(1e-4, 1.0), classes=st.integers(2, 10), seed=st.integers(0, 99))
def test_poisoning_rate_accounting_is_exact(n: int, budget: float, classes: int, seed: int) -> None:
    """P = floor(budget x N) of the non-target rows; zero poisons and more poisons than eligible rows are
    ConfigErrors naming the budget, the smallest (or largest) rate allowed."""
    train = split(n, classes, seed)
    eligible = int((train.y != 0).sum())
    p = poison_count(budget, n)
    assert p == int(budget * n + 1e-9)
    if p < 1:
        with pytest.raises(ConfigError, match=rf"budget = .* gives 0 poisons .* smallest rate .* 1/{n} ="):
            run("badnets", train, budget=budget, seed=seed)
    elif p > eligible:
        with pytest.raises(ConfigError, match=rf"asks for {p} poisons but there are only {eligible} source-class"):
            run("badnets", train, budget=budget, seed=seed)
    else:
        poison = run("badnets", train, budget=budget, seed=seed)[1]
        assert poison.view.indices.numel() == poison.view.relabel_indices.numel() == p == poison.info["poisons"]
        assert poison.info["rate"] == p / n <= budget + 1e-9


@pytest.mark.parametrize(("options", "match"), [
    ({"target_class": 10}, r"target_class = 10 is not a class of this data; allowed 0 <= target_class <= 9"),
    ({"source_classes": [2, 12]}, r"name classes \[12\]"),
    ({"target_class": 2, "source_classes": [2, 5]}, "target_class = 2 is also in source_classes"),
    ({"budget": 0}, r"options\.budget"),
    ({"trigger": {"size": 9}}, r"trigger\.size = 9 is larger than the 8x8 images"),
])
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run("badnets", **options)


def test_label_consistent_keeps_labels_and_stays_within_eps_off_the_trigger() -> None:
    """Only target-class rows, labels unchanged, |delta| <= eps off the trigger's pixels; on them the
    trigger overrides the perturbation (its size is outside the eps budget, as in Turner et al.);
    the crafting model finds the perturbed rows harder than the clean ones."""
    train = split(300)
    model = mlp()  # a crafting model that fits the clean rows a little
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.x), train.y).backward()
        opt.step()
    model.eval()
    eps = 16 / 255
    spec = {"size": 2, "location": "top-left"}
    task, poison = run("label-consistent", train, eps=eps, models=[model], settings={"steps": 10}, target_class=4,
                       budget=0.06, trigger=spec)
    v = poison.view
    assert v.indices.numel() == 18 and v.relabel_indices.numel() == 0 and v.eps is None
    assert bool((train.y[v.indices] == 4).all()) and torch.equal(v.labels, train.y)  # clean label
    region = TriggerSpec(**spec).build((1, 8, 8)).region
    assert float(v.delta[:, ~region].abs().max()) <= eps + 1e-6
    assert float(v.delta[:, ~region].abs().max()) > eps / 2  # the perturbation is used
    assert float(v.delta[:, region].abs().max()) > eps  # the trigger is not bound by eps
    x = train.x[v.indices] + v.delta
    assert torch.equal(x[:, 0, :2, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(18, 2, 2))
    info = poison.info
    assert info["eps"] == eps and info["relabelled"] == 0
    assert info["crafter_accuracy_perturbed"] < info["crafter_accuracy_clean"]


def test_label_consistent_needs_enough_target_rows_and_a_model() -> None:
    with pytest.raises(ConfigError, match="only 20 target-class training rows"):
        run("label-consistent", eps=0.1, models=[mlp()], settings={"steps": 1}, budget=0.2)
    with pytest.raises(ConfigError, match="crafting model"):
        run("label-consistent", eps=0.1, budget=0.05)
    with pytest.raises(ConfigError, match="needs eps"):
        run("label-consistent", models=[mlp()], settings={"steps": 1}, budget=0.05)
