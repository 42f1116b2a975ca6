"""Targeted-poisoning scenarios (seed 002 section 1.7) and the targeted poisoners behind the one
poisoner contract (``POISONERS.get(method, family="targeted")(task) -> Poison``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.attacks.poisoning import POISONERS, Poison, PoisonTask, Target
from mlaudit.attacks.poisoning.targeted.features import penultimate_features
from mlaudit.attacks.poisoning.targeted.scenario import (
    explicit_scenario,
    poison_count,
    sample_scenario,
    scenario_seeds,
)
from mlaudit.data.augment import AugmentParams, apply_augment_differentiable
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError

YTR = torch.arange(10).repeat(50)  # 500 training labels, 50 per class
YTE = torch.arange(10).repeat(10)  # 100 test labels


def test_seed_series_is_the_papers() -> None:
    assert scenario_seeds(2000000000, 10) == [2000000000, 2100000000, 2110000000, 2111000000, 2111100000,
                                             2111110000, 2111111000, 2111111100, 2111111110, 2111111111]
    assert scenario_seeds(2000000000, 12)[10:] == [2111111112, 2111111113]
    assert len(set(scenario_seeds(0, 50))) == 50


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.floats(0.002, 0.1), targets=st.integers(1, 5))
def test_sampled_scenarios_are_valid_and_reproducible(seed: int, budget: float, targets: int) -> None:
    a = sample_scenario(0, seed, train_y=YTR, test_y=YTE, num_classes=10, budget=budget, targets=targets)
    b = sample_scenario(0, seed, train_y=YTR, test_y=YTE, num_classes=10, budget=budget, targets=targets)
    assert a == b
    assert a.target_class != a.poison_class == a.adv_class
    assert len(a.poison_ids) == poison_count(budget, 500) == len(set(a.poison_ids))
    assert all(int(YTR[i]) == a.poison_class for i in a.poison_ids)
    assert len(a.target_ids) == targets and all(int(YTE[i]) == a.target_class for i in a.target_ids)


def test_scenarios_vary_with_the_seed() -> None:
    draws = {sample_scenario(0, s, train_y=YTR, test_y=YTE, num_classes=10, budget=0.01).target_ids
             for s in scenario_seeds(2000000000, 10)}
    assert len(draws) > 5


def test_budget_larger_than_the_poison_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="budget = 0.2 means 100 poisons.*only 50"):
        sample_scenario(3, 7, train_y=YTR, test_y=YTE, num_classes=10, budget=0.2)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_ids": [100]}, r"target_ids \[100\] are out of range"),
    ({"target_ids": [0, 1]}, "must all be of one class"),
    ({"target_ids": [0], "poison_class": 0}, "equals poison_class"),
    ({"target_ids": [0], "poison_class": 12}, "out of range 0..9"),
    ({"target_ids": [0], "poison_ids": [1, 12]}, r"not of poison_class 1"),
    ({"target_ids": [0], "poison_ids": [1, 1]}, "repeat"),
    ({"target_ids": [0], "poison_ids": [999]}, "out of range"),
])
def test_explicit_scenario_errors(kwargs: dict, match: str) -> None:
    args = {"poison_class": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        explicit_scenario(0, test_y=YTE, train_y=YTR, budget=0.01, num_classes=10, **args)


def test_explicit_scenario_draws_poisons_of_the_class() -> None:
    s = explicit_scenario(0, target_ids=[0], poison_class=3, test_y=YTE, train_y=YTR, budget=0.02, num_classes=10)
    assert s.target_class == 0 and len(s.poison_ids) == 10 and all(int(YTR[i]) == 3 for i in s.poison_ids)


def test_differentiable_augmentation_passes_gradcheck() -> None:
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    params = AugmentParams(shift=torch.tensor([[1, -1], [0, 2]]), flip=torch.tensor([True, False]))
    assert torch.autograd.gradcheck(lambda t: apply_augment_differentiable(t, params), (x,))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _task(model: nn.Module, *, eps: float = 8 / 255, **settings: object) -> PoisonTask:
    """30 random 1x4x4 images of 3 classes; target image 0 (class 0) to class 1; 5 poisons of class 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 1, 4, 4, generator=g)
    y = torch.arange(3).repeat(10)
    return PoisonTask(train=TensorDataset(x, y, ("a", "b", "c")), num_classes=3, eps=eps,
                      poison_ids=(y == 1).nonzero().flatten()[:5], target=Target(x[:1], 0, 1), models=[model],
                      settings=settings)


def run(method: str, task: PoisonTask) -> Poison:
    """The targeted poisoner ``method`` on ``task``."""
    return POISONERS.get(method, family="targeted")(task)


def test_penultimate_features_are_the_head_input() -> None:
    m = _net()
    x = torch.rand(4, 1, 4, 4)
    assert torch.allclose(penultimate_features(m)(x), m[2](m[1](m[0](x))))
    with pytest.raises(ConfigError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Flatten()))


@pytest.mark.parametrize("method", ["gradient-matching", "poison-frogs", "bullseye", "watermark"])
def test_every_pixel_method_respects_eps_and_the_box(method: str) -> None:
    eps = 8 / 255
    task = _task(_net(), eps=eps, steps=5, restarts=2)
    res = run(method, task)
    x_poison, _ = task.poison_rows()
    v = res.view
    assert v is not None and torch.equal(v.indices, task.ids()) and v.delta.shape == x_poison.shape
    assert float(v.delta.abs().max()) <= eps + 1e-6
    xp = x_poison + v.delta
    assert float(xp.min()) >= -1e-6 and float(xp.max()) <= 1 + 1e-6
    if method != "watermark":
        # separable objectives keep the best restart per sample, so the total can beat every restart
        assert len(res.info["restarts"]) == 2 and res.info["objective"] <= min(res.info["restarts"]) + 1e-6


def test_gradient_matching_objective_decreases() -> None:
    res = run("gradient-matching", _task(_net(), eps=16 / 255, steps=40, restarts=1, lr=0.05))
    assert res.info["history"][-1] < res.info["history"][0] - 0.01


def test_label_flip_relabels_the_nearest_target_class_images() -> None:
    task = _task(_net())
    res = run("label-flip", task)
    assert res.view is not None and res.view.indices.numel() == 0
    ids, labels = res.view.relabel_indices, res.view.relabel_to
    assert len(ids) == 5 and bool((task.train.y[ids] == 0).all()) and bool((labels == 1).all())
    feats = penultimate_features(task.models[0])
    with torch.no_grad():
        d = torch.cdist(feats(task.train.x), feats(task.targeted().x)).flatten()
    cand = (task.train.y == 0).nonzero().flatten()
    assert set(ids.tolist()) == set(cand[d[cand].argsort()[:5]].tolist())


def test_registry_and_bad_eps() -> None:
    assert set(POISONERS.names("targeted")) >= {"gradient-matching", "poison-frogs", "bullseye", "watermark",
                                                 "label-flip"}
    with pytest.raises(ConfigError, match="valid"):
        run("witchcraft", _task(_net()))
    with pytest.raises(ConfigError, match=r"eps must lie in \(0, 1\]"):
        _task(_net(), eps=16)


def test_batched_gradient_matching_equals_per_restart_calls() -> None:
    """GradientMatching.batched over G restarts = the objective of each restart (values and input
    gradients), also for an ensemble; crafting with parallel restarts ends where sequential restarts do."""
    from mlaudit.attacks.poisoning.targeted.gradient_matching import GradientMatching

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 3)).eval()
    task = _task(conv, eps=16 / 255, steps=5, restarts=3)
    _, y_poison = task.poison_rows()
    objs = [GradientMatching(m, task.targeted().x, 1, poison_labels=y_poison) for m in (conv, _net())]
    ens = GradientMatching.ensemble(objs)
    xa = torch.rand(3, 5, 1, 4, 4, requires_grad=True)
    idx = torch.arange(5)
    b = ens.batched(xa, idx)
    s = torch.stack([ens(xa[g], idx) for g in range(3)])
    assert torch.allclose(b, s, atol=1e-6)
    gb, = torch.autograd.grad(b.sum(), xa)
    gs, = torch.autograd.grad(s.sum(), xa)
    assert torch.allclose(gb, gs, atol=1e-6)
    seq = run("gradient-matching", task)
    par = run("gradient-matching", _task(conv, eps=16 / 255, steps=5, restarts=3, parallel_restarts=3))
    assert par.info["restarts"] == pytest.approx(seq.info["restarts"], rel=1e-4)
    assert par.view is not None and seq.view is not None
    assert torch.allclose(par.view.delta, seq.view.delta, atol=1e-5)


def test_memory_format_of_a_model_is_read_from_its_conv_weights() -> None:
    """The format that crafting on CUDA restores after its channels-last pass (crafting._cuda_layout)."""
    from mlaudit.attacks.poisoning.targeted.crafting import memory_format
    from mlaudit.models import build_model

    cnn = build_model("fastcnn", input_shape=(3, 32, 32), num_classes=10)
    assert memory_format(cnn) == torch.contiguous_format
    cnn.to(memory_format=torch.channels_last)
    assert memory_format(cnn) == torch.channels_last
    assert memory_format(build_model("mlp", input_shape=(3, 8, 8), num_classes=10)) == torch.contiguous_format
