"""The crafting engine (mlaudit.craft): constraints always hold, PGD raises a model's loss, restarts
keep the best, augmentation is differentiated through, mini-batches match the full batch, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.craft import Box, L2Ball, LinfBall, craft
from mlaudit.data.augment import AugmentSpec
from mlaudit.errors import ConfigError


def linear_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 0.3), kind=st.sampled_from(["linf", "l2", "box"]), opt=st.sampled_from(["signed-adam", "pgd", "adam"]),
       seed=st.integers(0, 100))
def test_result_always_satisfies_the_constraint(eps: float, kind: str, opt: str, seed: int) -> None:
    x, y = data(4, seed)
    model = linear_model(seed)
    constraint = {"linf": LinfBall(eps), "l2": L2Ball(eps * 4), "box": Box()}[kind]
    res = craft(lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none"), x, constraint=constraint,
                steps=5, optimizer=opt, lr=0.5, restarts=2, generator=torch.Generator().manual_seed(seed))
    adv = x + res.delta
    assert adv.min() >= -1e-6 and adv.max() <= 1 + 1e-6
    if kind == "linf":
        assert res.delta.abs().max() <= eps + 1e-6
    if kind == "l2":
        assert (res.delta.flatten(1).norm(dim=1) <= eps * 4 + 1e-5).all()


def test_pgd_raises_the_loss_and_stays_in_the_ball() -> None:
    x, y = data(16)
    model = linear_model()
    clean = F.cross_entropy(model(x), y, reduction="none")
    res = craft(lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none"), x,
                constraint=LinfBall(8 / 255), steps=20, optimizer="pgd", lr=0.25, init="random")
    adv = F.cross_entropy(model(x + res.delta), y, reduction="none")
    assert (adv > clean).all()
    assert res.per_sample is not None and torch.allclose(res.per_sample, -adv.detach(), atol=1e-5)
    assert res.history[-1] <= res.history[0]


def test_restarts_keep_the_best_per_sample() -> None:
    x, y = data(8)
    model = linear_model()
    obj = lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none")  # noqa: E731
    res = craft(obj, x, constraint=LinfBall(4 / 255), steps=3, optimizer="pgd", lr=0.5, restarts=4,
                generator=torch.Generator().manual_seed(1))
    assert len(res.restarts) == 4
    assert res.objective <= min(res.restarts) + 1e-5  # per-sample selection is at least as good as any restart


def test_joint_objective_keeps_best_restart_by_total() -> None:
    x, _ = data(6)
    target = torch.full_like(x, 0.5)
    res = craft(lambda xa, idx: ((xa - target[idx]) ** 2).sum(), x, constraint=Box(), steps=30,
                optimizer="adam", lr=0.05, restarts=3, generator=torch.Generator().manual_seed(0))
    assert res.per_sample is None and res.objective == min(res.restarts)
    assert res.objective < ((x - target) ** 2).sum().item()


def test_minibatches_match_the_full_batch_for_a_separable_objective() -> None:
    x, y = data(10)
    model = linear_model()
    obj = lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none")  # noqa: E731
    full = craft(obj, x, constraint=LinfBall(0.05), steps=6, optimizer="signed-adam", lr=0.2)
    mini = craft(obj, x, constraint=LinfBall(0.05), steps=6, optimizer="signed-adam", lr=0.2, batch_size=3)
    torch.testing.assert_close(full.delta, mini.delta, rtol=0, atol=1e-6)


def test_augmentation_is_differentiated_through() -> None:
    x, y = data(4)
    model = linear_model()
    seen = []

    def obj(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.append(xa.grad_fn is not None)
        return -F.cross_entropy(model(xa), y[idx], reduction="none")

    res = craft(obj, x, constraint=LinfBall(0.1), steps=3, optimizer="pgd", lr=0.3,
                augment=AugmentSpec(crop_pad=2, flip=True), generator=torch.Generator().manual_seed(0))
    assert all(seen[:3]) and not seen[3]  # 3 differentiable steps, then the final scoring without grad
    assert res.delta.abs().max() > 0


def test_same_generator_same_result() -> None:
    x, y = data(4)
    model = linear_model()
    obj = lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none")  # noqa: E731
    runs = [craft(obj, x, constraint=LinfBall(0.1), steps=4, restarts=2, augment=AugmentSpec(),
                  generator=torch.Generator().manual_seed(7)).delta for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1}, "steps"), ({"restarts": 0}, "restarts"), ({"lr": 0.0}, "lr"),
    ({"optimizer": "sgd"}, "unknown craft optimizer"),
])
def test_bad_options_are_config_errors(kwargs: dict, match: str) -> None:
    x, _ = data(2)
    with pytest.raises(ConfigError, match=match):
        craft(lambda xa, idx: xa.sum(), x, constraint=LinfBall(0.1), **kwargs)


def test_bad_objective_output_and_eps() -> None:
    x, _ = data(2)
    with pytest.raises(ConfigError, match="scalar or"):
        craft(lambda xa, idx: xa, x, constraint=LinfBall(0.1), steps=1)
    with pytest.raises(ConfigError, match="non-finite"):
        craft(lambda xa, idx: xa.sum() * float("nan"), x, constraint=LinfBall(0.1), steps=1)
    with pytest.raises(ConfigError, match="eps"):
        LinfBall(2.0)


def test_init_perturbation_is_projected_and_continued() -> None:
    """``init`` as a tensor: the first restart starts from it (projected onto the constraint), so a
    zero-step craft returns it and a later craft continues where an earlier one stopped."""
    x = torch.full((3, 1, 2, 2), 0.5)
    start = torch.tensor([0.2, -0.05, 0.01]).view(3, 1, 1, 1).expand_as(x).clone()
    res = craft(lambda xa, idx: (xa - 1).pow(2).flatten(1).sum(1), x, constraint=LinfBall(0.1), steps=0, init=start)
    assert torch.allclose(res.delta, start.clamp(-0.1, 0.1))
    more = craft(lambda xa, idx: (xa - 1).pow(2).flatten(1).sum(1), x, constraint=LinfBall(0.1), steps=3,
                 optimizer="pgd", lr=0.1, schedule="constant", init=res.delta)
    # 3 signed steps of lr * eps = 0.01 towards x = 1, from the projected start, capped at eps
    assert torch.allclose(more.delta, (start.clamp(-0.1, 0.1) + 0.03).clamp(max=0.1), atol=1e-6)
    with pytest.raises(ConfigError, match="shaped like x"):
        craft(lambda xa, idx: xa.sum(), x, constraint=LinfBall(0.1), steps=1, init=torch.zeros(2))


class _Quadratic:
    """Separable toy objective with a restart-batched form: ||x_adv - 1||^2 per sample."""

    def __call__(self, xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (xa - 1).pow(2).flatten(1).sum(1)

    def batched(self, xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (xa - 1).pow(2).flatten(2).sum(2)


def test_parallel_restarts_equal_sequential_ones() -> None:
    """Without augmentation the random starts are drawn in the same order, so G restarts optimised
    together end where the same restarts optimised one after another end."""
    x = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    runs = [craft(_Quadratic(), x, constraint=LinfBall(0.05), steps=6, restarts=4, init="random",
                  generator=torch.Generator().manual_seed(1), parallel_restarts=g) for g in (1, 2, 4)]
    for r in runs[1:]:
        assert r.restarts == pytest.approx(runs[0].restarts, rel=1e-5)
        assert torch.allclose(r.delta, runs[0].delta, atol=1e-6)
    with pytest.raises(ConfigError, match="needs an objective with a batched"):
        craft(lambda xa, idx: xa.sum(), x, constraint=LinfBall(0.05), steps=1, restarts=2, parallel_restarts=2)
