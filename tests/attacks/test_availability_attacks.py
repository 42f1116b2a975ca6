"""Availability-poisoning methods (mlaudit.attacks.poisoning.availability): every method stays inside the l-inf
ball and the pixel box; untargeted PGD raises the crafting model's loss on the true label and
class-targeted PGD lowers it towards g(y); restarts keep the best per sample; the label map has no
fixed points; random noise is seeded; error-minimizing noise lowers its surrogate's loss; crafting
leaves the models untouched."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlaudit.attacks.poisoning import POISONERS, Needs, PoisonTask
from mlaudit.attacks.poisoning.availability import (
    AdversarialLoss,
    ClassTargetedOptions,
    ErrorMinimizingOptions,
    RandomNoiseOptions,
    check_permutation,
    crafter_predictions,
    random_derangement,
    resolve_permutation,
    shift_permutation,
)
from mlaudit.data import load_dataset
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.models import build_model
from mlaudit.train import train

TOL = 1e-6


def tiny(seed: int = 0, d: int = 16, c: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, c))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Out:
    delta: torch.Tensor
    info: dict


def budget(eps: float, steps: int, lr: float, restarts: int = 1) -> dict:
    """The budget of a task: eps and the crafting settings."""
    return {"eps": eps, "settings": {"steps": steps, "lr": lr, "restarts": restarts}}


def task(x: torch.Tensor, y: torch.Tensor, models: list[torch.nn.Module], b: dict, num_classes: int,
         seed: int = 0, **options: object) -> PoisonTask:
    """Every row of (x, y) poisoned (class names cover the labels, so bad labels reach the method)."""
    classes = tuple(str(c) for c in range(max(num_classes, int(y.max()) + 1)))
    return PoisonTask(train=TensorDataset(x, y, classes), num_classes=num_classes, models=models, options=options,
                      seed=seed, **b)


def run(method: str, x: torch.Tensor, y: torch.Tensor, models: list[torch.nn.Module], b: dict,
        num_classes: int, seed: int = 0, **options: object) -> Out:
    p = POISONERS.get(method, family="availability")(task(x, y, models, b, num_classes, seed, **options))
    assert p.view is not None and torch.equal(p.view.indices, torch.arange(x.shape[0]))
    return Out(p.view.delta, p.info)


def in_bounds(x: torch.Tensor, delta: torch.Tensor, eps: float) -> bool:
    return bool(delta.abs().max() <= eps + TOL and (x + delta).min() >= -TOL and (x + delta).max() <= 1 + TOL)


@pytest.fixture(scope="module")
def digits_logistic() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A logistic-regression crafting model trained on digits (test accuracy ~0.91) and 300 training images."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("logistic", input_shape=data.input_shape, num_classes=10)
    train(model, data, "fast", seed=0)
    return model.eval(), data.train.x[:300], data.train.y[:300]


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(1 / 255, 1.0), steps=st.integers(1, 4), restarts=st.integers(1, 2), seed=st.integers(0, 2**16),
       method=st.sampled_from(["adversarial-untargeted", "adversarial-class-targeted", "random-noise"]))
def test_perturbations_respect_the_ball_and_the_box(eps: float, steps: int, restarts: int, seed: int,
                                                    method: str) -> None:
    x = torch.rand(6, 1, 4, 4, generator=gen(seed))
    x[0] = 0.0  # pixels on the box's edges
    x[1] = 1.0
    y = torch.randint(0, 4, (6,), generator=gen(seed + 1))
    res = run(method, x, y, [tiny(seed % 7)], budget(eps=eps, steps=steps, lr=1.0, restarts=restarts), 4, seed)
    assert res.delta.shape == x.shape
    assert in_bounds(x, res.delta, eps)


def test_untargeted_pgd_raises_the_loss_on_the_true_label(digits_logistic) -> None:
    model, x, y = digits_logistic
    eps = 32 / 255
    res = run("adversarial-untargeted", x, y, [model], budget(eps=eps, steps=10, lr=0.25), 10)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(x + res.delta), y, reduction="none")
    assert in_bounds(x, res.delta, eps)
    assert (after >= before - 1e-5).float().mean() >= 0.99
    assert after.mean() > 3 * before.mean()  # measured: 0.26 -> 1.07
    assert res.info["crafter_accuracy_on_poisons"] < float((model(x).argmax(1) == y).float().mean()) - 0.2


def test_class_targeted_pgd_lowers_the_loss_towards_g_of_y(digits_logistic) -> None:
    model, x, y = digits_logistic
    res = run("adversarial-class-targeted", x, y, [model], budget(eps=64 / 255, steps=10, lr=0.25), 10)
    g = torch.tensor(res.info["permutation"])
    assert g.tolist() == [(c + 1) % 10 for c in range(10)]  # the default map: shift by one
    with torch.no_grad():
        before = F.cross_entropy(model(x), g[y], reduction="none")
        after = F.cross_entropy(model(x + res.delta), g[y], reduction="none")
    assert (after <= before + 1e-5).float().mean() >= 0.99
    assert res.info["crafter_target_rate"] > 0.5
    assert res.info["crafter_target_rate"] == pytest.approx(
        float((crafter_predictions([model], x + res.delta) == g[y]).float().mean()))


def test_restarts_keep_the_best_perturbation_of_each_sample(digits_logistic) -> None:
    model, x, y = digits_logistic
    one = run("adversarial-untargeted", x, y, [model], budget(eps=16 / 255, steps=3, lr=0.5), 10)
    three = run("adversarial-untargeted", x, y, [model], budget(eps=16 / 255, steps=3, lr=0.5, restarts=3), 10)
    with torch.no_grad():
        l1 = F.cross_entropy(model(x + one.delta), y, reduction="none")
        l3 = F.cross_entropy(model(x + three.delta), y, reduction="none")
    assert len(three.info["restart_objectives"]) == 3
    assert bool((l3 >= l1 - 1e-5).all()) and l3.sum() > l1.sum()


def test_crafting_leaves_the_models_untouched() -> None:
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run("adversarial-class-targeted", torch.rand(5, 1, 4, 4), torch.arange(5) % 4, [model],
        budget(eps=0.1, steps=2, lr=0.5), 4)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_ensemble_averages_the_crafting_models() -> None:
    x, y = torch.rand(5, 1, 4, 4, generator=gen(3)), torch.arange(5) % 4
    a, b = tiny(1), tiny(2)
    obj = POISONERS.get("adversarial-untargeted", family="availability")
    got = AdversarialLoss([a, b], y, targeted=False)(x, torch.arange(5))
    want = -(F.cross_entropy(a(x), y, reduction="none") + F.cross_entropy(b(x), y, reduction="none")) / 2
    assert torch.allclose(got, want, atol=1e-6) and Needs.CRAFTING_MODELS in obj.needs


@settings(max_examples=60, deadline=None)
@given(c=st.integers(2, 200), seed=st.integers(0, 2**31 - 1))
def test_class_targeted_label_maps_have_no_fixed_points(c: int, seed: int) -> None:
    for g in (random_derangement(c, generator=gen(seed)), shift_permutation(c, 1 + seed % (c - 1)),
              resolve_permutation("random", c, generator=gen(seed)), resolve_permutation("shift", c, generator=gen(0))):
        assert sorted(g.tolist()) == list(range(c))
        assert bool((g != torch.arange(c)).all())
    assert check_permutation(shift_permutation(c).tolist(), c) == tuple(shift_permutation(c).tolist())


@pytest.mark.parametrize(("perm", "c", "match"), [
    ([1, 0, 2], 3, "fixed points \\[2\\]"),
    ([0, 1], 2, "fixed points \\[0, 1\\]"),
    ([1, 1, 0], 3, "not a permutation"),
    ([1, 2, 3], 3, "not a permutation"),
    ([1, 0], 3, "2 entries but the data has 3 classes"),
    ([0], None, "at least 2 classes"),
])
def test_bad_permutations_are_refused(perm: list[int], c: int | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_permutation(perm, c)
    if c is None or len(perm) == c:
        with pytest.raises(ValidationError, match="permutation"):
            ClassTargetedOptions(permutation=perm)


def test_random_noise_is_seeded_and_uses_the_whole_budget() -> None:
    x = torch.full((50, 1, 4, 4), 0.5)
    b = budget(eps=0.2, steps=1, lr=1.0)
    y = torch.zeros(50, dtype=torch.long)
    u1, u2, u3 = (run("random-noise", x, y, [], b, 2, seed).delta for seed in (7, 7, 8))
    s = run("random-noise", x, y, [], b, 2, 7, distribution="sign").delta
    assert torch.equal(u1, u2) and not torch.equal(u1, u3)
    assert u1.abs().max() <= 0.2 + TOL and u1.abs().max() > 0.19 and abs(float(u1.mean())) < 0.01
    assert torch.allclose(s.abs(), torch.full_like(s, 0.2))
    with pytest.raises(ValidationError):
        RandomNoiseOptions(distribution="gaussian")


def test_error_minimizing_noise_lowers_its_surrogates_loss() -> None:
    data = load_dataset("digits")
    x, y = data.train.x[:400], data.train.y[:400]
    torch.manual_seed(0)
    surrogate = build_model("logistic", input_shape=data.input_shape, num_classes=10)
    eps = 32 / 255
    res = run("error-minimizing", x, y, [surrogate], budget(eps=eps, steps=5, lr=0.5), 10, rounds=3,
              train_steps=10, stop_accuracy=None)
    assert in_bounds(x, res.delta, eps)
    assert res.info["rounds"] == 3 and not res.info["stopped_early"]
    with torch.no_grad():
        clean = F.cross_entropy(surrogate(x), y)
        noised = F.cross_entropy(surrogate(x + res.delta), y)
    assert noised < 0.5 * clean
    hist = res.info["history"]
    assert [h["round"] for h in hist] == [1, 2, 3]
    stop = run("error-minimizing", x, y, [build_model("logistic", input_shape=data.input_shape, num_classes=10)],
               budget(eps=eps, steps=5, lr=0.5), 10, rounds=5, train_steps=10, stop_accuracy=0.5)
    assert stop.info["stopped_early"] and stop.info["surrogate_accuracy"] >= 0.5
    with pytest.raises(ConfigError, match="exactly one fresh surrogate"):
        run("error-minimizing", x, y, [], budget(eps=eps, steps=1, lr=0.5), 10)
    with pytest.raises(ValidationError):
        ErrorMinimizingOptions(rounds=0)


@pytest.mark.parametrize("method", POISONERS.names("availability"))
def test_every_registered_method_runs_on_a_tiny_model(method: str) -> None:
    x, y = torch.rand(8, 1, 4, 4, generator=gen(1)), torch.arange(8) % 4
    m = POISONERS.get(method, family="availability")
    models = [] if m.needs == Needs.NOTHING else [tiny()]
    res = run(method, x, y, models, budget(eps=8 / 255, steps=2, lr=0.5), 4)
    assert in_bounds(x, res.delta, 8 / 255) and isinstance(res.info, dict) and m.description


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eps": 0.0, "steps": 1, "lr": 1.0}, "eps must lie in"),
    ({"eps": 1.5, "steps": 1, "lr": 1.0}, "eps must lie in"),
    ({"eps": 0.1, "steps": 0, "lr": 1.0}, "settings.steps"),
    ({"eps": 0.1, "steps": 1, "lr": 0.0}, "settings.lr"),
])
def test_bad_budgets_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run("adversarial-untargeted", torch.rand(3, 4), torch.tensor([0, 1, 2]), [tiny(d=4)], budget(**kwargs), 4)


def test_bad_inputs_are_refused() -> None:
    b = budget(eps=0.1, steps=1, lr=1.0)
    with pytest.raises(ConfigError, match="labels must lie"):
        run("adversarial-untargeted", torch.rand(3, 4), torch.tensor([0, 1, 9]), [tiny(d=4)], b, 4)
    with pytest.raises(ConfigError, match="images must lie in"):
        run("random-noise", torch.rand(3, 4) + 1, torch.tensor([0, 1, 2]), [], b, 4)
