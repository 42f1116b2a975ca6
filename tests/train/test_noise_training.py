"""``recipe.noise_sigma`` (Gaussian noise training for randomized smoothing, Cohen et al. 2019): the one
loop adds N(0, sigma^2) to every training input after augmentation, per model from its own generator
(the same noise whatever K), and adds nothing at 0; bad values are refused naming the field."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import Recipe, init_models, train_stack
from mlaudit.train.recipe import resolve_recipe
from mlaudit.train.stacked import LoopStack, StackedModels, VmapStack

CPU = torch.device("cpu")
FORWARDS = {cls: cls.forward for cls in (VmapStack, LoopStack)}


def _fit(monkeypatch: pytest.MonkeyPatch, seeds: list[int], sigma: float, *, augment: Any = "none",
         strategy: str = "vmap") -> list[torch.Tensor]:
    """Train MLPs on all-zero images; returns every training batch the stack's forward saw [K, B, *shape]."""
    seen: list[torch.Tensor] = []
    for cls, forward0 in FORWARDS.items():
        def spy(self: StackedModels, x: torch.Tensor, *, train: bool, forward: Any = forward0) -> torch.Tensor:
            if train:
                seen.append(x.detach().clone())
            return forward(self, x, train=train)

        monkeypatch.setattr(cls, "forward", spy)
    data = TensorDataset(torch.zeros(48, 3, 8, 8), torch.arange(48) % 4, ("a", "b", "c", "d"))
    r = Recipe(lr=0.05, epochs=2, batch_size=16, schedule="constant", augment=augment, noise_sigma=sigma)
    fn = functools.partial(build_model, ModelSpec(name="mlp", width=8), input_shape=(3, 8, 8), num_classes=4)
    train_stack(init_models(fn, seeds), data, r, seeds=seeds, lr=0.05, device=CPU, strategy=strategy,
                augment=None if augment == "none" else r.augment)
    return seen


def test_noise_is_added_to_every_training_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fit(monkeypatch, [0, 1], 0.5)
    assert len(seen) == 2 * 3  # 2 epochs x 3 steps
    x = torch.stack(seen)  # [steps, K, B, 3, 8, 8]; the clean inputs are all zero, so x is the noise
    assert float(x.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(x.std()) == pytest.approx(0.5, rel=0.03)
    assert not torch.equal(x[:, 0], x[:, 1])  # each model its own noise
    assert not torch.equal(x[0], x[1])  # fresh noise every step


def test_no_noise_at_sigma_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fit(monkeypatch, [0, 1], 0.0)
    assert all(torch.count_nonzero(b) == 0 for b in seen)


def test_noise_comes_after_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A translation's zero fill of an all-zero image is still zero: noise added before the shift would
    leave exact zeros at the border, noise added after covers every pixel."""
    seen = _fit(monkeypatch, [3], 0.5, augment={"crop_pad": 3, "flip": True})
    assert all(torch.count_nonzero(b) == b.numel() for b in seen)


def test_noise_of_a_model_does_not_depend_on_the_chunk_or_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    together = _fit(monkeypatch, [5, 6], 0.25)
    alone = _fit(monkeypatch, [6], 0.25, strategy="loop")
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a[1], b[0])


@pytest.mark.parametrize(("recipe", "words"), [
    ({"noise_sigma": -0.1}, ["recipe.noise_sigma", "got -0.1", "0.0 <= recipe.noise_sigma"]),
    ({"noise_sigma": float("inf")}, ["recipe.noise_sigma", "finite"]),
    ({"noise_sigma": 0.25, "adversarial": {"eps": 0.1}}, ["noise_sigma = 0.25", "recipe.adversarial"]),
    ({"noise_sigma": 0.25, "dp": {"noise_multiplier": 1.0}}, ["noise_sigma = 0.25", "recipe.dp"]),
])
def test_bad_noise_sigma_is_refused(recipe: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"kind": "train", "dataset": "digits", "model": "mlp", "recipe": {"name": "fast", **recipe}})
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_noise_sigma_needs_mlaudits_trainer() -> None:
    assert resolve_recipe({"name": "fast", "noise_sigma": 0.25}).noise_sigma == 0.25
    with pytest.raises(ConfigError, match="recipe.noise_sigma = 0.25 configures mlaudit's own"):
        parse_config({"kind": "train", "dataset": "digits", "model": "mlp", "trainer": "pkg.mod:fit",
                      "recipe": {"name": "fast", "noise_sigma": 0.25}})
