"""The poisoner contract (mlaudit.attacks.poisoning): every registered poisoner, of every family, runs
on a tiny CPU model and on a user-defined ``nn.Module`` through the one call ``entry(task) -> Poison``,
stays inside its budget (|delta|_inf <= eps, x + delta in [0, 1], only its rows, inserted points in
the box, a view over the task's own clean split), returns JSON-able info, and refuses bad method
options, bad crafting settings and missing needs with a ConfigError naming the field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.attacks.poisoning import (
    POISONERS,
    CraftingSettings,
    Needs,
    Poison,
    PoisonerEntry,
    PoisonTask,
    Target,
    pgd_lr,
)
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError

TOL = 1e-6
ENTRIES = POISONERS.entries()
IDS = [f"{e.family}/{e.name}" for e in ENTRIES]
SMALL = {  # settings and options that keep every method at a few optimiser steps
    "settings": {"steps": 2, "restarts": 1},
    "error-minimizing": {"rounds": 1, "train_steps": 2},
    "param-corruption": {"target_steps": 2},
    "gradient-canceling": {"target_steps": 2},
}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


class UserNet(nn.Module):
    """A user's own module (not from the zoo): digits-sized logistic regression."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def split(n: int = 120, seed: int = 0) -> TensorDataset:
    """Digits-sized data: x [n, 1, 8, 8] in [0, 1] (some pixels on the box's edges), y [n] of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[0], x[1] = 0.0, 1.0
    return TensorDataset(x, torch.arange(n) % 10, tuple(str(c) for c in range(10)))


def task_for(entry: PoisonerEntry, model: nn.Module, *, eps: float = 8 / 255, seed: int = 0) -> PoisonTask:
    train = split(seed=seed)
    models = [] if entry.needs == Needs.NOTHING else [model]
    fields: dict = {}
    if entry.family == "indiscriminate":
        fields["eps_d"] = 0.05
    else:
        fields["eps"] = eps
    if Needs.TARGET in entry.needs or entry.family == "targeted":
        fields["target"] = Target(split(10, seed=seed + 1).x[2:4], target_class=2, adv_class=1)
        fields["poison_ids"] = (train.y == 1).nonzero().flatten()[:6]
    return PoisonTask(train=train, num_classes=10, models=models, settings=SMALL["settings"],
                      options=SMALL.get(entry.name, {}), seed=seed, **fields)


def check_budget(task: PoisonTask, poison: Poison, entry: PoisonerEntry) -> None:
    """The invariants every poison keeps (module docstring)."""
    assert isinstance(poison, Poison)
    json.dumps(poison.info)  # JSON-able (raises otherwise)
    if entry.acts_on == "model":
        assert poison.view is None and poison.models and all(isinstance(m, nn.Module) for m in poison.models)
        return
    v = poison.view
    assert v is not None and v.base is task.train
    if entry.family == "backdoor":  # a trigger is no l-inf perturbation: |delta| <= eps (or 0) off its pixels
        check_backdoor_budget(task, poison, entry)
        return
    if v.indices.numel():
        assert task.eps is not None and v.eps == pytest.approx(task.eps)
        assert set(v.indices.tolist()) <= set(task.ids().tolist())
        assert float(v.delta.abs().max()) <= task.eps + TOL
        xp = task.train.x[v.indices] + v.delta
        assert float(xp.min()) >= -TOL and float(xp.max()) <= 1 + TOL
    if v.num_inserted:
        assert task.eps_d is not None and v.num_inserted == round(task.eps_d * len(task.train))
        assert float(v.inserted_x.min()) >= -TOL and float(v.inserted_x.max()) <= 1 + TOL
    assert bool((v.labels >= 0).all()) and bool((v.labels < task.num_classes).all())
    assert v.indices.numel() or v.relabel_indices.numel() or v.num_inserted, "the poison changes nothing"


def check_backdoor_budget(task: PoisonTask, poison: Poison, entry: PoisonerEntry) -> None:
    """A backdoor's view: floor(budget x N) rows of the task, in the box, changed only on the trigger's
    pixels (and within eps elsewhere for the crafting methods), relabelled to the target when dirty-label;
    a hidden-trigger view (eps set) carries no trigger: within eps everywhere."""
    v, opts = poison.view, entry.make_options(task.options)
    assert v is not None and (v.eps is None or v.eps == pytest.approx(task.eps))
    if v.eps is not None:
        assert float(v.delta.abs().max()) <= task.eps + TOL and v.relabel_indices.numel() == 0
    p = int(opts.budget * len(task.train) + 1e-9)
    assert v.indices.numel() == p >= 1 and set(v.indices.tolist()) <= set(task.ids().tolist())
    xp = task.train.x[v.indices] + v.delta
    assert float(xp.min()) >= -TOL and float(xp.max()) <= 1 + TOL
    off = v.delta[:, ~opts.trigger.build(task.train.shape).region]
    largest = float(off.abs().max()) if off.numel() else 0.0
    assert largest <= (task.eps + TOL if Needs.CRAFTING_MODELS in entry.needs else 0.0)
    relabelled = v.relabel_indices.numel()
    assert relabelled in (0, p) and bool((v.labels[v.indices] == opts.target_class).all())  # (clean label: of it)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@pytest.mark.parametrize("model", [tiny_model, UserNet], ids=["tiny-mlp", "user-module"])
def test_every_poisoner_keeps_its_budget(entry: PoisonerEntry, model: type) -> None:
    task = task_for(entry, model())
    check_budget(task, entry(task), entry)


def test_families_and_names_are_the_configs() -> None:
    assert POISONERS.names("targeted") == ["bullseye", "gradient-matching", "label-flip", "poison-frogs", "watermark"]
    assert POISONERS.names("availability") == ["adversarial-class-targeted", "adversarial-untargeted",
                                               "error-minimizing", "random-noise"]
    assert POISONERS.names("indiscriminate") == ["gradient-canceling", "label-flip", "param-corruption"]
    assert POISONERS.names("backdoor") == ["badnets", "blended", "hidden-trigger", "label-consistent", "sleeper-agent"]
    assert all(e.description for e in ENTRIES)


PERTURBING = [e for e in ENTRIES if e.family != "indiscriminate" and e.name != "label-flip"]


@settings(max_examples=20, deadline=None)
@given(entry=st.sampled_from(PERTURBING), eps=st.floats(1 / 255, 1.0), seed=st.integers(0, 2**16))
def test_perturbations_stay_in_the_ball_and_the_box(entry: PoisonerEntry, eps: float, seed: int) -> None:
    task = task_for(entry, tiny_model(seed % 5), eps=eps, seed=seed)
    check_budget(task, entry(task), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_bad_options_and_settings_name_the_field(entry: PoisonerEntry) -> None:
    task = task_for(entry, tiny_model())
    with pytest.raises(ConfigError, match=r"options\.no_such_option"):
        entry(replace(task, options={**SMALL.get(entry.name, {}), "no_such_option": 1}))
    with pytest.raises(ConfigError, match=r"settings\.steps.*greater than or equal to 1"):
        entry(replace(task, settings={"steps": 0}))
    with pytest.raises(ConfigError, match=r"settings\.optimizer"):
        entry(replace(task, settings={"optimizer": "sgd"}))
    if entry.needs & (Needs.CRAFTING_MODELS | Needs.FRESH_MODEL):
        with pytest.raises(ConfigError, match="crafting model|surrogate"):
            entry(replace(task, models=[]))
    if Needs.TARGET in entry.needs:
        with pytest.raises(ConfigError, match="target"):
            entry(replace(task, target=None))


@pytest.mark.parametrize(("options", "match"), [
    ({"dp_noise": 1.0}, "needs dp_clip"),
    ({"dp_clip": 0.0}, r"options\.dp_clip"),
])
def test_gradient_matching_options_are_validated_once(options: dict, match: str) -> None:
    entry = POISONERS.get("gradient-matching", family="targeted")
    with pytest.raises(ConfigError, match=match):
        entry.make_options(options)
    assert entry.make_options({"dp_clip": 1.0, "dp_noise": 0.5}) == entry.make_options(
        entry.make_options({"dp_clip": 1.0, "dp_noise": 0.5}))


def test_settings_resolve_against_the_methods_defaults() -> None:
    gm = POISONERS.get("gradient-matching", family="targeted")
    s = gm.settings({"restarts": 2})
    assert (s.steps, s.lr, s.optimizer, s.schedule, s.restarts, s.augment) == (250, 0.1, "signed-adam", "step", 2, True)
    adv = POISONERS.get("adversarial-untargeted", family="availability").settings({"steps": 50})
    assert (adv.lr, adv.optimizer, adv.schedule) == (pytest.approx(2.5 / 50), "pgd", "constant")
    assert POISONERS.get("adversarial-untargeted", family="availability").settings({"steps": 50, "lr": 0.3}).lr == 0.3
    gc = POISONERS.get("gradient-canceling", family="indiscriminate").settings()
    assert (gc.steps, gc.lr, gc.optimizer, gc.schedule, gc.batch_size) == (300, 0.01, "adam", "cosine", None)
    with pytest.raises(ConfigError, match="steps >= 1"):
        pgd_lr({"steps": 0})
    with pytest.raises(ConfigError, match=r"where\.nope"):
        CraftingSettings.parse({"nope": 1}, where="where")


def test_ambiguous_and_unknown_names() -> None:
    with pytest.raises(ConfigError, match="families"):
        POISONERS.get("label-flip")
    assert POISONERS.get("label-flip", family="targeted").family == "targeted"
    with pytest.raises(ConfigError, match="valid methods: bullseye, gradient-matching"):
        POISONERS.get("voodoo", family="targeted")
